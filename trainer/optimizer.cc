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

AdamW::AdamW(const model::ParameterSet& params, AdamWConfig config) : cfg_(config) {
  const size_t n = static_cast<size_t>(params.numel());
  m_.assign(n, 0.0f);
  v_.assign(n, 0.0f);
  decay_.assign(n, 0);
  train_.assign(n, 0);
  for (const model::ParamInfo& p : params.infos()) {
    const size_t begin = static_cast<size_t>(p.offset), end = begin + static_cast<size_t>(core::shape_numel(p.shape));
    const bool decays = p.trainable && p.shape.size() >= 2;
    for (size_t i = begin; i < end; ++i) {
      decay_[i] = decays;
      train_[i] = p.trainable;
    }
  }
}

StepStats AdamW::step(model::ParameterSet& params, const model::ParameterSet& grads, double grad_scale) {
  CHECK_EQ(params.numel(), static_cast<int64_t>(m_.size()));
  CHECK_EQ(grads.numel(), params.numel());
  CHECK(params.buffer().device() == core::Device::kCpu && grads.buffer().device() == core::Device::kCpu)
      << "AdamW runs over host buffers (the CUDA optimizer is the CUDA backend's)";
  float* w = params.buffer().f32();
  const float* g = grads.buffer().f32();
  const size_t n = m_.size();
  StepStats st;
  double sq = 0;
  bool finite = true;
  for (size_t i = 0; i < n; ++i) {
    if (!train_[i]) continue;
    const double gi = g[i] * grad_scale;
    if (!std::isfinite(gi)) finite = false;
    sq += gi * gi;
  }
  st.grad_norm = std::sqrt(sq);
  st.lr = learning_rate(cfg_, step_);
  if (!finite) {
    st.skipped = true;
    return st;
  }
  double scale = grad_scale;
  if (cfg_.max_grad_norm > 0 && st.grad_norm > cfg_.max_grad_norm) {
    scale *= cfg_.max_grad_norm / st.grad_norm;
    st.clipped = true;
  }
  ++step_;
  const double b1 = cfg_.beta1, b2 = cfg_.beta2;
  const double c1 = 1.0 - std::pow(b1, static_cast<double>(step_)), c2 = 1.0 - std::pow(b2, static_cast<double>(step_));
  const double lr = st.lr, wd = cfg_.weight_decay, eps = cfg_.eps;
#pragma omp parallel for
  for (size_t i = 0; i < n; ++i) {
    if (!train_[i]) continue;
    const double gi = g[i] * scale;
    const double m = b1 * m_[i] + (1.0 - b1) * gi;
    const double v = b2 * v_[i] + (1.0 - b2) * gi * gi;
    m_[i] = static_cast<float>(m);
    v_[i] = static_cast<float>(v);
    double wi = w[i];
    if (decay_[i]) wi -= lr * wd * wi;
    wi -= lr * (m / c1) / (std::sqrt(v / c2) + eps);
    w[i] = static_cast<float>(wi);
  }
  return st;
}

absl::Status AdamW::save(const std::string& path) const {
  const int64_t n = static_cast<int64_t>(m_.size());
  core::Tensor m = core::Tensor::zeros({n}), v = core::Tensor::zeros({n});
  std::copy(m_.begin(), m_.end(), m.f32());
  std::copy(v_.begin(), v_.end(), v.f32());
  return model::write_safetensors(path, {{"adam.m", m}, {"adam.v", v}}, {{"step", absl::StrCat(step_)}});
}

absl::Status AdamW::load(const std::string& path) {
  auto f = model::SafetensorsFile::open(path);
  if (!f.ok()) return f.status();
  const model::SafetensorsFile& file = **f;
  const int64_t n = static_cast<int64_t>(m_.size());
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
  const float* m = file.tensor("adam.m").f32();
  const float* v = file.tensor("adam.v").f32();
  std::copy(m, m + n, m_.begin());
  std::copy(v, v + n, v_.begin());
  step_ = step;
  return absl::OkStatus();
}

}  // namespace r1lab::trainer
