#include "trainer/cross_entropy.h"

namespace r1lab::trainer {

namespace {

// The loss from the log-probabilities (host), and d loss / d lp_m = -w_m / Σw on the backend when asked.
double weighted_nll(core::Backend& be, const core::Tensor& lp, const core::Tensor& weights, core::Tensor* dlp) {
  const int64_t m = lp.numel();
  CHECK_EQ(weights.numel(), m);
  const core::Tensor lp_host = be.download(lp);
  const float* w = weights.f32();
  double total = 0, loss = 0;
  for (int64_t i = 0; i < m; ++i) total += w[i];
  if (total <= 0) return 0.0;
  for (int64_t i = 0; i < m; ++i) loss -= w[i] * lp_host.f32()[i];
  if (dlp != nullptr) {
    core::Tensor host = core::Tensor::zeros({m});
    for (int64_t i = 0; i < m; ++i) host.f32()[i] = static_cast<float>(-w[i] / total);
    *dlp = be.zeros({m});
    be.upload(host, *dlp);
  }
  return loss / total;
}

}  // namespace

double cross_entropy(core::Backend& be, const core::Tensor& logits, const core::Tensor& targets,
                     const core::Tensor& weights, core::Tensor* dlogits) {
  const int64_t m = logits.size(0);
  core::Tensor lp = be.zeros({m}), lse = be.zeros({m}), dlp;
  be.logprobs_forward(logits, targets, lp, lse);
  const double loss = weighted_nll(be, lp, weights, dlogits != nullptr ? &dlp : nullptr);
  if (dlogits != nullptr && dlp.defined()) be.logprobs_backward(dlp, logits, targets, lse, *dlogits);
  return loss;
}

double cross_entropy(model::Model& m, const core::Tensor& tokens, const core::Tensor& targets,
                     const core::Tensor& weights, bool backward) {
  model::ForwardState st;
  const core::Tensor lp = m.forward_logprobs(tokens, targets, backward ? &st : nullptr);
  core::Tensor dlp;
  const double loss = weighted_nll(m.backend(), lp, weights, backward ? &dlp : nullptr);
  if (backward && dlp.defined()) m.backward_logprobs(st, targets, dlp);
  return loss;
}

}  // namespace r1lab::trainer
