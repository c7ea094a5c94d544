// RMSNorm and rotary embeddings of the CPU backend, forward and backward.
#include <cmath>

#include "core/cpu/cpu_backend.h"

namespace r1lab::core::cpu {

// y = x * rstd * w,  rstd = 1 / sqrt(mean(x²) + eps).
void CpuBackend::rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd,
                                 Tensor* x_rounded) {
  if (x_rounded != nullptr) {
    CHECK(x.dtype() == DType::kF32 && x_rounded->dtype() == DType::kBF16) << "rmsnorm_forward: f32 x, bf16 copy";
    copy(x, *x_rounded);
  }
  if (y.dtype() == DType::kBF16) {  // the f32 result, rounded
    Tensor y32 = Tensor::zeros(y.shape());
    rmsnorm_forward(x, w, eps, y32, rstd, nullptr);
    copy(y32, y);
    return;
  }
  Rows xr = rows_of(x), yr = rows_of(y);
  const float* wp = w.f32();
  float* rs = rstd.f32();
  CHECK_EQ(w.numel(), xr.cols);
  CHECK_EQ(rstd.numel(), xr.rows);
#pragma omp parallel for
  for (int64_t r = 0; r < xr.rows; ++r) {
    const float* xi = xr.row(r);
    double ss = 0;
    for (int64_t i = 0; i < xr.cols; ++i) ss += static_cast<double>(xi[i]) * xi[i];
    const float s = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(xr.cols) + eps));
    rs[r] = s;
    float* yi = yr.row(r);
    for (int64_t i = 0; i < xr.cols; ++i) yi[i] = wp[i] * (xi[i] * s);
  }
}

// With n = x * rstd: dw += dy * n;  dx += rstd * (dy*w - n * mean(dy*w*n)).
void CpuBackend::rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx,
                                  Tensor& dw, Tensor* dx_rounded) {
  const Tensor x32 = f32_values(x);  // a bf16 x: its values
  Rows dyr = rows_of(dy), xr = rows_of(x32), dxr = rows_of(dx);
  const float* wp = w.f32();
  const float* rs = rstd.f32();
  float* dwp = dw.f32();
  const int64_t d = xr.cols;
#pragma omp parallel for
  for (int64_t r = 0; r < xr.rows; ++r) {
    const float* xi = xr.row(r);
    const float* gi = dyr.row(r);
    double dot = 0;
    for (int64_t i = 0; i < d; ++i) dot += static_cast<double>(gi[i]) * wp[i] * xi[i] * rs[r];
    const float mean = static_cast<float>(dot / static_cast<double>(d));
    float* dxi = dxr.row(r);
    for (int64_t i = 0; i < d; ++i) dxi[i] += rs[r] * (gi[i] * wp[i] - xi[i] * rs[r] * mean);
  }
  for (int64_t r = 0; r < xr.rows; ++r) {
    const float* xi = xr.row(r);
    const float* gi = dyr.row(r);
    for (int64_t i = 0; i < d; ++i) dwp[i] += gi[i] * xi[i] * rs[r];
  }
  if (dx_rounded != nullptr) {
    CHECK(dx.dtype() == DType::kF32 && dx_rounded->dtype() == DType::kBF16) << "rmsnorm_backward: f32 dx, bf16 copy";
    copy(dx, *dx_rounded);
  }
}

// (a, b) -> (a cos - b sin, a sin + b cos) with angle θ_i(pos); inverse uses -θ.
void CpuBackend::rope(Tensor& x, const Tensor& positions, const RopeTable& table, bool interleaved,
                      bool inverse) {
  CHECK_EQ(x.dim(), 3) << "rope takes [M, H, D]";
  CHECK_EQ(x.stride(2), 1);
  const int64_t m = x.size(0), h = x.size(1), d = x.size(2), half = d / 2;
  CHECK_EQ(d % 2, 0);
  CHECK_EQ(table.cos.size(1), half);
  CHECK_EQ(positions.numel(), m);
  const int32_t* pos = positions.data<int32_t>();
  const float* cs = table.cos.f32();
  const float* sn = table.sin.f32();
  float* base = x.f32();
  for (int64_t t = 0; t < m; ++t) {
    CHECK(pos[t] >= 0 && pos[t] < table.cos.size(0)) << "position " << pos[t] << " beyond rope table";
    const float* c = cs + pos[t] * half;
    const float* s = sn + pos[t] * half;
    for (int64_t hh = 0; hh < h; ++hh) {
      float* v = base + t * x.stride(0) + hh * x.stride(1);
      for (int64_t i = 0; i < half; ++i) {
        float* pa = interleaved ? &v[2 * i] : &v[i];
        float* pb = interleaved ? &v[2 * i + 1] : &v[i + half];
        const float a = *pa, b = *pb;
        const float si = inverse ? -s[i] : s[i];
        *pa = a * c[i] - b * si;
        *pb = a * si + b * c[i];
      }
    }
  }
}

}  // namespace r1lab::core::cpu
