// Token sampling from logits (temperature, top-k, top-p, min-p) with a per-sequence seeded generator.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace r1lab::rollout {

struct SamplingParams {
  float temperature = 1.0f;  // 0: greedy
  float top_p = 1.0f;        // (0, 1]
  int top_k = 0;             // 0: off
  float min_p = 0.0f;        // [0, 1)
  int max_new_tokens = 16;
  uint64_t seed = 0;
  std::vector<int32_t> stop_token_ids;  // besides the model's eos
  std::vector<std::string> stop_strings;  // matched on the decoded text (needs a vocabulary)
  bool include_stop_string = false;       // keep a matched stop string at the end of the text
  bool logprobs = true;                   // report each sampled token's log-probability
};

absl::Status validate(const SamplingParams& p);

// The generator seed of sample `index` of a group sampled with `seed`.
uint64_t sample_seed(uint64_t seed, int64_t index);

// One generator per sequence: the same seed gives the same tokens whatever else is in the batch.
class Sampler {
 public:
  explicit Sampler(uint64_t seed) : rng_(seed) {}
  // Picks a token from logits [V]; *logprob gets its log-probability under the unmodified distribution.
  int32_t sample(const float* logits, int64_t vocab, const SamplingParams& p, float* logprob);

 private:
  std::mt19937_64 rng_;
};

}  // namespace r1lab::rollout
