// The R1-Zero loop (GRPO): each step samples a group of completions for a batch of training prompts
// from the rollout worker, scores them with the reward service, normalises rewards within each group,
// takes one GRPO step (k3 KL to the frozen reference), and pushes the new weights to the worker as the
// next policy version. Every step's metrics, and a few completions, go to the run store.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <string>

#include "model/model.h"
#include "rewards/service.h"
#include "rollout/client.h"
#include "run/recipe.h"
#include "run/store.h"

namespace r1lab::run {

struct RlStepReport {
  int64_t step = 0;
  std::map<std::string, double> metrics;  // what the store records for the step
};

struct RlContext {
  model::Model* policy = nullptr;     // trained in place
  model::Model* reference = nullptr;  // frozen; may be null when kl_beta is 0
  rollout::RolloutClient* rollout = nullptr;
  rewards::RewardClient* rewards = nullptr;
  RunStore* store = nullptr;  // optional
  const std::atomic<bool>* stop = nullptr;  // optional: set to end after the current step
  std::function<void(const RlStepReport&)> on_step;
  // Where the policy ends up (a Hugging Face directory, with tokenizer.json, the optimizer's state and
  // trainer_state.json {"rl_steps": N}), also after an early stop. Empty: not saved.
  std::string save_dir;
  // Called every eval.every steps (and never when it is 0) with the step count done.
  std::function<absl::Status(int64_t step)> on_eval;
};

// Runs recipe.rl.steps GRPO steps. Stops early (OK) when *stop becomes true; returns the first error of
// a part (the worker, the reward service, the store).
absl::Status grpo(const Recipe& recipe, const RlContext& ctx);

}  // namespace r1lab::run
