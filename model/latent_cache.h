// The paged decode cache of MLA. Per layer and token it keeps only the normalised compressed latent c
// (kv_lora_rank) and the rotated rope key (qk_rope_head_dim) — not per-head K and V. For DeepSeek-V3
// that is (512 + 64) values per token per layer against 128 heads × (192 + 128) for full K/V: 1.8%.
//
// Rows live in a pool of fixed-size blocks; a sequence owns a block table (logical block -> pool block).
// Which blocks are free, shared or cached is the rollout engine's business (rollout/block_manager.h);
// this file holds the storage and the description of one forward step over it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "model/config.h"

namespace r1lab::model {

// How a cache keeps its rows. kAuto: LatentCache::dtype_for. kFp8: the latent in fp8 E4M3 with a
// power-of-two scale per 64 values and the rope key in bf16 (core/latent_rows.h), a little over half the
// bytes of bf16 rows: twice the tokens in the same memory, and decode reads fewer bytes, at E4M3's
// precision (3 mantissa bits) in the attention's keys and values.
enum class LatentFormat { kAuto, kF32, kBF16, kFp8 };
// "auto", "f32", "bf16", "fp8".
const char* latent_format_name(LatentFormat f);
absl::StatusOr<LatentFormat> latent_format_from_name(const std::string& name);

class LatentCache {
 public:
  // Rows in resolve_dtype(cfg, backend, format), which must be ok.
  LatentCache(const ModelConfig& cfg, core::Backend& backend, int64_t num_blocks, int block_size,
              LatentFormat format = LatentFormat::kAuto);

  // The rows' dtype by default: bf16 where the backend's products run in bf16 on a GPU and the rows suit
  // its tensor-core decode kernel ((kv_lora_rank + qk_rope_head_dim) % 16 == 0, kv_lora_rank 64, 128, 256
  // or 512), so the cache takes half the memory and decode reads half the bytes; f32 otherwise (the
  // reference).
  static core::DType dtype_for(const ModelConfig& cfg, const core::Backend& backend);
  // The rows' dtype for a format (U8 for fp8 rows), or why the model or the backend cannot keep it.
  static absl::StatusOr<core::DType> resolve_dtype(const ModelConfig& cfg, const core::Backend& backend,
                                                   LatentFormat format);
  core::DType dtype() const { return dtype_; }
  // Bytes of one token's row in one layer, rows of `dtype` (U8: fp8 rows).
  static int64_t row_bytes(const ModelConfig& cfg, core::DType dtype);

  int64_t num_blocks() const { return num_blocks_; }
  int block_size() const { return block_size_; }
  // Distinct for every cache made in this process (memory a freed cache held may come back at the same
  // address in a new one; work captured over the old one must not be replayed over the new).
  uint64_t id() const { return id_; }
  // One more block past num_blocks(), owned by no sequence: the rows that pad a decode batch up to its
  // captured size write their latents here and attend to them alone.
  int64_t pad_block() const { return num_blocks_; }
  // [(num_blocks + 1) * block_size, r + rope] of layer l, in dtype(): one row [c | k_pe] per token (the
  // pad block last); with fp8 rows [(num_blocks + 1) * block_size, row_bytes] U8.
  const core::Tensor& layer(int l) const { return layers_[l]; }
  // Copies pool block src over block dst in every layer (copy-on-write of a shared block).
  void copy_block(int64_t src, int64_t dst);
  // Bytes of the whole pool.
  int64_t bytes() const;

  // Bytes per token over all layers, at `bytes_per_value` (4 for f32, 2 for bf16).
  static int64_t bytes_per_token(const ModelConfig& cfg, int bytes_per_value);
  // What a cache of full per-head K and V would take, for comparison.
  static int64_t full_kv_bytes_per_token(const ModelConfig& cfg, int bytes_per_value);

 private:
  core::Backend& backend_;
  int64_t num_blocks_;
  int block_size_;
  uint64_t id_;
  core::DType dtype_;
  std::vector<core::Tensor> layers_;
};

// The new tokens of one forward step over a LatentCache: any mix of prompt chunks (prefill) and single
// decode tokens, sequence by sequence. Host vectors; Model::forward_step uploads them.
struct StepBatch {
  std::vector<int32_t> tokens;        // [N]
  std::vector<int32_t> positions;     // [N] position of each token in its sequence
  std::vector<int32_t> slots;         // [N] pool row that receives each token's latent
  std::vector<int32_t> seq_starts{0};  // [S + 1] sequence s owns tokens seq_starts[s] .. seq_starts[s+1]-1
  std::vector<int32_t> context_lens;  // [S] tokens of s in the cache once this step has run
  std::vector<std::vector<int32_t>> block_tables;  // [S][blocks] pool blocks of s in logical order
  std::vector<int32_t> logit_rows;    // tokens whose next-token logits the step returns, in order
  // Where defined: the step's tokens, [N] I32 on the model's backend (`tokens` then holds placeholders):
  // a step that reads what the step before it sampled where it lies, before the host has seen it.
  core::Tensor device_tokens;

  // Appends `tokens` of a sequence at positions start .. start + n - 1. block_table must cover them.
  // want_logits: return the logits after the last of them.
  void add(const int32_t* tokens, int64_t n, int64_t start, const std::vector<int32_t>& block_table,
           int block_size, bool want_logits);
  int64_t num_tokens() const { return static_cast<int64_t>(tokens.size()); }
  int64_t num_sequences() const { return static_cast<int64_t>(context_lens.size()); }
};

}  // namespace r1lab::model
