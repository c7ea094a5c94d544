#include "model/latent_cache.h"

namespace r1lab::model {

LatentCache::LatentCache(const ModelConfig& cfg, core::Backend& backend, int64_t batch, int64_t capacity)
    : batch_(batch), capacity_(capacity) {
  CHECK_GT(batch, 0);
  CHECK_GT(capacity, 0);
  for (int l = 0; l < cfg.num_hidden_layers; ++l)
    layers_.push_back(backend.zeros({batch, capacity, cfg.kv_lora_rank + cfg.qk_rope_head_dim}));
}

void LatentCache::advance(int64_t n) {
  CHECK_LE(length_ + n, capacity_) << "latent cache overflow";
  length_ += n;
}

int64_t LatentCache::bytes_per_token(const ModelConfig& cfg, int bytes_per_value) {
  return static_cast<int64_t>(cfg.num_hidden_layers) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bytes_per_value;
}

int64_t LatentCache::full_kv_bytes_per_token(const ModelConfig& cfg, int bytes_per_value) {
  return static_cast<int64_t>(cfg.num_hidden_layers) * cfg.num_attention_heads *
         (cfg.qk_head_dim() + cfg.v_head_dim) * bytes_per_value;
}

}  // namespace r1lab::model
