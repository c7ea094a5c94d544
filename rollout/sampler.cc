#include "rollout/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace r1lab::rollout {

absl::Status validate(const SamplingParams& p) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature))
    return absl::InvalidArgumentError(absl::StrCat("temperature must be >= 0, got ", p.temperature));
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f))
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", p.top_p));
  if (p.top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", p.top_k));
  if (!(p.min_p >= 0.0f && p.min_p < 1.0f))
    return absl::InvalidArgumentError(absl::StrCat("min_p must be in [0, 1), got ", p.min_p));
  if (p.max_new_tokens <= 0)
    return absl::InvalidArgumentError(absl::StrCat("max_new_tokens must be positive, got ", p.max_new_tokens));
  return absl::OkStatus();
}

int32_t Sampler::sample(const float* logits, int64_t vocab, const SamplingParams& p, float* logprob) {
  // log-softmax of the unmodified logits: what the trainer recomputes.
  const float mx = *std::max_element(logits, logits + vocab);
  double sum = 0;
  for (int64_t j = 0; j < vocab; ++j) sum += std::exp(static_cast<double>(logits[j] - mx));
  const double lse = mx + std::log(sum);
  int32_t pick;
  if (p.temperature == 0.0f) {
    pick = static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);  // first maximum
  } else {
    std::vector<int32_t> order(static_cast<size_t>(vocab));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
    size_t keep = order.size();
    if (p.top_k > 0) keep = std::min(keep, static_cast<size_t>(p.top_k));
    std::vector<double> prob(keep);
    double total = 0;
    for (size_t i = 0; i < keep; ++i) {
      prob[i] = std::exp((static_cast<double>(logits[order[i]]) - mx) / p.temperature);
      total += prob[i];
    }
    // min-p: drop tokens below min_p times the most likely one.
    if (p.min_p > 0.0f) {
      size_t n = 0;
      while (n < keep && prob[n] >= p.min_p * prob[0]) ++n;
      keep = std::max<size_t>(n, 1);
      total = std::accumulate(prob.begin(), prob.begin() + static_cast<int64_t>(keep), 0.0);
    }
    // top-p: the smallest prefix whose mass reaches top_p.
    if (p.top_p < 1.0f) {
      double acc = 0;
      size_t n = 0;
      while (n < keep) {
        acc += prob[n++] / total;
        if (acc >= p.top_p) break;
      }
      keep = n;
      total = std::accumulate(prob.begin(), prob.begin() + static_cast<int64_t>(keep), 0.0);
    }
    std::uniform_real_distribution<double> u(0.0, total);
    double x = u(rng_), acc = 0;
    pick = order[keep - 1];
    for (size_t i = 0; i < keep; ++i) {
      acc += prob[i];
      if (x < acc) {
        pick = order[i];
        break;
      }
    }
  }
  if (logprob) *logprob = static_cast<float>(logits[pick] - lse);
  return pick;
}

absl::StatusOr<std::vector<Completion>> generate(model::Model& m, const std::vector<std::vector<int32_t>>& prompts,
                                                 const SamplingParams& p) {
  R1LAB_RETURN_IF_ERROR(validate(p));
  const model::ModelConfig& cfg = m.config();
  if (prompts.empty()) return absl::InvalidArgumentError("no prompts");
  const size_t len = prompts[0].size();
  if (len == 0) return absl::InvalidArgumentError("empty prompt");
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].size() != len)
      return absl::InvalidArgumentError(absl::StrCat("prompt ", i, " has ", prompts[i].size(),
                                                     " tokens; batched prompts must all have ", len));
    for (int32_t id : prompts[i])
      if (id < 0 || id >= cfg.vocab_size)
        return absl::InvalidArgumentError(absl::StrCat("prompt ", i, ": token id ", id, " outside [0, ",
                                                       cfg.vocab_size, ")"));
  }
  if (static_cast<int64_t>(len) + p.max_new_tokens > cfg.max_position_embeddings)
    return absl::InvalidArgumentError(absl::StrCat("prompt (", len, ") + max_new_tokens (", p.max_new_tokens,
                                                   ") exceeds the context of ", cfg.max_position_embeddings));
  const int64_t b = static_cast<int64_t>(prompts.size());
  std::vector<int32_t> stops = p.stop_token_ids;
  if (cfg.eos_token_id >= 0) stops.push_back(cfg.eos_token_id);
  core::Backend& be = m.backend();
  model::LatentCache cache(cfg, be, b, static_cast<int64_t>(len) + p.max_new_tokens);
  std::vector<Sampler> samplers;
  for (int64_t i = 0; i < b; ++i) samplers.emplace_back(p.seed + static_cast<uint64_t>(i));
  std::vector<Completion> out(static_cast<size_t>(b));
  std::vector<bool> done(static_cast<size_t>(b), false);
  core::Tensor step = core::Tensor::zeros({b, static_cast<int64_t>(len)}, core::DType::kI32);
  for (int64_t i = 0; i < b; ++i)
    std::copy(prompts[i].begin(), prompts[i].end(), step.data<int32_t>() + i * static_cast<int64_t>(len));
  for (int n = 0; n < p.max_new_tokens; ++n) {
    core::Tensor logits = be.download(m.forward_cached(step, cache));  // [B*t, V]
    const int64_t t = step.size(1);
    core::Tensor next = core::Tensor::zeros({b, 1}, core::DType::kI32);
    bool all_done = true;
    for (int64_t i = 0; i < b; ++i) {
      const float* row = logits.f32() + ((i + 1) * t - 1) * cfg.vocab_size;
      float lp = 0;
      int32_t tok = samplers[i].sample(row, cfg.vocab_size, p, &lp);
      next.data<int32_t>()[i] = tok;
      if (done[i]) continue;  // finished sequences ride along until the batch ends
      out[i].tokens.push_back(tok);
      out[i].logprobs.push_back(lp);
      if (std::find(stops.begin(), stops.end(), tok) != stops.end()) {
        done[i] = true;
        out[i].finish_reason = "stop";
      }
      all_done &= done[i];
    }
    if (all_done) break;
    step = next;
  }
  for (Completion& c : out)
    if (c.finish_reason.empty()) c.finish_reason = "length";
  return out;
}

}  // namespace r1lab::rollout
