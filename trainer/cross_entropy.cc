#include "trainer/cross_entropy.h"

namespace r1lab::trainer {

double cross_entropy(core::Backend& be, const core::Tensor& logits, const core::Tensor& targets,
                     const core::Tensor& weights, core::Tensor* dlogits) {
  const int64_t m = logits.size(0);
  CHECK_EQ(weights.numel(), m);
  core::Tensor lp = be.zeros({m}), lse = be.zeros({m});
  be.logprobs_forward(logits, targets, lp, lse);
  core::Tensor lp_host = be.download(lp);
  const float* w = weights.f32();
  double total = 0, loss = 0;
  for (int64_t i = 0; i < m; ++i) total += w[i];
  if (total <= 0) return 0.0;
  for (int64_t i = 0; i < m; ++i) loss -= w[i] * lp_host.f32()[i];
  if (dlogits != nullptr) {
    // d loss / d lp_m = -w_m / Σw.
    core::Tensor dlp_host = core::Tensor::zeros({m});
    for (int64_t i = 0; i < m; ++i) dlp_host.f32()[i] = static_cast<float>(-w[i] / total);
    core::Tensor dlp = be.zeros({m});
    be.upload(dlp_host, dlp);
    be.logprobs_backward(dlp, logits, targets, lse, *dlogits);
  }
  return loss / total;
}

}  // namespace r1lab::trainer
