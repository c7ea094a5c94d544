#include "trainer/grpo.h"

#include <algorithm>
#include <cmath>

#include "core/policy_loss.h"

namespace r1lab::trainer {

double grpo_loss(const GrpoConfig& cfg, const core::Tensor& logp, const core::Tensor& old_logp,
                 const core::Tensor& ref_logp, const core::Tensor& advantages, const core::Tensor& mask,
                 core::Tensor* dlogp, const GrpoNormaliser& norm, GrpoTokenStats* stats) {
  const int64_t b = logp.size(0), t = logp.size(1);
  CHECK(old_logp.shape() == logp.shape() && ref_logp.shape() == logp.shape() && mask.shape() == logp.shape());
  CHECK_EQ(advantages.numel(), b);
  const float* lp = logp.f32();
  const float* old = old_logp.f32();
  const float* ref = ref_logp.f32();
  const float* adv = advantages.f32();
  const float* mk = mask.f32();
  float* d = dlogp ? dlogp->f32() : nullptr;
  double call_tokens = 0;
  for (int64_t i = 0; i < b * t; ++i) call_tokens += mk[i];
  const core::ClippedRatioLoss token_loss = clipped_ratio_loss(cfg);
  double loss = 0;
  for (int64_t s = 0; s < b; ++s) {
    double seq_mask = 0;
    for (int64_t j = 0; j < t; ++j) seq_mask += mk[s * t + j];
    const double weight = grpo_token_weight(cfg, seq_mask, call_tokens, b, norm);
    for (int64_t j = 0; j < t; ++j) {
      const int64_t i = s * t + j;
      const double ratio = std::exp(static_cast<double>(lp[i]) - old[i]);
      const double a = adv[s];
      const double clipped = std::clamp(ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high);
      const double unclipped_obj = ratio * a, clipped_obj = clipped * a;
      const double pg = -std::min(unclipped_obj, clipped_obj);
      const double diff = static_cast<double>(ref[i]) - lp[i];
      const double kl = std::exp(diff) - diff - 1.0;
      loss += weight * mk[i] * (pg + cfg.kl_beta * kl);
      if (stats != nullptr && mk[i] > 0) {
        stats->tokens += mk[i];
        stats->kl += mk[i] * kl;
        stats->ratio += mk[i] * ratio;
        if ((a > 0 && ratio > 1.0 + cfg.clip_eps_high) || (a < 0 && ratio < 1.0 - cfg.clip_eps_low)) stats->clipped += mk[i];
      }
      // The gradient as the backend's clipped_ratio_grad makes it (its f32 coefficient too): the same bits.
      if (d)
        d[i] = static_cast<float>(
            core::clipped_ratio_token_grad(lp[i], old[i], ref[i], a, static_cast<float>(weight * mk[i]), token_loss));
    }
  }
  return loss;
}

core::ClippedRatioLoss clipped_ratio_loss(const GrpoConfig& cfg) {
  core::ClippedRatioLoss l;
  l.eps_low = cfg.clip_eps_low;
  l.eps_high = cfg.clip_eps_high;
  l.kl_beta = cfg.kl_beta;
  return l;
}

double grpo_token_weight(const GrpoConfig& cfg, double seq_tokens, double call_tokens, int64_t call_sequences,
                         const GrpoNormaliser& norm) {
  const double total = norm.tokens > 0 ? norm.tokens : call_tokens;
  const double sequences =
      norm.sequences > 0 ? static_cast<double>(norm.sequences) : static_cast<double>(call_sequences);
  if (cfg.aggregation == GrpoConfig::Aggregation::kSequenceMean)
    return seq_tokens > 0 ? 1.0 / (seq_tokens * sequences) : 0.0;
  return total > 0 ? 1.0 / total : 0.0;
}

std::vector<float> group_advantages(const std::vector<double>& rewards, int group_size, bool scale_by_std,
                                    double eps) {
  CHECK(group_size > 0 && rewards.size() % static_cast<size_t>(group_size) == 0)
      << rewards.size() << " rewards in groups of " << group_size;
  std::vector<float> adv(rewards.size(), 0.0f);
  const size_t g = static_cast<size_t>(group_size);
  for (size_t start = 0; start < rewards.size(); start += g) {
    double mean = 0;
    for (size_t i = 0; i < g; ++i) mean += rewards[start + i];
    mean /= static_cast<double>(g);
    double var = 0;
    for (size_t i = 0; i < g; ++i) var += (rewards[start + i] - mean) * (rewards[start + i] - mean);
    const double std = g > 1 ? std::sqrt(var / static_cast<double>(g - 1)) : 0.0;
    if (std == 0.0) continue;  // every sample alike: nothing to prefer
    for (size_t i = 0; i < g; ++i)
      adv[start + i] = static_cast<float>(scale_by_std ? (rewards[start + i] - mean) / (std + eps) : rewards[start + i] - mean);
  }
  return adv;
}

}  // namespace r1lab::trainer
