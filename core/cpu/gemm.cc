// Matrix products of the CPU backend: plain row-by-row loops with fp32 accumulation.
#include <algorithm>
#include <vector>

#include "core/cpu/cpu_backend.h"

namespace r1lab::core::cpu {
namespace {

// Σ_p x[p] * y[p] with eight independent partial sums (lets the compiler vectorise without fast-math).
inline float dot(const float* x, const float* y, int64_t n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t p = 0;
  for (; p + 8 <= n; p += 8)
    for (int l = 0; l < 8; ++l) s[l] += x[p + l] * y[p + l];
  float t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; p < n; ++p) t += x[p] * y[p];
  return t;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// c[m, n] = alpha * op(a) op(b) + beta * c on raw row-major views.
void gemm_raw(const Rows& a, bool ta, const Rows& b, bool tb, const Rows& c, float alpha, float beta) {
  const int64_t m = c.rows, n = c.cols;
  const int64_t k = ta ? a.rows : a.cols;
  CHECK_EQ(ta ? a.cols : a.rows, m) << "gemm: rows of op(a) vs c";
  CHECK_EQ(tb ? b.cols : b.rows, k) << "gemm: inner dimension";
  CHECK_EQ(tb ? b.rows : b.cols, n) << "gemm: columns of op(b) vs c";
#pragma omp parallel
  {
    std::vector<float> acc(static_cast<size_t>(n));
#pragma omp for
    for (int64_t i = 0; i < m; ++i) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      if (!ta && tb) {
        const float* ai = a.row(i);
        for (int64_t j = 0; j < n; ++j) acc[j] = dot(ai, b.row(j), k);
      } else if (!ta && !tb) {
        const float* ai = a.row(i);
        for (int64_t p = 0; p < k; ++p) axpy(ai[p], b.row(p), acc.data(), n);
      } else if (ta && !tb) {
        for (int64_t p = 0; p < k; ++p) axpy(a.row(p)[i], b.row(p), acc.data(), n);
      } else {
        for (int64_t j = 0; j < n; ++j) {
          const float* bj = b.row(j);
          float s = 0;
          for (int64_t p = 0; p < k; ++p) s += a.row(p)[i] * bj[p];
          acc[j] = s;
        }
      }
      float* ci = c.row(i);
      if (beta == 0.0f) {
        for (int64_t j = 0; j < n; ++j) ci[j] = alpha * acc[j];
      } else {
        for (int64_t j = 0; j < n; ++j) ci[j] = alpha * acc[j] + beta * ci[j];
      }
    }
  }
}

Rows sub_rows(const Rows& r, int64_t start, int64_t count) {
  return Rows{r.p + start * r.ld, count, r.cols, r.ld};
}

}  // namespace

void CpuBackend::gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, float alpha,
                      float beta) {
  CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2) << "gemm takes 2-D views";
  if (c.dtype() == DType::kBF16) {  // the f32 result, rounded
    CHECK_EQ(beta, 0.0f) << "gemm into bf16 takes beta 0";
    Tensor c32 = Tensor::zeros(c.shape());
    gemm(a, trans_a, b, trans_b, c32, alpha, 0.0f);
    copy(c32, c);
    return;
  }
  gemm_raw(rows_of(f32_values(a)), trans_a, rows_of(f32_values(b)), trans_b, rows_of(c), alpha, beta);
}

void CpuBackend::gemm_batched(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, float alpha,
                              float beta) {
  CHECK(a.dim() == 3 && b.dim() == 3 && c.dim() == 3) << "gemm_batched takes 3-D views";
  CHECK(a.size(0) == c.size(0) && b.size(0) == c.size(0)) << "gemm_batched: batch sizes";
  if (c.dtype() == DType::kBF16) {  // the f32 result, rounded
    Tensor c32 = c.to_f32();
    gemm_batched(a, trans_a, b, trans_b, c32, alpha, beta);
    copy(c32, c);
    return;
  }
  for (int64_t i = 0; i < c.size(0); ++i)
    gemm_raw(rows_of(f32_values(a[i])), trans_a, rows_of(f32_values(b[i])), trans_b, rows_of(c[i]), alpha, beta);
}

namespace {

// The group bounds as host values, checked: [groups + 1] I64, ascending within [0, rows].
const int64_t* group_bounds(const Tensor& offsets, int64_t groups, int64_t rows) {
  CHECK(offsets.device() == Device::kCpu && offsets.dtype() == DType::kI64 && offsets.is_contiguous())
      << "group offsets must be a host I64 tensor";
  CHECK_EQ(offsets.numel(), groups + 1) << "group offsets";
  const int64_t* o = offsets.data<int64_t>();
  Backend::check_group_bounds(o, groups, rows);
  return o;
}

}  // namespace

void CpuBackend::grouped_gemm(const Tensor& a, const Tensor& w, bool trans_w, const Tensor& offset_tensor, Tensor& c,
                              float beta, const Tensor* a_rows) {
  CHECK_EQ(w.dim(), 3);
  if (c.dtype() == DType::kBF16) {  // the f32 sums, rounded once (rows outside the groups round-trip exactly)
    CHECK_EQ(beta, 0.0f) << "grouped_gemm into bf16 takes beta 0";
    Tensor c32 = c.to_f32();
    grouped_gemm(a, w, trans_w, offset_tensor, c32, 0.0f, a_rows);
    copy(c32, c);
    return;
  }
  const Tensor a32 = f32_values(rows_in_order(a, a_rows)), w32 = f32_values(w);
  Rows ar = rows_of(a32), cr = rows_of(c);
  const int64_t* offsets = group_bounds(offset_tensor, w.size(0), std::min(ar.rows, cr.rows));
  for (int64_t g = 0; g < w.size(0); ++g) {
    const int64_t r0 = offsets[g], nr = offsets[g + 1] - offsets[g];
    if (nr == 0) continue;
    gemm_raw(sub_rows(ar, r0, nr), false, rows_of(w32[g]), trans_w, sub_rows(cr, r0, nr), 1.0f, beta);
  }
}

void CpuBackend::grouped_gemm_wgrad(const Tensor& dc, const Tensor& a, const Tensor& offset_tensor, Tensor& dw,
                                    float beta, const Tensor* a_rows, const Tensor* dc_rows) {
  CHECK_EQ(dw.dim(), 3);
  CHECK(beta == 0.0f || beta == 1.0f) << "grouped_gemm_wgrad adds (beta 1) or overwrites (0), not beta " << beta;
  const Tensor a32 = f32_values(rows_in_order(a, a_rows)), dc32 = f32_values(rows_in_order(dc, dc_rows));
  Rows dcr = rows_of(dc32), ar = rows_of(a32);
  const int64_t* offsets = group_bounds(offset_tensor, dw.size(0), std::min(dcr.rows, ar.rows));
  for (int64_t g = 0; g < dw.size(0); ++g) {
    const int64_t r0 = offsets[g], nr = offsets[g + 1] - offsets[g];
    Tensor dwg = dw[g];
    if (nr == 0) {
      if (beta == 0.0f) fill(dwg, 0.0f);
      continue;
    }
    gemm_raw(sub_rows(dcr, r0, nr), true, sub_rows(ar, r0, nr), false, rows_of(dwg), 1.0f, beta);
  }
}

}  // namespace r1lab::core::cpu
