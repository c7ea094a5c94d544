// The fp8 rows of MLA's paged latent cache (model::LatentCache in its fp8 format): a row holds a token's
// normalised compressed latent c (r values) and its rotated rope key k_pe (rd values) in
//   [c in fp8 E4M3: r bytes][k_pe in bf16: 2·rd bytes][scales: r / kFp8LatentTile f32][zeros to 16 bytes]
// c is quantised in tiles of kFp8LatentTile values with one scale each, a power of two 2^k: the smallest
// with |c| ≤ 448 · 2^k over the tile (448 is E4M3's largest finite), and a value is stored as
// e4m3(c · 2^-k), rounded to nearest even. Powers of two make both steps exact but for that rounding,
// and a stored value times its scale is exact in bf16 and f32, so attention over fp8 rows is attention
// over their dequantised values. The rope key stays in bf16 (FlashMLA's fp8 cache does the same): it is
// an eighth of the row and carries the positions. For DeepSeek-V3 (r 512, rd 64) a row is 672 bytes
// against 1152 in bf16; for r 256, rd 32, 336 against 576.
// Shared by the CPU reference and the CUDA kernels (host and device code alike).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define R1LAB_HOST_DEVICE __host__ __device__
#else
#define R1LAB_HOST_DEVICE
#endif

namespace r1lab::core {

constexpr int kFp8LatentTile = 64;

struct Fp8LatentRow {
  int64_t r = 0, rd = 0;

  // Whether a latent of r values and a rope key of rd take this format: whole tiles, and the rope key's
  // bytes a multiple of 16 so that each part starts 16-byte aligned.
  R1LAB_HOST_DEVICE static bool fits(int64_t r, int64_t rd) {
    return r > 0 && r % kFp8LatentTile == 0 && rd >= 0 && rd % 8 == 0;
  }
  R1LAB_HOST_DEVICE int64_t tiles() const { return r / kFp8LatentTile; }
  R1LAB_HOST_DEVICE int64_t rope_offset() const { return r; }             // bytes into the row
  R1LAB_HOST_DEVICE int64_t scales_offset() const { return r + 2 * rd; }  // bytes into the row
  R1LAB_HOST_DEVICE int64_t bytes() const { return (scales_offset() + 4 * tiles() + 15) / 16 * 16; }
};

// The bits of one 4-byte value as another type (a float's bits and back), in host and device code alike.
template <typename To, typename From>
R1LAB_HOST_DEVICE inline To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To t;
  memcpy(&t, &v, sizeof(To));
  return t;
}

// k of the scale 2^k of a tile whose largest magnitude is amax: the smallest k with amax ≤ 448 · 2^k,
// found from amax's bits (no rounded division); 0 for a tile of zeros or a non-finite amax, and at least
// -126 (2^k a normal float).
R1LAB_HOST_DEVICE inline int fp8_scale_exponent(float amax) {
  const uint32_t u = bits_as<uint32_t>(amax) & 0x7fffffffu;
  if (u == 0 || u >= 0x7f800000u) return 0;
  if (u < 0x00800000u) return -126;               // subnormal: any of its values rounds to zero below 2^-126 anyway
  const int e = static_cast<int>(u >> 23) - 127;  // amax = 1.f · 2^e
  // 448 = 1.75 · 2^8: 1.f · 2^(e - k) ≤ 1.75 · 2^8 holds from k = e - 8 where 1.f ≤ 1.75, else e - 7.
  const int k = (u & 0x7fffffu) <= 0x600000u ? e - 8 : e - 7;
  return k < -126 ? -126 : k;
}

// 2^k as a float, for k in [-126, 127].
R1LAB_HOST_DEVICE inline float exp2_int(int k) { return bits_as<float>(static_cast<uint32_t>(k + 127) << 23); }

// One row on the host (the CPU reference): src [r + rd] f32 (c then k_pe) into dst [f.bytes()], and back
// (dst [r + rd] f32: the stored values times their scales, the rope key's bf16 values).
void quantize_fp8_latent_row(const float* src, const Fp8LatentRow& f, uint8_t* dst);
void dequantize_fp8_latent_row(const uint8_t* src, const Fp8LatentRow& f, float* dst);

}  // namespace r1lab::core
