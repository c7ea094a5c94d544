// A run's recipe: a YAML file (recipes/*.yaml) with `key=value` overrides from the command line (dotted
// keys: rl.steps=20, pretrain.lr=3e-3). Every key is checked: an unknown one (a typo) or a value of the
// wrong type is an error naming it, never silently ignored.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "data/yaml.h"
#include "model/latent_cache.h"
#include "nlohmann/json.hpp"
#include "run/stages.h"
#include "trainer/grpo.h"

namespace r1lab::run {

struct RlOptions {
  int64_t steps = 60;
  int prompts_per_step = 16;
  int group_size = 8;
  int max_new_tokens = 48;
  double temperature = 1.0;
  int micro_batch = 64;
  // rl.old_logprobs picks grpo.old: "policy" (default; the trainer's own logprobs, so the ratio is
  // exactly 1) or "sampler" (the rollout's returned logprobs).
  trainer::GrpoConfig grpo = [] {
    trainer::GrpoConfig c;
    c.old = trainer::GrpoConfig::Old::kPolicy;
    return c;
  }();
  bool scale_by_std = true;  // false: Dr. GRPO advantages
  trainer::AdamWConfig adam;
  int log_samples = 4;        // completions stored per step
};

struct EvalOptions {
  int problems = 200;
  int samples = 4;  // per problem
  double temperature = 1.0;
  int max_new_tokens = 48;
  int every = 0;  // RL steps between held-out evaluations (0: before and after only)
};

struct Recipe {
  std::string name = "run";
  TaskSpec task;
  PretrainOptions pretrain;
  RlOptions rl;
  EvalOptions eval;
  std::string reward_name = "r1";
  nlohmann::json reward_spec;  // [{"name": rule, "weight": w, "params": {...}}, ...]
  // Reward plugins (rewards/plugins.h): [{"yaml": FILE} | {"library": FILE.so} | {"server": HOST:PORT}],
  // file paths made absolute (relative to the recipe file) by load_recipe.
  nlohmann::json reward_plugins = nlohmann::json::array();
  std::string runs_dir = "runs";
  std::string base_model;  // a model directory to start from instead of pretrain_base
  int64_t rollout_cache_mb = 64;
  // How the rollout's latent cache keeps its rows (model/latent_cache.h): auto, f32, bf16 or fp8.
  model::LatentFormat rollout_latents = model::LatentFormat::kAuto;
  // The rollout's logprobs from the trainer's forward over each completion (rollout::EngineOptions::
  // rescore_logprobs): with rl.old_logprobs: sampler, GRPO's ratio then starts at exactly 1 where that
  // forward is batch-invariant (the CPU backend).
  bool rollout_rescore_logprobs = false;
  // Where the trainer, the rollout worker and pretrain_base run (core/device.h): cpu, cuda or cuda:N,
  // and the GPU's matrix-product precision (f32, tf32, bf16, or bf16_invariant: bf16 products whose rows
  // do not depend on their batch, so that rescored rollout logprobs equal the trainer's bit for bit).
  std::string device = "cpu";
  std::string gemm = "bf16";
  // What training forwards keep for backward (`recompute`: none, selective or layers): less memory for
  // more time a step, the same gradients in every mode. pretrain.recompute follows it.
  model::Recompute recompute = model::Recompute::kNone;
  // The rollout worker's device when it differs (empty: `device`). On a GPU other than the trainer's,
  // each new policy version reaches the worker by NCCL broadcast, GPU to GPU; otherwise over gRPC.
  std::string rollout_device;
  nlohmann::json source;   // the resolved recipe, as stored with the run

  // The rewards file serve-reward takes: {reward_name: reward_spec}.
  nlohmann::json rewards_file() const {
    nlohmann::json f = {{reward_name, reward_spec}};
    if (!reward_plugins.empty()) f["plugins"] = reward_plugins;
    return f;
  }
};

// Applies "a.b.c=value" overrides (value read as a YAML scalar or flow collection).
absl::Status apply_overrides(nlohmann::json& doc, const std::vector<std::string>& overrides);
absl::StatusOr<Recipe> recipe_from_json(const nlohmann::json& doc);
absl::StatusOr<Recipe> load_recipe(const std::string& path, const std::vector<std::string>& overrides);

}  // namespace r1lab::run
