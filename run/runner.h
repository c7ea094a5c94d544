// `r1lab run`: a whole run from a recipe. The reward service and the rollout worker run as child
// processes of this one (the same r1lab program: serve-reward, serve-rollout), reached over gRPC on
// loopback exactly as at scale; the trainer runs here. Stages: pretrain_base (unless the recipe names a
// base_model), held-out evaluation, GRPO, held-out evaluation. Everything lands in a run directory:
//   RUN_DIR/run.db (the run store), base/ (the base model), policy/ (the trained one), logs of the
//   children (reward.log, rollout.log), rewards.json.
//
// Children live in their own process group (a Ctrl-C in the terminal reaches only the trainer, which
// then stops them in order) and die with the trainer even if it is killed (PR_SET_PDEATHSIG). A child
// that dies is reported by name with its exit status; the store then records the run as failed.
#pragma once

#include <atomic>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "run/recipe.h"

namespace r1lab::run {

struct RunnerOptions {
  std::string program;   // the r1lab executable that serves the children (normally /proc/self/exe)
  bool in_process = false;  // rollout and rewards in this process, no children (tests, debugging)
  bool live = true;         // one progress line rewritten in place (else a line per step)
  std::string run_dir;      // default: recipe.runs_dir/NAME-YYYYmmdd-HHMMSS
};

struct RunResult {
  std::string run_dir, store_path;
  double accuracy_before = 0, accuracy_after = 0;
  bool interrupted = false;
  double seconds_pretrain = 0, seconds_rollout = 0, seconds_reward = 0, seconds_train = 0, seconds_sync = 0,
         seconds_eval = 0, seconds_total = 0;
};

// `stop` (may be null) ends the run early and cleanly: the current step finishes, children shut down,
// the store records "interrupted".
absl::StatusOr<RunResult> run_recipe(const Recipe& recipe, const RunnerOptions& options, const std::atomic<bool>* stop);

}  // namespace r1lab::run
