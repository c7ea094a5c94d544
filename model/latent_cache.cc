#include "model/latent_cache.h"

#include <atomic>

#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/latent_rows.h"

namespace r1lab::model {
namespace {

std::atomic<uint64_t> next_cache_id{1};

// Whether the rows suit the CUDA backend's tensor-core decode kernel (16-bit and fp8 rows): a row a
// multiple of 16 values, a latent of 64, 128, 256 or 512.
bool tensor_core_rows(const ModelConfig& cfg) {
  const int64_t r = cfg.kv_lora_rank;
  return (r + cfg.qk_rope_head_dim) % 16 == 0 && (r == 64 || r == 128 || r == 256 || r == 512);
}

}  // namespace

const char* latent_format_name(LatentFormat f) {
  switch (f) {
    case LatentFormat::kAuto:
      return "auto";
    case LatentFormat::kF32:
      return "f32";
    case LatentFormat::kBF16:
      return "bf16";
    case LatentFormat::kFp8:
      return "fp8";
  }
  return "?";
}

absl::StatusOr<LatentFormat> latent_format_from_name(const std::string& name) {
  for (LatentFormat f : {LatentFormat::kAuto, LatentFormat::kF32, LatentFormat::kBF16, LatentFormat::kFp8})
    if (name == latent_format_name(f)) return f;
  return absl::InvalidArgumentError(absl::StrCat("latent format '", name, "': expected one of auto, f32, bf16, fp8"));
}

LatentCache::LatentCache(const ModelConfig& cfg, core::Backend& backend, int64_t num_blocks, int block_size,
                         LatentFormat format)
    : backend_(backend), num_blocks_(num_blocks), block_size_(block_size), id_(next_cache_id++) {
  CHECK_GT(num_blocks, 0);
  CHECK_GT(block_size, 0);
  const absl::StatusOr<core::DType> dtype = resolve_dtype(cfg, backend, format);
  CHECK(dtype.ok()) << dtype.status();
  dtype_ = *dtype;
  const int64_t cols = dtype_ == core::DType::kU8 ? row_bytes(cfg, dtype_) : cfg.kv_lora_rank + cfg.qk_rope_head_dim;
  for (int l = 0; l < cfg.num_hidden_layers; ++l)
    layers_.push_back(backend.zeros({(num_blocks + 1) * block_size, cols}, dtype_));
}

core::DType LatentCache::dtype_for(const ModelConfig& cfg, const core::Backend& backend) {
  return backend.device() == core::Device::kCuda && backend.weight_dtype() == core::DType::kBF16 &&
                 tensor_core_rows(cfg)
             ? core::DType::kBF16
             : core::DType::kF32;
}

absl::StatusOr<core::DType> LatentCache::resolve_dtype(const ModelConfig& cfg, const core::Backend& backend,
                                                       LatentFormat format) {
  const int64_t r = cfg.kv_lora_rank, rd = cfg.qk_rope_head_dim;
  // The CUDA decode kernels' shapes for 16-bit and fp8 rows (the CPU reference takes any).
  const bool cuda = backend.device() == core::Device::kCuda;
  const bool tc_shape = tensor_core_rows(cfg);
  switch (format) {
    case LatentFormat::kAuto:
      return dtype_for(cfg, backend);
    case LatentFormat::kF32:
      return core::DType::kF32;
    case LatentFormat::kBF16:
      if (cuda && !tc_shape)
        return absl::InvalidArgumentError(
            absl::StrCat("bf16 latents on CUDA need kv_lora_rank 64, 128, 256 or 512 "
                         "and kv_lora_rank + qk_rope_head_dim a multiple of 16; the "
                         "model has ",
                         r, " and ", rd));
      return core::DType::kBF16;
    case LatentFormat::kFp8:
      if (!core::Fp8LatentRow::fits(r, rd) || (cuda && !tc_shape))
        return absl::InvalidArgumentError(absl::StrCat("fp8 latents need kv_lora_rank a multiple of ",
                                                       core::kFp8LatentTile, " and qk_rope_head_dim a multiple of 8",
                                                       cuda ? " (on CUDA, kv_lora_rank 64, 128, 256 or 512)" : "",
                                                       "; the model has ", r, " and ", rd));
      return core::DType::kU8;
  }
  return absl::InvalidArgumentError("unknown latent format");
}

int64_t LatentCache::row_bytes(const ModelConfig& cfg, core::DType dtype) {
  const int64_t r = cfg.kv_lora_rank, rd = cfg.qk_rope_head_dim;
  if (dtype == core::DType::kU8) return core::Fp8LatentRow{r, rd}.bytes();
  return (r + rd) * static_cast<int64_t>(core::dtype_size(dtype));
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
