#include "core/dtype.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace r1lab::core {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kBF16: return 2;
    case DType::kF16: return 2;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
    case DType::kU8:
      return 1;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kBF16: return "BF16";
    case DType::kF16: return "F16";
    case DType::kI32: return "I32";
    case DType::kI64: return "I64";
    case DType::kU8:
      return "U8";
  }
  return "?";
}

absl::StatusOr<DType> dtype_from_name(const std::string& name) {
  if (name == "F32") return DType::kF32;
  if (name == "BF16") return DType::kBF16;
  if (name == "F16") return DType::kF16;
  if (name == "I32") return DType::kI32;
  if (name == "I64") return DType::kI64;
  if (name == "U8") return DType::kU8;
  return absl::InvalidArgumentError(absl::StrCat("unsupported dtype '", name, "'"));
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1u;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);  // subnormal
  } else if (exp == 31) {
    v = man ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  }
  return sign ? -v : v;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int32_t exp = static_cast<int32_t>((u >> 23) & 0xffu) - 127 + 15;
  uint32_t man = u & 0x7fffffu;
  if (((u >> 23) & 0xffu) == 0xffu) return static_cast<uint16_t>(sign | 0x7c00u | (man ? 0x200u : 0));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    man |= 0x800000u;
    const uint32_t shift = static_cast<uint32_t>(14 - exp);
    uint32_t half = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1);
    const uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(exp) << 10) | (man >> 13);
  const uint32_t rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;  // may carry into the exponent: correct
  return static_cast<uint16_t>(half);
}

float e4m3_to_f32(uint8_t b) {
  const int exp = (b >> 3) & 0xf, man = b & 7;
  float v;
  if (exp == 15 && man == 7) {
    v = NAN;
  } else if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -9);  // subnormal: man · 2^-9
  } else {
    v = std::ldexp(static_cast<float>(8 + man), exp - 10);  // 1.man · 2^(exp - 7)
  }
  return (b & 0x80) ? -v : v;
}

uint8_t f32_to_e4m3(float f) {
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  if (std::isnan(f)) return sign | 0x7f;
  const float a = std::fabs(f);
  if (a >= kE4M3Max) return sign | 0x7e;  // saturated (448 itself is 0x7e)
  if (a < 0x1p-6f) {                      // subnormal: multiples of 2^-9, 8 of them the smallest normal
    const int m = static_cast<int>(std::nearbyint(a * 512.0f));  // exact scaling; rounds to nearest even
    return sign | static_cast<uint8_t>(m);
  }
  int e;
  const float frac = std::frexp(a, &e);                                   // a = frac · 2^e, frac in [0.5, 1)
  int m = static_cast<int>(std::nearbyint((frac * 2.0f - 1.0f) * 8.0f));  // the 3 mantissa bits, rounded
  int exp = e - 1 + 7;
  if (m == 8) m = 0, ++exp;  // rounded up to the next power of two
  const int code = (exp << 3) | m;
  return sign | static_cast<uint8_t>(code > 0x7e ? 0x7e : code);
}

}  // namespace r1lab::core
