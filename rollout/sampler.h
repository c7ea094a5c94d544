// Sampling parameters, and token sampling from logits (temperature, top-k, top-p, min-p) on the logits'
// backend with a counter-based random stream per sample.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/backend.h"

namespace r1lab::rollout {

struct SamplingParams {
  float temperature = 1.0f;  // 0: greedy
  float top_p = 1.0f;        // (0, 1]
  int top_k = 0;             // 0: off
  float min_p = 0.0f;        // [0, 1)
  int max_new_tokens = 16;
  uint64_t seed = 0;
  std::vector<int32_t> stop_token_ids;    // besides the model's eos
  std::vector<std::string> stop_strings;  // matched on the decoded text (needs a vocabulary)
  bool include_stop_string = false;       // keep a matched stop string at the end of the text
  bool logprobs = true;                   // report each sampled token's log-probability
};

absl::Status validate(const SamplingParams& p);

// The generator seed of sample `index` of a group sampled with `seed`.
uint64_t sample_seed(uint64_t seed, int64_t index);

// The uniform draw in [0, 1) that picks token `step` (0: the first generated) of the sample whose seed is
// `seed` (sample_seed). Counter-based: a token's draw depends on nothing else, so batching, preemption,
// recomputation and the device never change it.
float sample_uniform(uint64_t seed, int64_t step);

// One token to pick from row `row` of a logits tensor.
struct SampleRequest {
  int64_t row = 0;
  const SamplingParams* params = nullptr;
  float uniform = 0;  // sample_uniform(...)
};

// Picks a token for every request from logits [M, V] on `be` (Backend::sample_tokens: the logits stay
// where they are; the specs go up and [S] tokens and log-probabilities under the unmodified distribution
// come back).
void sample_tokens(core::Backend& be, const core::Tensor& logits, const std::vector<SampleRequest>& requests,
                   std::vector<int32_t>* tokens, std::vector<float>* logprobs);

// The same in two halves: start() queues the sampling and the copy back and returns at once, leaving
// the picks on the device too (`device_tokens`, [S] I32, for a next step to read there); take() waits
// for the copy and gives them.
class PendingPicks {
 public:
  static PendingPicks start(core::Backend& be, const core::Tensor& logits, const std::vector<SampleRequest>& requests);
  void take(std::vector<int32_t>* tokens, std::vector<float>* logprobs);
  const core::Tensor& device_tokens() const { return device_tokens_; }

 private:
  int64_t n_ = 0;
  core::Tensor device_tokens_;
  std::function<core::Tensor()> wait_;
};

}  // namespace r1lab::rollout
