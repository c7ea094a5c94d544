// The optimizer ops of the CPU backend: double-precision math per element, f32 storage.
#include <cmath>

#include "core/cpu/cpu_backend.h"

namespace r1lab::core::cpu {
namespace {

void check_flat(const Tensor& t, int64_t n) {
  CHECK(t.dtype() == DType::kF32 && t.is_contiguous() && t.numel() == n)
      << "expected f32 [" << n << "], got " << dtype_name(t.dtype()) << " " << shape_str(t.shape());
}

void check_spans(const std::vector<ParamSpan>& spans, int64_t n) {
  for (const ParamSpan& s : spans) CHECK(s.offset >= 0 && s.numel >= 0 && s.offset + s.numel <= n);
}

}  // namespace

double CpuBackend::sum_squares(const Tensor& x, const std::vector<ParamSpan>& spans) {
  CHECK(x.dtype() == DType::kF32 && x.is_contiguous());
  check_spans(spans, x.numel());
  const float* p = x.f32();
  double sq = 0;
  for (const ParamSpan& s : spans) {
#pragma omp parallel for reduction(+ : sq)
    for (int64_t i = s.offset; i < s.offset + s.numel; ++i) sq += static_cast<double>(p[i]) * p[i];
  }
  return sq;
}

void CpuBackend::adamw_update(Tensor& w, const Tensor& g, Tensor& m, Tensor& v, const std::vector<ParamSpan>& spans,
                              const AdamWUpdate& u, Tensor* rounded) {
  const int64_t n = w.numel();
  check_flat(w, n);
  check_flat(g, n);
  check_flat(m, n);
  check_flat(v, n);
  check_spans(spans, n);
  float* wp = w.f32();
  const float* gp = g.f32();
  float* mp = m.f32();
  float* vp = v.f32();
  uint16_t* rp = nullptr;
  if (rounded != nullptr) {
    CHECK(rounded->dtype() == DType::kBF16 && rounded->is_contiguous() && rounded->numel() == n)
        << "adamw_update: rounded copy of " << dtype_name(rounded->dtype()) << " " << shape_str(rounded->shape());
    rp = rounded->data<uint16_t>();
  }
  const double b1 = u.beta1, b2 = u.beta2;
  for (const ParamSpan& s : spans) {
    const double wd = s.decay ? u.lr * u.weight_decay : 0.0;
#pragma omp parallel for
    for (int64_t i = s.offset; i < s.offset + s.numel; ++i) {
      const double gi = gp[i] * u.grad_scale;
      const double mi = b1 * mp[i] + (1.0 - b1) * gi;
      const double vi = b2 * vp[i] + (1.0 - b2) * gi * gi;
      mp[i] = static_cast<float>(mi);
      vp[i] = static_cast<float>(vi);
      double wi = wp[i];
      wi -= wd * wi;
      wi -= u.lr * (mi / u.bias_correction1) / (std::sqrt(vi / u.bias_correction2) + u.eps);
      wp[i] = static_cast<float>(wi);
      if (rp != nullptr) rp[i] = f32_to_bf16(wp[i]);
    }
  }
}

}  // namespace r1lab::core::cpu
