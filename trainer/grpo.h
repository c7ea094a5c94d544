// The GRPO objective of DeepSeek-R1 per token, and its gradient with respect to the policy logprobs:
//   ratio = exp(logp - old);  pg = -min(ratio·A, clip(ratio, 1-ε_low, 1+ε_high)·A)
//   kl = exp(ref - logp) - (ref - logp) - 1            (k3 estimator, Schulman)
//   loss = mean_b [ Σ_t mask·(pg + β·kl) / Σ_t mask ]  (kSequenceMean), or
//          Σ_bt mask·(pg + β·kl) / Σ_bt mask            (kTokenMean).
#pragma once

#include "core/tensor.h"

namespace r1lab::trainer {

struct GrpoConfig {
  float clip_eps_low = 0.2f;
  float clip_eps_high = 0.2f;
  float kl_beta = 0.04f;
  enum class Aggregation { kSequenceMean, kTokenMean };
  Aggregation aggregation = Aggregation::kSequenceMean;
};

// logp, old_logp, ref_logp, mask: host f32 [B, T]; advantages: [B]. Returns the loss; when dlogp is
// given (host f32 [B, T]) it is overwritten with d loss / d logp.
double grpo_loss(const GrpoConfig& cfg, const core::Tensor& logp, const core::Tensor& old_logp,
                 const core::Tensor& ref_logp, const core::Tensor& advantages, const core::Tensor& mask,
                 core::Tensor* dlogp);

}  // namespace r1lab::trainer
