#include "trainer/optimizer.h"

#include <cmath>
#include <numbers>

#include "absl/strings/str_cat.h"
#include "absl/strings/numbers.h"
#include "model/safetensors.h"

namespace r1lab::trainer {

double learning_rate(const AdamWConfig& c, int64_t step) {
  if (c.warmup_steps > 0 && step < c.warmup_steps) return c.lr * static_cast<double>(step + 1) / c.warmup_steps;
  if (c.total_steps <= c.warmup_steps) return c.lr;
  const double progress =
      std::min(1.0, static_cast<double>(step - c.warmup_steps) / static_cast<double>(c.total_steps - c.warmup_steps));
  const double cosine = 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  return c.lr * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * cosine);
}

AdamW::AdamW(const model::ParameterSet& params, AdamWConfig config)
    : cfg_(config), backend_(&params.backend()) {
  m_ = backend_->zeros({params.numel()});
  v_ = backend_->zeros({params.numel()});
  for (const model::ParamInfo& p : params.infos()) {
    if (!p.trainable) continue;
    const int64_t n = core::shape_numel(p.shape);
    const bool decays = p.shape.size() >= 2;
    // Neighbouring parameters with the same decay merge into one span.
    if (!spans_.empty() && spans_.back().offset + spans_.back().numel == p.offset && spans_.back().decay == decays) {
      spans_.back().numel += n;
    } else {
      spans_.push_back({p.offset, n, decays});
    }
  }
}

StepStats AdamW::step(model::Model& model, double grad_scale) {
  core::Tensor rounded = model.rounded_weights();
  const StepStats st = step(model.params(), model.grads(), grad_scale, rounded.defined() ? &rounded : nullptr);
  if (rounded.defined() && !st.skipped) model.rounded_weights_written();
  return st;
}

StepStats AdamW::step(model::ParameterSet& params, const model::ParameterSet& grads, double grad_scale,
                      core::Tensor* rounded) {
  CHECK_EQ(params.numel(), m_.numel());
  CHECK_EQ(grads.numel(), params.numel());
  CHECK(&params.backend() == backend_ && &grads.backend() == backend_) << "AdamW: parameters on another backend";
  StepStats st;
  const double sq = backend_->sum_squares(grads.buffer(), spans_) * grad_scale * grad_scale;
  st.grad_norm = std::sqrt(sq);
  st.lr = learning_rate(cfg_, step_);
  if (!std::isfinite(sq)) {
    st.skipped = true;
    return st;
  }
  double scale = grad_scale;
  if (cfg_.max_grad_norm > 0 && st.grad_norm > cfg_.max_grad_norm) {
    scale *= cfg_.max_grad_norm / st.grad_norm;
    st.clipped = true;
  }
  ++step_;
  core::AdamWUpdate u;
  u.lr = st.lr;
  u.beta1 = cfg_.beta1;
  u.beta2 = cfg_.beta2;
  u.eps = cfg_.eps;
  u.weight_decay = cfg_.weight_decay;
  u.bias_correction1 = 1.0 - std::pow(cfg_.beta1, static_cast<double>(step_));
  u.bias_correction2 = 1.0 - std::pow(cfg_.beta2, static_cast<double>(step_));
  u.grad_scale = scale;
  core::Tensor w = params.buffer();
  backend_->adamw_update(w, grads.buffer(), m_, v_, spans_, u, rounded);
  return st;
}

absl::Status AdamW::save(const std::string& path) const {
  return model::write_safetensors(path, {{"adam.m", backend_->download(m_)}, {"adam.v", backend_->download(v_)}},
                                  {{"step", absl::StrCat(step_)}});
}

absl::Status AdamW::load(const std::string& path) {
  auto f = model::SafetensorsFile::open(path);
  if (!f.ok()) return f.status();
  const model::SafetensorsFile& file = **f;
  const int64_t n = m_.numel();
  for (const char* name : {"adam.m", "adam.v"}) {
    if (!file.contains(name)) return absl::InvalidArgumentError(absl::StrCat(path, ": lacks ", name));
    const auto& e = file.entries().at(name);
    if (e.dtype != core::DType::kF32 || e.shape != core::Shape{n})
      return absl::InvalidArgumentError(absl::StrCat(path, ": ", name, " is not f32 [", n, "] (another model?)"));
  }
  auto it = file.metadata().find("step");
  int64_t step = 0;
  if (it == file.metadata().end() || !absl::SimpleAtoi(it->second, &step) || step < 0)
    return absl::InvalidArgumentError(absl::StrCat(path, ": no valid 'step' in the metadata"));
  backend_->upload(file.tensor("adam.m").clone(), m_);
  backend_->upload(file.tensor("adam.v").clone(), v_);
  step_ = step;
  return absl::OkStatus();
}

}  // namespace r1lab::trainer
