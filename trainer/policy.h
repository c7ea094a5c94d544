// Training steps of the policy over variable-length sequences: a batch is cut into micro-batches
// (right-padded to their longest sequence; causal attention keeps padding out of every real token's
// result), each runs forward and backward, gradients accumulate, then one AdamW step.
//   - grpo_step: GRPO on sampled completions (ratio against the sampling policy's logprobs, clipped
//     surrogate, k3 KL to the reference model's logprobs), the loss normalised over the whole batch.
//   - sft_step: cross-entropy on completion tokens (cold start, rejection-sampling SFT, distillation, and
//     pretraining the built-in base model).
#pragma once

#include <cstdint>
#include <vector>

#include "model/model.h"
#include "trainer/grpo.h"
#include "trainer/optimizer.h"

namespace r1lab::trainer {

struct TrainSequence {
  std::vector<int32_t> tokens;  // prompt then completion
  int32_t prompt_len = 0;       // >= 1; tokens after it are the completion (what is trained)
  // Per completion token (tokens.size() - prompt_len each):
  std::vector<float> old_logprobs;  // under the policy that sampled it, as the sampler computed them (GRPO;
                                    // may be empty with GrpoConfig::Old::kPolicy)
  std::vector<float> ref_logprobs;  // under the reference model (GRPO with kl_beta > 0)
  float advantage = 0;
};

// Per-token logprobs of each sequence's completion under `model`, micro_batch sequences at a time.
std::vector<std::vector<float>> completion_logprobs(model::Model& model, const std::vector<TrainSequence>& batch,
                                                    int micro_batch);

struct GrpoStepStats {
  double loss = 0;
  double kl = 0;          // mean k3 per completion token
  double clip_fraction = 0;
  double ratio = 0;       // mean ratio per completion token
  double entropy = 0;     // mean entropy of the policy per completion token (nats)
  // |trainer logprob - sampler logprob| over the completion tokens that carry the sampler's (before the
  // update: the same weights on both sides, so this is what the two computations' roundings leave).
  double logprob_gap_max = 0, logprob_gap_mean = 0;
  int64_t tokens = 0;     // completion tokens
  StepStats opt;
};

// Accumulates the GRPO gradient of `batch` into model.grads() (zeroed first) without stepping; returns
// the loss and statistics. What grpo_step runs, and what the parity test checks against the fixture.
GrpoStepStats grpo_gradients(model::Model& model, const GrpoConfig& cfg, const std::vector<TrainSequence>& batch,
                             int micro_batch);
GrpoStepStats grpo_step(model::Model& model, AdamW& opt, const GrpoConfig& cfg,
                        const std::vector<TrainSequence>& batch, int micro_batch);

struct SftStepStats {
  double loss = 0;            // mean cross-entropy per completion token
  double token_accuracy = 0;  // argmax = target, per completion token
  int64_t tokens = 0;
  StepStats opt;
};
SftStepStats sft_step(model::Model& model, AdamW& opt, const std::vector<TrainSequence>& batch, int micro_batch);

}  // namespace r1lab::trainer
