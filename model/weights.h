// Parameters in one contiguous buffer with named views (Hugging Face names), so that loading, saving,
// all-reduce, weight broadcast and a fused optimizer are each one loop over one buffer. Gradients use
// a second buffer with the same layout.
//
// Layout notes: routed experts are stored fused as transformers 5 does ([E, 2I, H] gate|up rows,
// [E, H, I] down); a dense MLP's gate_proj and up_proj sit back to back so that together they form one
// [2I, H] gate|up matrix. With tied embeddings lm_head is a view of embed_tokens.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "model/config.h"

namespace r1lab::model {

struct ParamInfo {
  std::string name;
  core::Shape shape;
  int64_t offset = 0;  // elements into the buffer
  bool trainable = true;  // e_score_correction_bias is state, not a parameter
};

// The ordered list of parameters of a config.
std::vector<ParamInfo> parameter_layout(const ModelConfig& cfg);

class ParameterSet {
 public:
  ParameterSet() = default;
  // A zeroed buffer on the backend's device holding every parameter of the layout.
  ParameterSet(const ModelConfig& cfg, core::Backend& backend);

  const std::vector<ParamInfo>& infos() const { return infos_; }
  const core::Tensor& buffer() const { return buffer_; }
  // The backend that holds the buffer.
  core::Backend& backend() const { return *backend_; }
  int64_t numel() const { return buffer_.numel(); }
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  const ParamInfo& info(const std::string& name) const;
  // The view of one parameter (CHECKs that the name exists).
  core::Tensor get(const std::string& name) const;
  // The layout in a few bytes, the same in every process for the same layout: "<parameters>:<elements>:
  // <FNV-1a 64 of every name, shape and offset>". Two buffers with equal fingerprints can be copied
  // into each other whole (a weight broadcast checks this first).
  std::string fingerprint() const;

 private:
  std::vector<ParamInfo> infos_;
  std::map<std::string, size_t> index_;
  core::Tensor buffer_;
  core::Backend* backend_ = nullptr;
};

struct MlpWeights {
  core::Tensor gate_up;  // [2I, H]: rows 0..I-1 gate_proj, I..2I-1 up_proj
  core::Tensor down;     // [H, I]
};

struct LayerWeights {
  core::Tensor input_norm, post_norm;  // [H]
  // Attention (MLA). q_a_proj/q_a_norm/q_b_proj with query compression, else q_proj.
  core::Tensor q_a_proj, q_a_norm, q_b_proj, q_proj;
  core::Tensor kv_a_proj;  // [r + rope, H]
  core::Tensor kv_a_norm;  // [r]
  core::Tensor kv_b_proj;  // [heads * (nope + v), r]
  core::Tensor o_proj;     // [H, heads * v]
  bool moe = false;
  MlpWeights mlp;  // dense layers
  // MoE layers.
  core::Tensor router;          // [E, H]
  core::Tensor router_bias;     // [E] e_score_correction_bias
  core::Tensor experts_gate_up;  // [E, 2I, H]
  core::Tensor experts_down;     // [E, H, I]
  MlpWeights shared;            // n_shared_experts * I wide; undefined when none
};

struct Weights {
  core::Tensor embed;       // [V, H]
  core::Tensor final_norm;  // [H]
  core::Tensor lm_head;     // [V, H]
  std::vector<LayerWeights> layers;
};

// Named views of a parameter set (or a gradient set of the same layout).
Weights bind_weights(const ModelConfig& cfg, const ParameterSet& params);
// w with its matrix weights (the operands of products: projections, router, experts, lm_head) moved to
// the same places in `copy`, a buffer laid out as `buffer` (say, its bf16 copy); norms, the embedding
// table and the router bias stay as they are.
Weights matmul_views(const Weights& w, const core::Tensor& buffer, const core::Tensor& copy);

// Loads every parameter from a checkpoint directory, in either expert layout (fused, or one tensor per
// expert as on the Hub) and f32/bf16/f16. Errors name the file and tensor: missing, wrongly shaped,
// unknown dtype, unexpected names. Multi-token-prediction layers (index >= num_hidden_layers) are skipped.
absl::Status load_weights(const std::string& dir, const ModelConfig& cfg, core::Backend& backend,
                          ParameterSet& params);

enum class ExpertLayout { kFused, kPerExpert };
// Writes config.json and model.safetensors (atomically) into dir, creating it.
absl::Status save_checkpoint(const std::string& dir, const ModelConfig& cfg, core::Backend& backend,
                             const ParameterSet& params, ExpertLayout layout = ExpertLayout::kFused);

}  // namespace r1lab::model
