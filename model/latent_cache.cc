#include "model/latent_cache.h"

#include <atomic>

#include "core/check.h"

namespace r1lab::model {
namespace {

std::atomic<uint64_t> next_cache_id{1};

}  // namespace

LatentCache::LatentCache(const ModelConfig& cfg, core::Backend& backend, int64_t num_blocks, int block_size)
    : backend_(backend),
      num_blocks_(num_blocks),
      block_size_(block_size),
      id_(next_cache_id++),
      dtype_(dtype_for(cfg, backend)) {
  CHECK_GT(num_blocks, 0);
  CHECK_GT(block_size, 0);
  for (int l = 0; l < cfg.num_hidden_layers; ++l)
    layers_.push_back(backend.zeros({(num_blocks + 1) * block_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim}, dtype_));
}

core::DType LatentCache::dtype_for(const ModelConfig& cfg, const core::Backend& backend) {
  const int64_t r = cfg.kv_lora_rank, row = r + cfg.qk_rope_head_dim;
  const bool fits = row % 16 == 0 && (r == 64 || r == 128 || r == 256 || r == 512);
  return backend.device() == core::Device::kCuda && backend.weight_dtype() == core::DType::kBF16 && fits
             ? core::DType::kBF16
             : core::DType::kF32;
}

void LatentCache::copy_block(int64_t src, int64_t dst) {
  CHECK(src >= 0 && src < num_blocks_ && dst >= 0 && dst < num_blocks_);
  for (core::Tensor& t : layers_) {
    core::Tensor to = t.slice(0, dst * block_size_, block_size_);
    backend_.copy(t.slice(0, src * block_size_, block_size_), to);
  }
}

int64_t LatentCache::bytes() const {
  int64_t n = 0;
  for (const core::Tensor& t : layers_) n += t.numel() * static_cast<int64_t>(core::dtype_size(t.dtype()));
  return n;
}

int64_t LatentCache::bytes_per_token(const ModelConfig& cfg, int bytes_per_value) {
  return static_cast<int64_t>(cfg.num_hidden_layers) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bytes_per_value;
}

int64_t LatentCache::full_kv_bytes_per_token(const ModelConfig& cfg, int bytes_per_value) {
  return static_cast<int64_t>(cfg.num_hidden_layers) * cfg.num_attention_heads *
         (cfg.qk_head_dim() + cfg.v_head_dim) * bytes_per_value;
}

void StepBatch::add(const int32_t* toks, int64_t n, int64_t start, const std::vector<int32_t>& block_table,
                    int block_size, bool want_logits) {
  CHECK_GT(n, 0);
  CHECK_LE(start + n, static_cast<int64_t>(block_table.size()) * block_size) << "block table too short";
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = start + i;
    tokens.push_back(toks[i]);
    positions.push_back(static_cast<int32_t>(pos));
    slots.push_back(static_cast<int32_t>(block_table[pos / block_size] * block_size + pos % block_size));
  }
  seq_starts.push_back(static_cast<int32_t>(tokens.size()));
  context_lens.push_back(static_cast<int32_t>(start + n));
  block_tables.push_back(block_table);
  if (want_logits) logit_rows.push_back(static_cast<int32_t>(tokens.size() - 1));
}

}  // namespace r1lab::model
