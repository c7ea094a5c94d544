// The decode cache of MLA: per layer and token only the normalised compressed latent c (kv_lora_rank)
// and the rotated rope key (qk_rope_head_dim) — not per-head K and V. For DeepSeek-V3 that is
// (512 + 64) values per token per layer against 128 heads × (192 + 128) for full K/V: 1.8%.
#pragma once

#include <cstdint>
#include <vector>

#include "core/backend.h"
#include "model/config.h"

namespace r1lab::model {

class LatentCache {
 public:
  // Room for `batch` sequences of up to `capacity` tokens each, all advancing together.
  LatentCache(const ModelConfig& cfg, core::Backend& backend, int64_t batch, int64_t capacity);

  int64_t batch() const { return batch_; }
  int64_t capacity() const { return capacity_; }
  int64_t length() const { return length_; }
  // [B, capacity, r + rope] of layer l: row t = [c_t | k_pe_t].
  const core::Tensor& layer(int l) const { return layers_[l]; }
  void advance(int64_t n);
  void reset() { length_ = 0; }

  // Bytes per token over all layers, at `bytes_per_value` (4 for f32, 2 for bf16).
  static int64_t bytes_per_token(const ModelConfig& cfg, int bytes_per_value);
  // What a cache of full per-head K and V would take, for comparison.
  static int64_t full_kv_bytes_per_token(const ModelConfig& cfg, int bytes_per_value);

 private:
  int64_t batch_, capacity_, length_ = 0;
  std::vector<core::Tensor> layers_;
};

}  // namespace r1lab::model
