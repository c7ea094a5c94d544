#include "rollout/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <utility>
#include <vector>

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
  if (p.stop_token_ids.size() > 64 || p.stop_strings.size() > 64)
    return absl::InvalidArgumentError("at most 64 stop token ids and 64 stop strings");
  for (const std::string& s : p.stop_strings)
    if (s.empty() || s.size() > 256)
      return absl::InvalidArgumentError("a stop string must have 1 to 256 bytes");
  return absl::OkStatus();
}

uint64_t sample_seed(uint64_t seed, int64_t index) {
  // splitmix64 of (seed, index): neighbouring seeds and indices give unrelated streams.
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * static_cast<uint64_t>(index + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
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
    // Most likely first, ties in vocabulary order (as a stable sort by logit): (-logit, id) pairs sorted
    // in place, not ids sorted through the logits (several times faster at a 32 k vocabulary); with top-k
    // only the first k are ordered.
    // Scratch reused across calls (a fresh 256 KB vector a call costs page faults as large as the sort).
    thread_local std::vector<std::pair<float, int32_t>> ranked;
    thread_local std::vector<double> prob;
    ranked.resize(static_cast<size_t>(vocab));
    for (int64_t j = 0; j < vocab; ++j) ranked[static_cast<size_t>(j)] = {-logits[j], static_cast<int32_t>(j)};
    size_t keep = ranked.size();
    if (p.top_k > 0) keep = std::min(keep, static_cast<size_t>(p.top_k));
    if (keep < ranked.size()) {
      std::partial_sort(ranked.begin(), ranked.begin() + static_cast<int64_t>(keep), ranked.end());
    } else {
      std::sort(ranked.begin(), ranked.end());
    }
    auto order = [&](size_t i) { return ranked[i].second; };
    prob.resize(keep);
    double total = 0;
    for (size_t i = 0; i < keep; ++i) {
      prob[i] = std::exp((static_cast<double>(logits[order(i)]) - mx) / p.temperature);
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
    pick = order(keep - 1);
    for (size_t i = 0; i < keep; ++i) {
      acc += prob[i];
      if (x < acc) {
        pick = order(i);
        break;
      }
    }
  }
  if (logprob) *logprob = static_cast<float>(logits[pick] - lse);
  return pick;
}

}  // namespace r1lab::rollout
