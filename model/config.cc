#include "model/config.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace r1lab::model {
namespace {

using nlohmann::json;

// Reads an optional field; a present value of the wrong type is an error naming the field.
template <typename T>
absl::Status get(const json& j, const char* key, T& out, const std::string& source) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  try {
    out = it->get<T>();
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": field '", key, "' has the wrong type: ", e.what()));
  }
  return absl::OkStatus();
}


double yarn_get_mscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

absl::Status read_rope(const json& r, RopeConfig& rope, const std::string& source) {
  std::string type = rope.type;
  R1LAB_RETURN_IF_ERROR(get(r, "type", type, source));
  R1LAB_RETURN_IF_ERROR(get(r, "rope_type", type, source));
  rope.type = type;
  R1LAB_RETURN_IF_ERROR(get(r, "rope_theta", rope.theta, source));
  R1LAB_RETURN_IF_ERROR(get(r, "factor", rope.factor, source));
  R1LAB_RETURN_IF_ERROR(get(r, "original_max_position_embeddings", rope.original_max_position_embeddings, source));
  R1LAB_RETURN_IF_ERROR(get(r, "beta_fast", rope.beta_fast, source));
  R1LAB_RETURN_IF_ERROR(get(r, "beta_slow", rope.beta_slow, source));
  R1LAB_RETURN_IF_ERROR(get(r, "mscale", rope.mscale, source));
  R1LAB_RETURN_IF_ERROR(get(r, "mscale_all_dim", rope.mscale_all_dim, source));
  R1LAB_RETURN_IF_ERROR(get(r, "attention_factor", rope.attention_factor, source));
  R1LAB_RETURN_IF_ERROR(get(r, "truncate", rope.truncate, source));
  return absl::OkStatus();
}

}  // namespace

float ModelConfig::attention_scale() const {
  double s = 1.0 / std::sqrt(static_cast<double>(qk_head_dim()));
  if (rope.type == "yarn" && rope.mscale_all_dim != 0.0) {
    const double m = yarn_get_mscale(rope.factor, rope.mscale_all_dim);
    s *= m * m;
  }
  return static_cast<float>(s);
}

core::RouterConfig ModelConfig::router() const {
  core::RouterConfig r;
  r.scoring = scoring_func == "softmax" ? core::RouterConfig::Scoring::kSoftmax
                                        : core::RouterConfig::Scoring::kSigmoid;
  r.method = topk_method == "greedy"                 ? core::RouterConfig::TopkMethod::kGreedy
             : topk_method == "group_limited_greedy" ? core::RouterConfig::TopkMethod::kGroupLimitedGreedy
                                                     : core::RouterConfig::TopkMethod::kNoauxTc;
  r.n_experts = n_routed_experts;
  r.top_k = num_experts_per_tok;
  r.n_group = n_group;
  r.topk_group = topk_group;
  r.norm_topk_prob = norm_topk_prob;
  r.routed_scaling_factor = static_cast<float>(routed_scaling_factor);
  return r;
}

absl::Status ModelConfig::validate() const {
  auto positive = [](const char* name, int v) -> absl::Status {
    if (v <= 0) return absl::InvalidArgumentError(absl::StrCat("config: '", name, "' must be positive, got ", v));
    return absl::OkStatus();
  };
  R1LAB_RETURN_IF_ERROR(positive("vocab_size", vocab_size));
  R1LAB_RETURN_IF_ERROR(positive("hidden_size", hidden_size));
  R1LAB_RETURN_IF_ERROR(positive("num_hidden_layers", num_hidden_layers));
  R1LAB_RETURN_IF_ERROR(positive("num_attention_heads", num_attention_heads));
  R1LAB_RETURN_IF_ERROR(positive("kv_lora_rank", kv_lora_rank));
  R1LAB_RETURN_IF_ERROR(positive("qk_nope_head_dim", qk_nope_head_dim));
  R1LAB_RETURN_IF_ERROR(positive("qk_rope_head_dim", qk_rope_head_dim));
  R1LAB_RETURN_IF_ERROR(positive("v_head_dim", v_head_dim));
  R1LAB_RETURN_IF_ERROR(positive("max_position_embeddings", max_position_embeddings));
  if (q_lora_rank < 0) return absl::InvalidArgumentError("config: 'q_lora_rank' must be null or positive");
  if (qk_rope_head_dim % 2 != 0)
    return absl::InvalidArgumentError(absl::StrCat("config: 'qk_rope_head_dim' must be even, got ", qk_rope_head_dim));
  if (moe_layer_freq <= 0) return absl::InvalidArgumentError("config: 'moe_layer_freq' must be positive");
  bool any_dense = false;
  for (int l = 0; l < num_hidden_layers; ++l) any_dense |= !is_moe_layer(l);
  if (any_dense) R1LAB_RETURN_IF_ERROR(positive("intermediate_size", intermediate_size));
  if (n_routed_experts > 0) {
    R1LAB_RETURN_IF_ERROR(positive("moe_intermediate_size", moe_intermediate_size));
    R1LAB_RETURN_IF_ERROR(positive("num_experts_per_tok", num_experts_per_tok));
    R1LAB_RETURN_IF_ERROR(positive("n_group", n_group));
    if (n_shared_experts < 0) return absl::InvalidArgumentError("config: 'n_shared_experts' must be >= 0");
    if (num_experts_per_tok > n_routed_experts)
      return absl::InvalidArgumentError(absl::StrCat("config: num_experts_per_tok ", num_experts_per_tok,
                                                     " > n_routed_experts ", n_routed_experts));
    if (n_routed_experts % n_group != 0)
      return absl::InvalidArgumentError(absl::StrCat("config: n_routed_experts ", n_routed_experts,
                                                     " is not divisible by n_group ", n_group));
    if (topk_group < 1 || topk_group > n_group)
      return absl::InvalidArgumentError(absl::StrCat("config: topk_group ", topk_group, " not in [1, n_group]"));
    if (topk_method != "greedy" && n_group > 1 &&
        topk_group * (n_routed_experts / n_group) < num_experts_per_tok)
      return absl::InvalidArgumentError("config: topk_group groups hold fewer experts than num_experts_per_tok");
    if (scoring_func != "sigmoid" && scoring_func != "softmax")
      return absl::InvalidArgumentError(absl::StrCat("config: unknown scoring_func '", scoring_func, "'"));
    if (topk_method != "noaux_tc" && topk_method != "greedy" && topk_method != "group_limited_greedy")
      return absl::InvalidArgumentError(absl::StrCat("config: unknown topk_method '", topk_method, "'"));
  }
  if (rope.type != "default" && rope.type != "yarn")
    return absl::InvalidArgumentError(absl::StrCat("config: rope type '", rope.type, "' is not supported (default, yarn)"));
  if (rope.type == "yarn" && rope.factor <= 0)
    return absl::InvalidArgumentError("config: yarn rope needs a positive 'factor'");
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ModelConfig::from_json(const json& j, const std::string& source) {
  if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  std::string model_type;
  R1LAB_RETURN_IF_ERROR(get(j, "model_type", model_type, source));
  if (!model_type.empty() && model_type != "deepseek_v3" && model_type != "deepseek_v2" &&
      model_type != "r1lab_deepseek")
    return absl::InvalidArgumentError(absl::StrCat(source, ": model_type '", model_type,
                                                   "' is not a DeepSeek-V3-family model"));
  ModelConfig c;
  R1LAB_RETURN_IF_ERROR(get(j, "vocab_size", c.vocab_size, source));
  R1LAB_RETURN_IF_ERROR(get(j, "hidden_size", c.hidden_size, source));
  R1LAB_RETURN_IF_ERROR(get(j, "intermediate_size", c.intermediate_size, source));
  R1LAB_RETURN_IF_ERROR(get(j, "moe_intermediate_size", c.moe_intermediate_size, source));
  R1LAB_RETURN_IF_ERROR(get(j, "num_hidden_layers", c.num_hidden_layers, source));
  R1LAB_RETURN_IF_ERROR(get(j, "first_k_dense_replace", c.first_k_dense_replace, source));
  R1LAB_RETURN_IF_ERROR(get(j, "moe_layer_freq", c.moe_layer_freq, source));
  R1LAB_RETURN_IF_ERROR(get(j, "num_attention_heads", c.num_attention_heads, source));
  int kv_heads = c.num_attention_heads;
  R1LAB_RETURN_IF_ERROR(get(j, "num_key_value_heads", kv_heads, source));
  if (kv_heads != c.num_attention_heads)
    return absl::InvalidArgumentError(absl::StrCat(source, ": num_key_value_heads ", kv_heads,
                                                   " != num_attention_heads (MLA has one latent for all heads)"));
  R1LAB_RETURN_IF_ERROR(get(j, "q_lora_rank", c.q_lora_rank, source));  // null stays 0
  R1LAB_RETURN_IF_ERROR(get(j, "kv_lora_rank", c.kv_lora_rank, source));
  R1LAB_RETURN_IF_ERROR(get(j, "qk_nope_head_dim", c.qk_nope_head_dim, source));
  R1LAB_RETURN_IF_ERROR(get(j, "qk_rope_head_dim", c.qk_rope_head_dim, source));
  R1LAB_RETURN_IF_ERROR(get(j, "v_head_dim", c.v_head_dim, source));
  R1LAB_RETURN_IF_ERROR(get(j, "n_routed_experts", c.n_routed_experts, source));
  R1LAB_RETURN_IF_ERROR(get(j, "n_shared_experts", c.n_shared_experts, source));
  R1LAB_RETURN_IF_ERROR(get(j, "num_experts_per_tok", c.num_experts_per_tok, source));
  R1LAB_RETURN_IF_ERROR(get(j, "n_group", c.n_group, source));
  R1LAB_RETURN_IF_ERROR(get(j, "topk_group", c.topk_group, source));
  R1LAB_RETURN_IF_ERROR(get(j, "routed_scaling_factor", c.routed_scaling_factor, source));
  R1LAB_RETURN_IF_ERROR(get(j, "norm_topk_prob", c.norm_topk_prob, source));
  R1LAB_RETURN_IF_ERROR(get(j, "scoring_func", c.scoring_func, source));
  R1LAB_RETURN_IF_ERROR(get(j, "topk_method", c.topk_method, source));
  R1LAB_RETURN_IF_ERROR(get(j, "max_position_embeddings", c.max_position_embeddings, source));
  R1LAB_RETURN_IF_ERROR(get(j, "rms_norm_eps", c.rms_norm_eps, source));
  R1LAB_RETURN_IF_ERROR(get(j, "rope_interleave", c.rope_interleave, source));
  R1LAB_RETURN_IF_ERROR(get(j, "tie_word_embeddings", c.tie_word_embeddings, source));
  R1LAB_RETURN_IF_ERROR(get(j, "bos_token_id", c.bos_token_id, source));
  auto eos = j.find("eos_token_id");
  if (eos != j.end() && eos->is_array() && !eos->empty() && (*eos)[0].is_number_integer()) {
    c.eos_token_id = (*eos)[0].get<int>();
  } else {
    R1LAB_RETURN_IF_ERROR(get(j, "eos_token_id", c.eos_token_id, source));
  }
  std::string act = "silu";
  R1LAB_RETURN_IF_ERROR(get(j, "hidden_act", act, source));
  if (act != "silu") return absl::InvalidArgumentError(absl::StrCat(source, ": hidden_act '", act, "' (only silu)"));
  bool attention_bias = false;
  R1LAB_RETURN_IF_ERROR(get(j, "attention_bias", attention_bias, source));
  if (attention_bias) return absl::InvalidArgumentError(absl::StrCat(source, ": attention_bias is not supported"));
  // Rope: transformers 5 keeps everything in rope_parameters; the Hub has rope_theta + rope_scaling.
  R1LAB_RETURN_IF_ERROR(get(j, "rope_theta", c.rope.theta, source));
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) continue;
    if (!it->is_object()) return absl::InvalidArgumentError(absl::StrCat(source, ": '", key, "' is not an object"));
    R1LAB_RETURN_IF_ERROR(read_rope(*it, c.rope, source));
  }
  // Hub checkpoints (and the Hub's DeepSeek-V3) predate rope_interleave and use interleaved rope.
  absl::Status st = c.validate();
  if (!st.ok()) return absl::InvalidArgumentError(absl::StrCat(source, ": ", st.message()));
  return c;
}

absl::StatusOr<ModelConfig> ModelConfig::from_file(const std::string& path) {
  std::ifstream f(path);
  if (!f) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << f.rdbuf();
  json j = json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  return from_json(j, path);
}

json ModelConfig::to_json() const {
  json j;
  j["architectures"] = {"DeepseekV3ForCausalLM"};
  j["model_type"] = "deepseek_v3";
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["moe_intermediate_size"] = moe_intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["first_k_dense_replace"] = first_k_dense_replace;
  j["moe_layer_freq"] = moe_layer_freq;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_attention_heads;
  j["q_lora_rank"] = q_lora_rank > 0 ? json(q_lora_rank) : json(nullptr);
  j["kv_lora_rank"] = kv_lora_rank;
  j["qk_nope_head_dim"] = qk_nope_head_dim;
  j["qk_rope_head_dim"] = qk_rope_head_dim;
  j["qk_head_dim"] = qk_head_dim();
  j["head_dim"] = qk_rope_head_dim;
  j["v_head_dim"] = v_head_dim;
  j["n_routed_experts"] = n_routed_experts;
  j["n_shared_experts"] = n_shared_experts;
  j["num_experts_per_tok"] = num_experts_per_tok;
  j["n_group"] = n_group;
  j["topk_group"] = topk_group;
  j["routed_scaling_factor"] = routed_scaling_factor;
  j["norm_topk_prob"] = norm_topk_prob;
  j["scoring_func"] = scoring_func;
  j["topk_method"] = topk_method;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_interleave"] = rope_interleave;
  json rp;
  rp["rope_type"] = rope.type;
  rp["rope_theta"] = rope.theta;
  if (rope.type == "yarn") {
    rp["factor"] = rope.factor;
    if (rope.original_max_position_embeddings > 0)
      rp["original_max_position_embeddings"] = rope.original_max_position_embeddings;
    rp["beta_fast"] = rope.beta_fast;
    rp["beta_slow"] = rope.beta_slow;
    if (rope.mscale != 0) rp["mscale"] = rope.mscale;
    if (rope.mscale_all_dim != 0) rp["mscale_all_dim"] = rope.mscale_all_dim;
    if (rope.attention_factor != 0) rp["attention_factor"] = rope.attention_factor;
  }
  j["rope_parameters"] = rp;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["hidden_act"] = "silu";
  j["attention_bias"] = false;
  j["torch_dtype"] = "float32";
  if (bos_token_id >= 0) j["bos_token_id"] = bos_token_id;
  if (eos_token_id >= 0) j["eos_token_id"] = eos_token_id;
  return j;
}

// inv_freq_i = θ^(-2i/d); YaRN blends interpolated (/factor) and extrapolated frequencies with a linear
// ramp between the beta_fast / beta_slow correction dims, and scales cos/sin by the attention factor.
core::RopeTable make_rope_table(const ModelConfig& cfg, int n_positions) {
  const int d = cfg.qk_rope_head_dim, half = d / 2;
  const RopeConfig& r = cfg.rope;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  double attention_factor = 1.0;
  for (int i = 0; i < half; ++i) inv_freq[i] = 1.0 / std::pow(r.theta, (2.0 * i) / d);
  if (r.type == "yarn") {
    double factor = r.factor;
    double original = cfg.max_position_embeddings;
    if (r.original_max_position_embeddings > 0) {
      original = r.original_max_position_embeddings;
      factor = static_cast<double>(cfg.max_position_embeddings) / original;
    }
    auto get_mscale = [](double scale, double mscale) {
      return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
    };
    if (r.attention_factor != 0) {
      attention_factor = r.attention_factor;
    } else if (r.mscale != 0 && r.mscale_all_dim != 0) {
      attention_factor = get_mscale(factor, r.mscale) / get_mscale(factor, r.mscale_all_dim);
    } else {
      attention_factor = get_mscale(factor, 1.0);
    }
    auto correction_dim = [&](double rotations) {
      return (d * std::log(original / (rotations * 2.0 * M_PI))) / (2.0 * std::log(r.theta));
    };
    double low = correction_dim(r.beta_fast), high = correction_dim(r.beta_slow);
    if (r.truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, static_cast<double>(d - 1));
    if (low == high) high += 0.001;
    for (int i = 0; i < half; ++i) {
      const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
      const double extrapolation = 1.0 - ramp;
      inv_freq[i] = (inv_freq[i] / factor) * (1.0 - extrapolation) + inv_freq[i] * extrapolation;
    }
  }
  core::RopeTable t{core::Tensor::zeros({n_positions, half}), core::Tensor::zeros({n_positions, half})};
  float* c = t.cos.f32();
  float* s = t.sin.f32();
  for (int p = 0; p < n_positions; ++p) {
    for (int i = 0; i < half; ++i) {
      // transformers computes the angle in f32; so do we, then cos/sin in double.
      const float angle = static_cast<float>(inv_freq[i]) * static_cast<float>(p);
      c[p * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)) * attention_factor);
      s[p * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)) * attention_factor);
    }
  }
  return t;
}

}  // namespace r1lab::model
