// The stages of a reasoning-RL run, as functions over the real parts (model, trainer, rollout and reward
// clients), so `r1lab run` and the tests drive the same code:
//   - pretrain_base: trains the built-in tiny DeepSeek-V3-family model from scratch on worked solutions
//     in the R1 format, a fraction of them with a slip, so the base is right only part of the time;
//   - evaluate: held-out accuracy, format rate and length of sampled completions;
//   - grpo (rl.h): the R1-Zero loop.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "data/tasks.h"
#include "data/tokenizer.h"
#include "model/config.h"
#include "rewards/service.h"
#include "rollout/client.h"
#include "trainer/optimizer.h"
#include "trainer/policy.h"

namespace r1lab::run {

// The built-in model: small enough to train on two CPU cores in minutes, with every part of the
// DeepSeek-V3 family (MLA with query and KV compression, a dense first layer, then routed + shared
// experts under the sigmoid router with group-limited top-k).
struct TinyModelOptions {
  int hidden = 64;
  int layers = 2;
  int heads = 4;
  int q_lora_rank = 48;
  int kv_lora_rank = 32;
  int qk_nope_head_dim = 16, qk_rope_head_dim = 8, v_head_dim = 16;
  int intermediate = 128;
  int moe_intermediate = 32;
  int routed_experts = 8, shared_experts = 1, experts_per_token = 2, groups = 2, topk_groups = 1;
  int max_positions = 128;
};
model::ModelConfig tiny_config(const TinyModelOptions& o, const data::Tokenizer& tok);

struct TaskSpec {
  std::string task = "arithmetic";
  data::TaskOptions options;
  uint64_t base_seed = 1;  // pretraining problems
  uint64_t train_seed = 2;  // RL prompts
  uint64_t eval_seed = 3;   // held-out problems
};

struct PretrainOptions {
  TinyModelOptions model;
  int64_t steps = 600;
  int batch = 32;
  int micro_batch = 32;
  double slip_fraction = 0.5;  // worked solutions with a slip (wrong, consistently)
  trainer::AdamWConfig adam;
  uint64_t seed = 7;
  model::Recompute recompute = model::Recompute::kNone;  // the recipe's `recompute`
};

// <|bos|> then the R1-Zero prompt of a problem: what the policy is sampled from.
absl::StatusOr<std::vector<int32_t>> prompt_ids(const data::Tokenizer& tok, const data::Problem& p);

// One training example: the R1-Zero prompt of a problem and a worked solution, then <|eos|>.
absl::StatusOr<trainer::TrainSequence> worked_example(const data::Tokenizer& tok, const data::Problem& p, bool slip,
                                                      uint64_t seed);

using SftProgress = std::function<void(int64_t step, const trainer::SftStepStats& stats, double seconds)>;

// Trains from random initialisation on `backend` and writes config.json, model.safetensors and
// tokenizer.json. `stop` (may be null) ends training early (nothing is written then).
absl::Status pretrain_base(core::Backend& backend, const TaskSpec& task, const PretrainOptions& o,
                           const std::string& out_dir, const SftProgress& progress = nullptr,
                           const std::atomic<bool>* stop = nullptr);

// Rewards of sampled completions of problems: what the reward service says, plus the parts a run logs.
struct Scored {
  double reward = 0;
  bool correct = false;       // the answer component is 1
  bool formatted = false;     // the format component is 1
};
// The reward service's scores of completion texts of problems (sample i is of problems[i / per_problem]).
// completion_tokens (empty, or one per completion) reaches the rewards as meta "completion_tokens".
absl::StatusOr<std::vector<Scored>> score(rewards::RewardClient& rewards, const std::string& reward,
                                          const std::vector<data::Problem>& problems, int per_problem,
                                          const std::vector<std::string>& completions,
                                          const std::vector<int64_t>& completion_tokens = {});

// Completions of problems' R1-Zero prompts, `per_problem` each: sample i is of problems[i / per_problem].
struct Sampled {
  std::vector<std::vector<int32_t>> prompts;  // per problem
  std::vector<rollout::Completion> completions;
  std::vector<std::string> texts;  // decoded completions
  int64_t tokens = 0;              // generated, in all
};
absl::StatusOr<Sampled> sample(rollout::RolloutClient& rollout, const data::Tokenizer& tok,
                               const std::vector<data::Problem>& problems, int per_problem,
                               const rollout::SamplingParams& params);

struct EvalResult {
  double accuracy = 0, format_rate = 0, mean_length = 0;
  int64_t samples = 0;
};
// Samples `per_problem` completions of each problem's R1-Zero prompt and scores them.
absl::StatusOr<EvalResult> evaluate(rollout::RolloutClient& rollout, rewards::RewardClient& rewards,
                                    const std::string& reward, const data::Tokenizer& tok,
                                    const std::vector<data::Problem>& problems, int per_problem,
                                    const rollout::SamplingParams& params);

}  // namespace r1lab::run
