#include "core/latent_rows.h"

#include <algorithm>
#include <cmath>

#include "core/dtype.h"

namespace r1lab::core {

void quantize_fp8_latent_row(const float* src, const Fp8LatentRow& f, uint8_t* dst) {
  std::fill(dst, dst + f.bytes(), uint8_t{0});
  float* scales = reinterpret_cast<float*>(dst + f.scales_offset());
  for (int64_t t = 0; t < f.tiles(); ++t) {
    const float* c = src + t * kFp8LatentTile;
    float amax = 0;
    for (int i = 0; i < kFp8LatentTile; ++i) amax = std::max(amax, std::fabs(c[i]));
    const int k = fp8_scale_exponent(amax);
    const float inv = exp2_int(-k);
    for (int i = 0; i < kFp8LatentTile; ++i) dst[t * kFp8LatentTile + i] = f32_to_e4m3(c[i] * inv);
    const float scale = exp2_int(k);
    std::memcpy(scales + t, &scale, 4);
  }
  uint16_t* pe = reinterpret_cast<uint16_t*>(dst + f.rope_offset());
  for (int64_t i = 0; i < f.rd; ++i) {
    const uint16_t b = f32_to_bf16(src[f.r + i]);
    std::memcpy(pe + i, &b, 2);
  }
}

void dequantize_fp8_latent_row(const uint8_t* src, const Fp8LatentRow& f, float* dst) {
  for (int64_t t = 0; t < f.tiles(); ++t) {
    float scale;
    std::memcpy(&scale, src + f.scales_offset() + 4 * t, 4);
    for (int i = 0; i < kFp8LatentTile; ++i)
      dst[t * kFp8LatentTile + i] = e4m3_to_f32(src[t * kFp8LatentTile + i]) * scale;
  }
  for (int64_t i = 0; i < f.rd; ++i) {
    uint16_t b;
    std::memcpy(&b, src + f.rope_offset() + 2 * i, 2);
    dst[f.r + i] = bf16_to_f32(b);
  }
}

}  // namespace r1lab::core
