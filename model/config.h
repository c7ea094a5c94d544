// The DeepSeek-V3-family configuration, read from a Hugging Face config.json in either style:
// transformers 5 (`rope_parameters`, `rope_interleave`) or the Hub's (`rope_theta` + `rope_scaling`,
// `scoring_func`, `topk_method`). Also covers DeepSeek-V2 configs (`q_lora_rank: null`, softmax
// scoring, greedy / group_limited_greedy routing).
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "nlohmann/json.hpp"

namespace r1lab::model {

struct RopeConfig {
  std::string type = "default";  // "default" or "yarn"
  double theta = 10000.0;
  double factor = 1.0;
  int original_max_position_embeddings = 0;  // 0: max_position_embeddings
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 0.0;          // 0: absent
  double mscale_all_dim = 0.0;  // 0: absent
  double attention_factor = 0.0;  // 0: derived from mscale / mscale_all_dim
  bool truncate = true;
};

struct ModelConfig {
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;      // dense MLP layers
  int moe_intermediate_size = 0;  // each routed expert; shared experts use n_shared_experts times this
  int num_hidden_layers = 0;
  int first_k_dense_replace = 0;
  int moe_layer_freq = 1;
  int num_attention_heads = 0;
  int q_lora_rank = 0;  // 0: no query compression (q_proj), as `q_lora_rank: null`
  int kv_lora_rank = 0;
  int qk_nope_head_dim = 0;
  int qk_rope_head_dim = 0;
  int v_head_dim = 0;
  int n_routed_experts = 0;  // 0: every layer dense
  int n_shared_experts = 0;
  int num_experts_per_tok = 0;
  int n_group = 1;
  int topk_group = 1;
  double routed_scaling_factor = 1.0;
  bool norm_topk_prob = true;
  std::string scoring_func = "sigmoid";  // sigmoid | softmax
  std::string topk_method = "noaux_tc";  // noaux_tc | group_limited_greedy | greedy
  int max_position_embeddings = 4096;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool rope_interleave = true;
  bool tie_word_embeddings = false;
  int bos_token_id = -1;
  int eos_token_id = -1;

  int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool is_moe_layer(int layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  // softmax scale of attention: qk_head_dim^-1/2, times mscale² under YaRN with mscale_all_dim.
  float attention_scale() const;
  core::RouterConfig router() const;

  // Checks ranges and divisibility; the message names the field.
  absl::Status validate() const;
  // `source` names the file in error messages.
  static absl::StatusOr<ModelConfig> from_json(const nlohmann::json& j, const std::string& source);
  static absl::StatusOr<ModelConfig> from_file(const std::string& path);
  // transformers-5 style.
  nlohmann::json to_json() const;
};

// cos/sin for positions [0, n_positions), with YaRN frequencies and attention factor as transformers.
core::RopeTable make_rope_table(const ModelConfig& cfg, int n_positions);

}  // namespace r1lab::model
