#include "run/rl.h"

#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "data/tasks.h"
#include "data/tokenizer.h"
#include "model/safetensors.h"
#include "trainer/policy.h"

namespace r1lab::run {
namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

}  // namespace

absl::Status grpo(const Recipe& recipe, const RlContext& ctx) {
  CHECK(ctx.policy && ctx.rollout && ctx.rewards);
  const RlOptions& o = recipe.rl;
  if (o.grpo.kl_beta > 0 && ctx.reference == nullptr)
    return absl::InvalidArgumentError("rl: kl_beta > 0 needs a reference model");
  const data::Tokenizer tok = data::Tokenizer::builtin();
  if (tok.size() != ctx.policy->config().vocab_size)
    return absl::InvalidArgumentError(absl::StrCat("rl: the built-in tokenizer has ", tok.size(),
                                                   " tokens, the model's vocabulary ", ctx.policy->config().vocab_size));
  trainer::AdamWConfig adam = o.adam;
  adam.total_steps = o.steps;
  trainer::AdamW opt(ctx.policy->params(), adam);
  const int g = o.group_size;
  int64_t steps_done = 0;
  auto save = [&]() -> absl::Status {
    if (ctx.save_dir.empty()) return absl::OkStatus();
    if (auto s = ctx.policy->save(ctx.save_dir); !s.ok()) return s;
    if (auto s = tok.save(ctx.save_dir + "/tokenizer.json"); !s.ok()) return s;
    if (auto s = opt.save(ctx.save_dir + "/optimizer.safetensors"); !s.ok()) return s;
    return model::write_file_atomic(ctx.save_dir + "/trainer_state.json",
                                    absl::StrCat("{\"rl_steps\": ", steps_done, "}\n"));
  };
  for (int64_t step = 0; step < o.steps; ++step) {
    if (ctx.stop && ctx.stop->load()) break;
    const auto t_step = Clock::now();
    auto problems = data::make_problems(recipe.task.task, recipe.task.train_seed, step * o.prompts_per_step,
                                        o.prompts_per_step, recipe.task.options);
    if (!problems.ok()) return problems.status();
    // 1. Rollout.
    rollout::SamplingParams sp;
    sp.temperature = static_cast<float>(o.temperature);
    sp.max_new_tokens = o.max_new_tokens;
    sp.seed = recipe.task.train_seed * 1000003u + static_cast<uint64_t>(step);
    sp.logprobs = true;
    const auto t_roll = Clock::now();
    auto sampled = sample(*ctx.rollout, tok, *problems, g, sp);
    if (!sampled.ok())
      return absl::Status(sampled.status().code(), absl::StrCat("rollout: ", sampled.status().message()));
    const double rollout_s = since(t_roll);
    const std::vector<rollout::Completion>& done = sampled->completions;
    const std::vector<std::string>& texts = sampled->texts;
    // 2. Rewards.
    const auto t_rew = Clock::now();
    std::vector<int64_t> tokens;
    for (const rollout::Completion& c : done) tokens.push_back(static_cast<int64_t>(c.tokens.size()));
    auto scored = score(*ctx.rewards, recipe.reward_name, *problems, g, texts, tokens);
    if (!scored.ok()) return absl::Status(scored.status().code(), absl::StrCat("reward: ", scored.status().message()));
    const double reward_s = since(t_rew);
    std::vector<double> rewards;
    double correct = 0, formatted = 0, stopped = 0;
    for (size_t i = 0; i < scored->size(); ++i) {
      rewards.push_back((*scored)[i].reward);
      correct += (*scored)[i].correct;
      formatted += (*scored)[i].formatted;
      stopped += done[i].finish_reason == rollout::FinishReason::kStop;
    }
    const std::vector<float> adv = trainer::group_advantages(rewards, g, o.scale_by_std);
    // 3. Training batch: prompt + completion, the sampler's logprobs, the reference's.
    std::vector<trainer::TrainSequence> batch;
    int64_t informative_groups = 0;
    for (size_t i = 0; i < done.size(); ++i) {
      const rollout::Completion& c = done[i];
      if (i % static_cast<size_t>(g) == 0) {
        bool any = false;
        for (int k = 0; k < g; ++k) any |= adv[i + static_cast<size_t>(k)] != 0.0f;
        informative_groups += any;
      }
      if (c.tokens.empty()) continue;
      trainer::TrainSequence s;
      s.tokens = sampled->prompts[i / static_cast<size_t>(g)];
      s.prompt_len = static_cast<int32_t>(s.tokens.size());
      s.tokens.insert(s.tokens.end(), c.tokens.begin(), c.tokens.end());
      s.old_logprobs = c.logprobs;
      s.advantage = adv[i];
      batch.push_back(std::move(s));
    }
    const auto t_train = Clock::now();
    if (o.grpo.kl_beta > 0) {
      auto ref = trainer::completion_logprobs(*ctx.reference, batch, o.micro_batch);
      for (size_t i = 0; i < batch.size(); ++i) batch[i].ref_logprobs = std::move(ref[i]);
    }
    const trainer::GrpoStepStats st = trainer::grpo_step(*ctx.policy, opt, o.grpo, batch, o.micro_batch);
    const double train_s = since(t_train);
    // 4. The worker samples the next step from the new weights.
    const auto t_sync = Clock::now();
    if (auto s = ctx.rollout->publish_weights(step + 1, *ctx.policy); !s.ok())
      return absl::Status(s.code(), absl::StrCat("rollout: weight update: ", s.message()));
    const double sync_s = since(t_sync);
    steps_done = step + 1;

    const double n = static_cast<double>(rewards.size());
    double mean = 0, var = 0;
    for (double r : rewards) mean += r / n;
    for (double r : rewards) var += (r - mean) * (r - mean) / n;
    RlStepReport rep;
    rep.step = step + 1;
    rep.metrics = {{"reward_mean", mean},
                   {"reward_std", std::sqrt(var)},
                   {"accuracy", correct / n},
                   {"format_rate", formatted / n},
                   {"response_length", static_cast<double>(sampled->tokens) / n},
                   {"stop_rate", stopped / n},
                   {"kl", st.kl},
                   {"entropy", st.entropy},
                   {"clip_fraction", st.clip_fraction},
                   {"ratio", st.ratio},
                   {"logprob_gap_max", st.logprob_gap_max},
                   {"logprob_gap_mean", st.logprob_gap_mean},
                   {"loss", st.loss},
                   {"grad_norm", st.opt.grad_norm},
                   {"lr", st.opt.lr},
                   {"informative_groups", static_cast<double>(informative_groups) / static_cast<double>(problems->size())},
                   {"rollout_seconds", rollout_s},
                   {"reward_seconds", reward_s},
                   {"train_seconds", train_s},
                   {"sync_seconds", sync_s},
                   {"step_seconds", since(t_step)},
                   {"rollout_tokens_per_second", rollout_s > 0 ? static_cast<double>(sampled->tokens) / rollout_s : 0.0}};
    if (ctx.store) {
      if (auto s = ctx.store->log_metrics("rl", rep.step, rep.metrics); !s.ok()) return s;
      std::vector<SampleRow> rows;
      for (int i = 0; i < o.log_samples && i < static_cast<int>(texts.size()); ++i) {
        // One sample from each of the first groups.
        const size_t k = static_cast<size_t>(i) * static_cast<size_t>(g) % texts.size();
        const data::Problem& p = (*problems)[k / static_cast<size_t>(g)];
        rows.push_back({p.question, texts[k], p.answer, rewards[k], (*scored)[k].correct});
      }
      if (auto s = ctx.store->log_samples("rl", rep.step, rows); !s.ok()) return s;
    }
    if (ctx.on_step) ctx.on_step(rep);
    if (ctx.on_eval && recipe.eval.every > 0 && rep.step % recipe.eval.every == 0 && rep.step != o.steps)
      if (auto s = ctx.on_eval(rep.step); !s.ok()) return s;
  }
  return save();
}

}  // namespace r1lab::run
