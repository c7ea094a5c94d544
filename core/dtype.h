// Element types and the conversions between the 16-bit floats and f32.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "absl/status/statusor.h"

namespace r1lab::core {

// kU8: raw bytes (the fp8 rows of a latent cache, core/latent_rows.h).
enum class DType : uint8_t { kF32, kBF16, kF16, kI32, kI64, kU8 };

// Bytes per element.
size_t dtype_size(DType t);
// "F32", "BF16", ... (the safetensors spelling).
const char* dtype_name(DType t);
// Parses the safetensors spelling; other types (F64, U8, ...) are an error naming the type.
absl::StatusOr<DType> dtype_from_name(const std::string& name);

// bf16 is the top half of an f32; conversion rounds to nearest even (NaN stays NaN).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// IEEE half precision.
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
// fp8 E4M3 (OCP "e4m3fn": bias 7, no infinities, 0x7f/0xff NaN, largest finite ±448). The conversion
// rounds to nearest even and saturates: beyond ±448 (infinities too) gives ±448, NaN gives NaN; as CUDA's
// __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3).
constexpr float kE4M3Max = 448.0f;
uint8_t f32_to_e4m3(float f);
float e4m3_to_f32(uint8_t b);

}  // namespace r1lab::core
