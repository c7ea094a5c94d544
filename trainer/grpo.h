// The GRPO objective of DeepSeek-R1 per token, and its gradient with respect to the policy logprobs:
//   ratio = exp(logp - old);  pg = -min(ratio·A, clip(ratio, 1-ε_low, 1+ε_high)·A)
//   kl = exp(ref - logp) - (ref - logp) - 1            (k3 estimator, Schulman)
//   loss = mean_b [ Σ_t mask·(pg + β·kl) / Σ_t mask ]  (kSequenceMean), or
//          Σ_bt mask·(pg + β·kl) / Σ_bt mask            (kTokenMean).
#pragma once

#include <vector>

#include "core/backend.h"
#include "core/tensor.h"

namespace r1lab::trainer {

struct GrpoConfig {
  float clip_eps_low = 0.2f;
  float clip_eps_high = 0.2f;
  float kl_beta = 0.04f;
  enum class Aggregation { kSequenceMean, kTokenMean };
  Aggregation aggregation = Aggregation::kSequenceMean;
  // What the ratio's `old` is. kSampler: the logprobs the sampler returned with each token. kPolicy: the
  // policy's own logprobs in this very pass, held constant (the batch is used for one update, so the
  // policy that sampled it is the one being trained): the ratio is exactly 1 and the gradient is A·∇logp,
  // whatever rounding separates the sampler's kernels from the trainer's; the sampler's logprobs, where
  // given, are then only compared (GrpoStepStats::logprob_gap_*).
  enum class Old { kSampler, kPolicy };
  Old old = Old::kSampler;
};

// What a batch's loss is normalised by when it is computed a micro-batch at a time: the whole batch's
// number of sequences (kSequenceMean) or of unmasked tokens (kTokenMean). Zero: this call's own.
struct GrpoNormaliser {
  int64_t sequences = 0;
  double tokens = 0;
};
// Sums over the unmasked tokens of one call, for logging.
struct GrpoTokenStats {
  double tokens = 0;
  double kl = 0;            // Σ k3
  double clipped = 0;       // tokens whose ratio is outside the clip range on the side that binds
  double ratio = 0;         // Σ ratio
};

// logp, old_logp, ref_logp, mask: host f32 [B, T]; advantages: [B]. Returns the loss (this call's
// share of the batch's when `norm` names the batch); when dlogp is given (host f32 [B, T]) it is
// overwritten with d loss / d logp.
double grpo_loss(const GrpoConfig& cfg, const core::Tensor& logp, const core::Tensor& old_logp,
                 const core::Tensor& ref_logp, const core::Tensor& advantages, const core::Tensor& mask,
                 core::Tensor* dlogp, const GrpoNormaliser& norm = {}, GrpoTokenStats* stats = nullptr);

// The per-token loss above as the backend computes its gradient (Backend::clipped_ratio_grad; ratio_one
// is the caller's: GrpoConfig::Old::kPolicy).
core::ClippedRatioLoss clipped_ratio_loss(const GrpoConfig& cfg);
// d loss / d (an unmasked token's term) for a token of a sequence with seq_tokens unmasked tokens, in a
// call of call_sequences sequences and call_tokens unmasked tokens (norm, where set, names the batch's).
double grpo_token_weight(const GrpoConfig& cfg, double seq_tokens, double call_tokens, int64_t call_sequences,
                         const GrpoNormaliser& norm);

// Group-relative advantages: rewards come in groups of `group_size` consecutive samples of one prompt;
// A_i = (r_i - mean_group) / (std_group + eps) (GRPO; std is the sample standard deviation, as TRL's),
// or r_i - mean_group when scale_by_std is false (Dr. GRPO). A group whose rewards are all equal gets
// zeros.
std::vector<float> group_advantages(const std::vector<double>& rewards, int group_size, bool scale_by_std = true,
                                    double eps = 1e-4);

}  // namespace r1lab::trainer
