#include "run/recipe.h"

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/device.h"
#include "data/yaml.h"

namespace r1lab::run {
namespace {

using json = nlohmann::json;

// Reads the keys of one object, remembering which were read; finish() rejects the rest.
class Reader {
 public:
  Reader(const json& obj, std::string path) : obj_(obj), path_(std::move(path)) {}

  absl::Status ok() const { return status_; }

  template <typename T>
  void get(const std::string& key, T& out) {
    seen_.insert(key);
    if (!status_.ok() || !obj_.contains(key) || obj_[key].is_null()) return;
    const json& v = obj_[key];
    bool good;
    if constexpr (std::is_same_v<T, bool>) {
      good = v.is_boolean();
    } else if constexpr (std::is_integral_v<T>) {
      good = v.is_number_integer();
    } else if constexpr (std::is_floating_point_v<T>) {
      good = v.is_number();
    } else {
      good = v.is_string();
    }
    if (!good) {
      status_ = absl::InvalidArgumentError(absl::StrCat("recipe: ", name(key), " should be ", kind<T>(), ", not ", v.dump()));
      return;
    }
    out = v.get<T>();
  }
  const json* object(const std::string& key) {
    seen_.insert(key);
    if (!status_.ok() || !obj_.contains(key) || obj_[key].is_null()) return nullptr;
    if (!obj_[key].is_object()) {
      status_ = absl::InvalidArgumentError(absl::StrCat("recipe: ", name(key), " should be a mapping"));
      return nullptr;
    }
    return &obj_[key];
  }
  const json* raw(const std::string& key) {
    seen_.insert(key);
    return obj_.contains(key) ? &obj_[key] : nullptr;
  }
  void fail(const std::string& key, const std::string& why) {
    if (status_.ok()) status_ = absl::InvalidArgumentError(absl::StrCat("recipe: ", name(key), ": ", why));
  }
  void absorb(const absl::Status& s) {
    if (status_.ok() && !s.ok()) status_ = s;
  }
  absl::Status finish() {
    if (!status_.ok()) return status_;
    for (const auto& [key, value] : obj_.items())
      if (!seen_.count(key)) return absl::InvalidArgumentError(absl::StrCat("recipe: unknown key ", name(key)));
    return absl::OkStatus();
  }

 private:
  std::string name(const std::string& key) const { return path_.empty() ? key : absl::StrCat(path_, ".", key); }
  template <typename T>
  static const char* kind() {
    if constexpr (std::is_same_v<T, bool>) return "true or false";
    else if constexpr (std::is_integral_v<T>) return "an integer";
    else if constexpr (std::is_floating_point_v<T>) return "a number";
    else return "a string";
  }
  const json& obj_;
  std::string path_;
  std::set<std::string> seen_;
  absl::Status status_;
};

absl::Status read_adam(Reader& r, trainer::AdamWConfig& a) {
  r.get("lr", a.lr);
  r.get("warmup_steps", a.warmup_steps);
  r.get("min_lr_ratio", a.min_lr_ratio);
  r.get("weight_decay", a.weight_decay);
  r.get("max_grad_norm", a.max_grad_norm);
  r.get("beta1", a.beta1);
  r.get("beta2", a.beta2);
  return r.ok();
}

}  // namespace

absl::Status apply_overrides(json& doc, const std::vector<std::string>& overrides) {
  if (doc.is_null()) doc = json::object();
  for (const std::string& o : overrides) {
    const size_t eq = o.find('=');
    if (eq == std::string::npos || eq == 0)
      return absl::InvalidArgumentError(absl::StrCat("override '", o, "' is not key=value (e.g. rl.steps=20)"));
    auto value = data::yaml_to_json(o.substr(eq + 1));
    if (!value.ok()) return absl::InvalidArgumentError(absl::StrCat("override '", o, "': ", value.status().message()));
    json* at = &doc;
    std::vector<std::string> parts = absl::StrSplit(o.substr(0, eq), '.');
    for (size_t i = 0; i < parts.size(); ++i) {
      if (parts[i].empty()) return absl::InvalidArgumentError(absl::StrCat("override '", o, "': empty key part"));
      if (at->is_null()) *at = json::object();
      if (!at->is_object()) return absl::InvalidArgumentError(absl::StrCat("override '", o, "': not under a mapping"));
      at = &(*at)[parts[i]];
    }
    *at = *std::move(value);
  }
  return absl::OkStatus();
}

absl::StatusOr<Recipe> recipe_from_json(const json& doc) {
  if (!doc.is_object()) return absl::InvalidArgumentError("recipe: the document should be a mapping");
  Recipe r;
  r.source = doc;
  Reader top(doc, "");
  top.get("name", r.name);
  top.get("task", r.task.task);
  top.get("runs_dir", r.runs_dir);
  top.get("base_model", r.base_model);
  top.get("rollout_cache_mb", r.rollout_cache_mb);
  top.get("rollout_rescore_logprobs", r.rollout_rescore_logprobs);
  std::string latents(model::latent_format_name(r.rollout_latents));
  top.get("rollout_latents", latents);
  if (auto lf = model::latent_format_from_name(latents); lf.ok()) {
    r.rollout_latents = *lf;
  } else {
    top.fail("rollout_latents", std::string(lf.status().message()));
  }
  top.get("device", r.device);
  top.get("gemm", r.gemm);
  std::string recompute(model::recompute_name(r.recompute));
  top.get("recompute", recompute);
  if (auto rc = model::recompute_from_name(recompute); rc.ok()) {
    r.recompute = r.pretrain.recompute = *rc;
  } else {
    top.fail("recompute", std::string(rc.status().message()));
  }
  top.get("rollout_device", r.rollout_device);
  if (!r.rollout_device.empty())
    if (auto st = core::check_device_names(r.rollout_device, "f32"); !st.ok())
      top.fail("rollout_device", std::string(st.message()));
  if (auto st = core::check_device_names(r.device, "f32"); !st.ok()) top.fail("device", std::string(st.message()));
  if (auto st = core::check_device_names("cpu", r.gemm); !st.ok()) top.fail("gemm", std::string(st.message()));
  if (const json* o = top.object("task_options")) {
    Reader t(*o, "task_options");
    t.get("min_digits", r.task.options.arithmetic.min_digits);
    t.get("max_digits", r.task.options.arithmetic.max_digits);
    t.get("ops", r.task.options.arithmetic.ops);
    t.get("min_numbers", r.task.options.countdown.min_count);
    t.get("max_numbers", r.task.options.countdown.max_count);
    t.get("max_number", r.task.options.countdown.max_number);
    t.get("max_target", r.task.options.countdown.max_target);
    top.absorb(t.finish());
    const auto& a = r.task.options.arithmetic;
    if (a.min_digits < 1 || a.max_digits < a.min_digits || a.max_digits > 9)
      top.fail("task_options", "digits must satisfy 1 <= min_digits <= max_digits <= 9");
    if (a.ops.empty() || a.ops.find_first_not_of("+-*") != std::string::npos)
      top.fail("task_options.ops", "a non-empty string of + - *");
  }
  if (const json* o = top.object("seeds")) {
    Reader s(*o, "seeds");
    s.get("base", r.task.base_seed);
    s.get("train", r.task.train_seed);
    s.get("eval", r.task.eval_seed);
    s.get("init", r.pretrain.seed);
    top.absorb(s.finish());
  }
  if (const json* o = top.object("model")) {
    Reader m(*o, "model");
    TinyModelOptions& t = r.pretrain.model;
    m.get("hidden", t.hidden);
    m.get("layers", t.layers);
    m.get("heads", t.heads);
    m.get("q_lora_rank", t.q_lora_rank);
    m.get("kv_lora_rank", t.kv_lora_rank);
    m.get("qk_nope_head_dim", t.qk_nope_head_dim);
    m.get("qk_rope_head_dim", t.qk_rope_head_dim);
    m.get("v_head_dim", t.v_head_dim);
    m.get("intermediate", t.intermediate);
    m.get("moe_intermediate", t.moe_intermediate);
    m.get("routed_experts", t.routed_experts);
    m.get("shared_experts", t.shared_experts);
    m.get("experts_per_token", t.experts_per_token);
    m.get("groups", t.groups);
    m.get("topk_groups", t.topk_groups);
    m.get("max_positions", t.max_positions);
    top.absorb(m.finish());
  }
  if (const json* o = top.object("pretrain")) {
    Reader p(*o, "pretrain");
    p.get("steps", r.pretrain.steps);
    p.get("batch", r.pretrain.batch);
    p.get("micro_batch", r.pretrain.micro_batch);
    p.get("slip_fraction", r.pretrain.slip_fraction);
    top.absorb(read_adam(p, r.pretrain.adam));
    top.absorb(p.finish());
    if (r.pretrain.steps < 0 || r.pretrain.batch < 1 || r.pretrain.micro_batch < 1)
      top.fail("pretrain", "steps >= 0, batch >= 1 and micro_batch >= 1");
  }
  if (const json* o = top.object("rl")) {
    Reader p(*o, "rl");
    RlOptions& rl = r.rl;
    p.get("steps", rl.steps);
    p.get("prompts_per_step", rl.prompts_per_step);
    p.get("group_size", rl.group_size);
    p.get("max_new_tokens", rl.max_new_tokens);
    p.get("temperature", rl.temperature);
    p.get("micro_batch", rl.micro_batch);
    p.get("kl_beta", rl.grpo.kl_beta);
    p.get("clip_eps_low", rl.grpo.clip_eps_low);
    p.get("clip_eps_high", rl.grpo.clip_eps_high);
    p.get("log_samples", rl.log_samples);
    std::string agg = "sequence_mean", adv = "grpo", old_lp = "policy";
    p.get("loss_aggregation", agg);
    p.get("advantage", adv);
    p.get("old_logprobs", old_lp);
    if (old_lp == "policy") rl.grpo.old = trainer::GrpoConfig::Old::kPolicy;
    else if (old_lp == "sampler") rl.grpo.old = trainer::GrpoConfig::Old::kSampler;
    else p.fail("old_logprobs", "policy (the trainer's own, ratio exactly 1) or sampler (the rollout's)");
    if (agg == "sequence_mean") rl.grpo.aggregation = trainer::GrpoConfig::Aggregation::kSequenceMean;
    else if (agg == "token_mean") rl.grpo.aggregation = trainer::GrpoConfig::Aggregation::kTokenMean;
    else p.fail("loss_aggregation", "sequence_mean or token_mean");
    if (adv == "grpo") rl.scale_by_std = true;
    else if (adv == "dr_grpo") rl.scale_by_std = false;
    else p.fail("advantage", "grpo (mean and std of the group) or dr_grpo (mean only)");
    top.absorb(read_adam(p, rl.adam));
    top.absorb(p.finish());
    if (rl.steps < 0 || rl.prompts_per_step < 1 || rl.group_size < 2 || rl.max_new_tokens < 1 || rl.micro_batch < 1 ||
        rl.temperature <= 0)
      top.fail("rl", "steps >= 0, prompts_per_step >= 1, group_size >= 2, max_new_tokens >= 1, micro_batch >= 1, "
                     "temperature > 0");
  }
  if (const json* o = top.object("eval")) {
    Reader e(*o, "eval");
    e.get("problems", r.eval.problems);
    e.get("samples", r.eval.samples);
    e.get("temperature", r.eval.temperature);
    e.get("max_new_tokens", r.eval.max_new_tokens);
    e.get("every", r.eval.every);
    top.absorb(e.finish());
    if (r.eval.problems < 1 || r.eval.samples < 1 || r.eval.every < 0)
      top.fail("eval", "problems >= 1, samples >= 1, every >= 0");
  }
  r.reward_spec = json::array({{{"name", "format"}, {"weight", 0.1}}, {{"name", "answer_match"}, {"weight", 1.0}}});
  if (const json* o = top.object("reward")) {
    Reader w(*o, "reward");
    w.get("name", r.reward_name);
    if (const json* rules = w.raw("rules")) {
      if (!rules->is_array() || rules->empty()) w.fail("rules", "a non-empty list of {name, weight, params}");
      else r.reward_spec = *rules;
    }
    if (const json* plugins = w.raw("plugins")) {
      if (!plugins->is_array()) w.fail("plugins", "a list of {yaml: FILE} | {library: FILE.so} | {server: HOST:PORT}");
      else r.reward_plugins = *plugins;
    }
    top.absorb(w.finish());
  }
  if (auto st = top.finish(); !st.ok()) return st;
  return r;
}

absl::StatusOr<Recipe> load_recipe(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open recipe ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  auto doc = data::yaml_to_json(ss.str());
  if (!doc.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", doc.status().message()));
  if (auto st = apply_overrides(*doc, overrides); !st.ok()) return st;
  auto r = recipe_from_json(*doc);
  if (!r.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", r.status().message()));
  // Plugin files are found relative to the recipe, wherever the run starts the reward service.
  const std::filesystem::path dir = std::filesystem::absolute(path).parent_path();
  for (json& p : r->reward_plugins)
    for (const char* key : {"yaml", "library"})
      if (p.is_object() && p.contains(key) && p[key].is_string() && !p[key].get<std::string>().empty() &&
          p[key].get<std::string>()[0] != '/')
        p[key] = (dir / p[key].get<std::string>()).lexically_normal().string();
  return r;
}

}  // namespace r1lab::run
