// Token sampling from logits (temperature, top-k, top-p, min-p) with a per-sequence seeded generator,
// and batched generation through the model's latent cache.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/model.h"

namespace r1lab::rollout {

struct SamplingParams {
  float temperature = 1.0f;  // 0: greedy
  float top_p = 1.0f;        // (0, 1]
  int top_k = 0;             // 0: off
  float min_p = 0.0f;        // [0, 1)
  int max_new_tokens = 16;
  uint64_t seed = 0;
  std::vector<int32_t> stop_token_ids;  // the model's eos is added by generate
};

absl::Status validate(const SamplingParams& p);

// One generator per sequence: the same seed gives the same tokens whatever else is in the batch.
class Sampler {
 public:
  explicit Sampler(uint64_t seed) : rng_(seed) {}
  // Picks a token from logits [V]; *logprob gets its log-probability under the unmodified distribution.
  int32_t sample(const float* logits, int64_t vocab, const SamplingParams& p, float* logprob);

 private:
  std::mt19937_64 rng_;
};

struct Completion {
  std::vector<int32_t> tokens;  // new tokens only
  std::vector<float> logprobs;  // per new token
  std::string finish_reason;    // "stop" (a stop token) or "length"
};

// Continues every prompt (all of one length) by up to max_new_tokens, prefilling once and decoding
// one token per step through the latent cache. Sequence i uses seed p.seed + i.
absl::StatusOr<std::vector<Completion>> generate(model::Model& m, const std::vector<std::vector<int32_t>>& prompts,
                                                 const SamplingParams& p);

}  // namespace r1lab::rollout
