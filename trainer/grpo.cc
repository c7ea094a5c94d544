#include "trainer/grpo.h"

#include <algorithm>
#include <cmath>

namespace r1lab::trainer {

double grpo_loss(const GrpoConfig& cfg, const core::Tensor& logp, const core::Tensor& old_logp,
                 const core::Tensor& ref_logp, const core::Tensor& advantages, const core::Tensor& mask,
                 core::Tensor* dlogp) {
  const int64_t b = logp.size(0), t = logp.size(1);
  CHECK(old_logp.shape() == logp.shape() && ref_logp.shape() == logp.shape() && mask.shape() == logp.shape());
  CHECK_EQ(advantages.numel(), b);
  const float* lp = logp.f32();
  const float* old = old_logp.f32();
  const float* ref = ref_logp.f32();
  const float* adv = advantages.f32();
  const float* mk = mask.f32();
  float* d = dlogp ? dlogp->f32() : nullptr;
  double total_mask = 0;
  for (int64_t i = 0; i < b * t; ++i) total_mask += mk[i];
  double loss = 0;
  for (int64_t s = 0; s < b; ++s) {
    double seq_mask = 0;
    for (int64_t j = 0; j < t; ++j) seq_mask += mk[s * t + j];
    double weight;  // d loss / d per-token term, for unmasked tokens
    if (cfg.aggregation == GrpoConfig::Aggregation::kSequenceMean) {
      weight = seq_mask > 0 ? 1.0 / (seq_mask * static_cast<double>(b)) : 0.0;
    } else {
      weight = total_mask > 0 ? 1.0 / total_mask : 0.0;
    }
    for (int64_t j = 0; j < t; ++j) {
      const int64_t i = s * t + j;
      const double ratio = std::exp(static_cast<double>(lp[i]) - old[i]);
      const double a = adv[s];
      const double clipped = std::clamp(ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high);
      const double unclipped_obj = ratio * a, clipped_obj = clipped * a;
      const double pg = -std::min(unclipped_obj, clipped_obj);
      // The gradient flows through the unclipped branch when it is the minimum (or the ratio is inside
      // the clip range, where both branches agree); the clipped branch is constant outside the range.
      const bool inside = ratio >= 1.0 - cfg.clip_eps_low && ratio <= 1.0 + cfg.clip_eps_high;
      const double dpg = (unclipped_obj <= clipped_obj || inside) ? -a * ratio : 0.0;
      const double diff = static_cast<double>(ref[i]) - lp[i];
      const double kl = std::exp(diff) - diff - 1.0;
      const double dkl = -std::exp(diff) + 1.0;
      loss += weight * mk[i] * (pg + cfg.kl_beta * kl);
      if (d) d[i] = static_cast<float>(weight * mk[i] * (dpg + cfg.kl_beta * dkl));
    }
  }
  return loss;
}

}  // namespace r1lab::trainer
