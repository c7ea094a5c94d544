#include "trainer/cross_entropy.h"

namespace r1lab::trainer {

namespace {

// Σ w (host f32 [M]).
double weight_total(const core::Tensor& weights) {
  double total = 0;
  for (int64_t i = 0; i < weights.numel(); ++i) total += weights.f32()[i];
  return total;
}

// The loss from the log-probabilities (backend [M]), -Σ w·lp / Σw.
double weighted_nll(core::Backend& be, const core::Tensor& lp, const core::Tensor& weights) {
  const int64_t m = lp.numel();
  CHECK_EQ(weights.numel(), m);
  const double total = weight_total(weights);
  if (total <= 0) return 0.0;
  const core::Tensor lp_host = be.download(lp);
  double loss = 0;
  for (int64_t i = 0; i < m; ++i) loss -= weights.f32()[i] * lp_host.f32()[i];
  return loss / total;
}

// d loss / d lp_m = -w_m / Σw on the backend; undefined when Σw is not positive (no gradient).
core::Tensor nll_gradient(core::Backend& be, const core::Tensor& weights) {
  const double total = weight_total(weights);
  if (total <= 0) return core::Tensor();
  const int64_t m = weights.numel();
  core::Tensor host = core::Tensor::zeros({m});
  for (int64_t i = 0; i < m; ++i) host.f32()[i] = static_cast<float>(-weights.f32()[i] / total);
  core::Tensor dlp = be.zeros({m});
  be.upload(host, dlp);
  return dlp;
}

}  // namespace

double cross_entropy(core::Backend& be, const core::Tensor& logits, const core::Tensor& targets,
                     const core::Tensor& weights, core::Tensor* dlogits) {
  const int64_t m = logits.size(0);
  CHECK_EQ(weights.numel(), m);
  core::Tensor lp = be.zeros({m}), lse = be.zeros({m});
  be.logprobs_forward(logits, targets, lp, lse);
  const double loss = weighted_nll(be, lp, weights);
  if (dlogits != nullptr) {
    const core::Tensor dlp = nll_gradient(be, weights);
    if (dlp.defined()) be.logprobs_backward(dlp, logits, targets, lse, *dlogits);
  }
  return loss;
}

double cross_entropy(model::Model& m, const core::Tensor& tokens, const core::Tensor& targets,
                     const core::Tensor& weights, bool backward) {
  CHECK_EQ(weights.numel(), tokens.numel());
  const core::Tensor dlp = backward ? nll_gradient(m.backend(), weights) : core::Tensor();
  if (!dlp.defined()) return weighted_nll(m.backend(), m.forward_logprobs(tokens, targets, nullptr), weights);
  // The gradient is known before the forward: the head's backward runs in the forward's pass over it.
  model::ForwardState st;
  const model::LogprobGradient gradient = [&](const core::Tensor& lp, int64_t row0) {
    return dlp.slice(0, row0, lp.numel());
  };
  const core::Tensor lp = m.forward_logprobs(tokens, targets, &st, nullptr, &gradient);
  m.backward_from_head(st);  // queued before the loss waits for the device
  return weighted_nll(m.backend(), lp, weights);
}

}  // namespace r1lab::trainer
