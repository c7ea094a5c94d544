#include "run/stages.h"

#include <chrono>
#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "core/backend.h"
#include "model/model.h"

namespace r1lab::run {

model::ModelConfig tiny_config(const TinyModelOptions& o, const data::Tokenizer& tok) {
  model::ModelConfig c;
  c.vocab_size = tok.size();
  c.hidden_size = o.hidden;
  c.intermediate_size = o.intermediate;
  c.moe_intermediate_size = o.moe_intermediate;
  c.num_hidden_layers = o.layers;
  c.first_k_dense_replace = o.layers > 1 ? 1 : 0;
  c.num_attention_heads = o.heads;
  c.q_lora_rank = o.q_lora_rank;
  c.kv_lora_rank = o.kv_lora_rank;
  c.qk_nope_head_dim = o.qk_nope_head_dim;
  c.qk_rope_head_dim = o.qk_rope_head_dim;
  c.v_head_dim = o.v_head_dim;
  c.n_routed_experts = o.routed_experts;
  c.n_shared_experts = o.shared_experts;
  c.num_experts_per_tok = o.experts_per_token;
  c.n_group = o.groups;
  c.topk_group = o.topk_groups;
  c.routed_scaling_factor = 1.0;
  c.max_position_embeddings = o.max_positions;
  c.bos_token_id = tok.bos();
  c.eos_token_id = tok.eos();
  return c;
}

absl::StatusOr<std::vector<int32_t>> prompt_ids(const data::Tokenizer& tok, const data::Problem& p) {
  auto ids = tok.encode(data::r1_zero_prompt(p.question));
  if (!ids.ok()) return ids.status();
  ids->insert(ids->begin(), tok.bos());
  return ids;
}

absl::StatusOr<trainer::TrainSequence> worked_example(const data::Tokenizer& tok, const data::Problem& p, bool slip,
                                                      uint64_t seed) {
  auto solution = data::worked_solution(p, slip, seed);
  if (!solution.ok()) return solution.status();
  auto prompt = prompt_ids(tok, p);
  if (!prompt.ok()) return prompt.status();
  auto completion = tok.encode(*solution);
  if (!completion.ok()) return completion.status();
  trainer::TrainSequence s;
  s.tokens = *std::move(prompt);
  s.prompt_len = static_cast<int32_t>(s.tokens.size());
  s.tokens.insert(s.tokens.end(), completion->begin(), completion->end());
  s.tokens.push_back(tok.eos());
  return s;
}

absl::Status pretrain_base(core::Backend& backend, const TaskSpec& task, const PretrainOptions& o,
                           const std::string& out_dir, const SftProgress& progress, const std::atomic<bool>* stop) {
  if (o.steps <= 0 || o.batch <= 0 || o.micro_batch <= 0)
    return absl::InvalidArgumentError("pretrain_base: steps, batch and micro_batch must be positive");
  if (o.slip_fraction < 0 || o.slip_fraction > 1)
    return absl::InvalidArgumentError("pretrain_base: slip_fraction must be in [0, 1]");
  const data::Tokenizer tok = data::Tokenizer::builtin();
  const model::ModelConfig cfg = tiny_config(o.model, tok);
  if (auto st = cfg.validate(); !st.ok()) return st;
  model::Model m(cfg, backend);
  m.init_random(o.seed, 0.02f);
  m.set_recompute(o.recompute);
  trainer::AdamWConfig adam = o.adam;
  adam.total_steps = o.steps;
  trainer::AdamW opt(m.params(), adam);
  std::mt19937_64 rng(o.seed);
  std::bernoulli_distribution slip(o.slip_fraction);
  const auto t0 = std::chrono::steady_clock::now();
  int64_t next_problem = 0;
  for (int64_t step = 0; step < o.steps; ++step) {
    if (stop && stop->load()) return absl::OkStatus();
    auto problems = data::make_problems(task.task, task.base_seed, next_problem, o.batch, task.options);
    if (!problems.ok()) return problems.status();
    next_problem += o.batch;
    std::vector<trainer::TrainSequence> batch;
    for (const data::Problem& p : *problems) {
      auto ex = worked_example(tok, p, slip(rng), rng());
      if (!ex.ok()) return ex.status();
      if (static_cast<int>(ex->tokens.size()) > cfg.max_position_embeddings)
        return absl::InvalidArgumentError(absl::StrCat("pretrain_base: an example of ", ex->tokens.size(),
                                                       " tokens exceeds the model's ", cfg.max_position_embeddings));
      batch.push_back(*std::move(ex));
    }
    const trainer::SftStepStats st = trainer::sft_step(m, opt, batch, o.micro_batch);
    if (progress)
      progress(step, st, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (auto st = m.save(out_dir); !st.ok()) return st;
  return tok.save(out_dir + "/tokenizer.json");
}

absl::StatusOr<std::vector<Scored>> score(rewards::RewardClient& rewards, const std::string& reward,
                                          const std::vector<data::Problem>& problems, int per_problem,
                                          const std::vector<std::string>& completions,
                                          const std::vector<int64_t>& completion_tokens) {
  if (completions.size() != problems.size() * static_cast<size_t>(per_problem))
    return absl::InternalError(absl::StrCat(completions.size(), " completions for ", problems.size(), " problems x ",
                                            per_problem));
  std::vector<rewards::Sample> samples;
  samples.reserve(completions.size());
  for (size_t i = 0; i < completions.size(); ++i) {
    const data::Problem& p = problems[i / static_cast<size_t>(per_problem)];
    samples.push_back({data::r1_zero_prompt(p.question), completions[i], p.answer, p.task, p.meta});
    if (i < completion_tokens.size()) {
      if (!samples.back().meta.is_object()) samples.back().meta = nlohmann::json::object();
      samples.back().meta["completion_tokens"] = completion_tokens[i];
    }
  }
  auto scores = rewards.score(reward, samples);
  if (!scores.ok()) return scores.status();
  std::vector<Scored> out;
  for (const rewards::Score& s : *scores) {
    Scored x;
    x.reward = s.value;
    for (const char* answer_rule : {"answer_match", "countdown", "math", "choice", "code"}) {
      auto it = s.components.find(answer_rule);
      if (it != s.components.end() && it->second >= 1.0) x.correct = true;
    }
    auto f = s.components.find("format");
    x.formatted = f != s.components.end() && f->second >= 1.0;
    out.push_back(x);
  }
  return out;
}

absl::StatusOr<Sampled> sample(rollout::RolloutClient& rollout, const data::Tokenizer& tok,
                               const std::vector<data::Problem>& problems, int per_problem,
                               const rollout::SamplingParams& params) {
  Sampled out;
  std::vector<rollout::GroupRequest> groups;
  for (const data::Problem& p : problems) {
    auto ids = prompt_ids(tok, p);
    if (!ids.ok()) return ids.status();
    rollout::GroupRequest g;
    g.prompt = *std::move(ids);
    g.num_samples = per_problem;
    g.params = params;
    // Each problem its own random streams: with one seed for all, every problem's sample i would draw
    // the same numbers at the same token, and one unlucky draw would sway the whole batch at once.
    g.params.seed = rollout::sample_seed(params.seed, static_cast<int64_t>(groups.size()));
    out.prompts.push_back(g.prompt);
    groups.push_back(std::move(g));
  }
  auto done = rollout.generate_all(std::move(groups));
  if (!done.ok()) return done.status();
  out.completions = *std::move(done);
  for (const rollout::Completion& c : out.completions) {
    auto text = tok.decode(c.tokens);
    if (!text.ok()) return text.status();
    out.texts.push_back(*std::move(text));
    out.tokens += static_cast<int64_t>(c.tokens.size());
  }
  return out;
}

absl::StatusOr<EvalResult> evaluate(rollout::RolloutClient& rollout, rewards::RewardClient& rewards,
                                    const std::string& reward, const data::Tokenizer& tok,
                                    const std::vector<data::Problem>& problems, int per_problem,
                                    const rollout::SamplingParams& params) {
  rollout::SamplingParams p = params;
  p.logprobs = false;
  auto sampled = sample(rollout, tok, problems, per_problem, p);
  if (!sampled.ok()) return sampled.status();
  std::vector<int64_t> tokens;
  for (const rollout::Completion& c : sampled->completions) tokens.push_back(static_cast<int64_t>(c.tokens.size()));
  auto scored = score(rewards, reward, problems, per_problem, sampled->texts, tokens);
  if (!scored.ok()) return scored.status();
  EvalResult r;
  for (const Scored& s : *scored) {
    r.accuracy += s.correct;
    r.format_rate += s.formatted;
  }
  r.samples = static_cast<int64_t>(scored->size());
  if (r.samples > 0) {
    r.accuracy /= static_cast<double>(r.samples);
    r.format_rate /= static_cast<double>(r.samples);
    r.mean_length = static_cast<double>(sampled->tokens) / static_cast<double>(r.samples);
  }
  return r;
}

}  // namespace r1lab::run
