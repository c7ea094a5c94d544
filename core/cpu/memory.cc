// Memory ops and the elementwise/embedding ops of the CPU backend.
#include <cmath>
#include <cstring>

#include "core/cpu/cpu_backend.h"

namespace r1lab::core::cpu {

Tensor f32_values(const Tensor& t) { return t.dtype() == DType::kBF16 ? t.to_f32() : t; }

Rows rows_of(const Tensor& t) {
  CHECK(t.dtype() == DType::kF32) << "expected F32, got " << dtype_name(t.dtype());
  CHECK(t.dim() >= 1);
  if (t.dim() == 1) return Rows{t.f32(), 1, t.size(0), t.size(0)};
  CHECK_EQ(t.stride(-1), 1) << "last dimension must be contiguous, shape " << shape_str(t.shape());
  // Collapse leading dimensions when they are laid out uniformly.
  int64_t rows = 1;
  for (int d = 0; d < t.dim() - 1; ++d) rows *= t.size(d);
  const int64_t ld = t.stride(-2);
  for (int d = t.dim() - 3; d >= 0; --d) {
    CHECK_EQ(t.stride(d), t.stride(d + 1) * t.size(d + 1))
        << "rows of " << shape_str(t.shape()) << " are not uniformly strided";
  }
  return Rows{t.f32(), rows, t.size(-1), ld};
}

Tensor CpuBackend::zeros(const Shape& shape, DType dtype) { return Tensor::zeros(shape, dtype); }

void CpuBackend::upload(const Tensor& host, Tensor& dst) {
  CHECK(host.shape() == dst.shape() && host.dtype() == dst.dtype());
  CHECK(host.is_contiguous() && dst.is_contiguous());
  std::memcpy(dst.raw(), host.raw(), static_cast<size_t>(host.numel()) * dtype_size(host.dtype()));
}

Tensor CpuBackend::download(const Tensor& src) { return src.clone(); }

namespace {

// Visits every element of two same-shaped strided tensors (up to 4 dimensions) as (offset_a, offset_b).
template <typename F>
void zip4(const Tensor& a, const Tensor& b, F f) {
  CHECK(a.shape() == b.shape()) << shape_str(a.shape()) << " vs " << shape_str(b.shape());
  CHECK_LE(a.dim(), 4);
  int64_t n[4] = {1, 1, 1, 1}, sa[4] = {0, 0, 0, 0}, sb[4] = {0, 0, 0, 0};
  const int off = 4 - a.dim();
  for (int d = 0; d < a.dim(); ++d) {
    n[off + d] = a.size(d);
    sa[off + d] = a.stride(d);
    sb[off + d] = b.stride(d);
  }
  for (int64_t i = 0; i < n[0]; ++i)
    for (int64_t j = 0; j < n[1]; ++j)
      for (int64_t k = 0; k < n[2]; ++k) {
        const int64_t oa = i * sa[0] + j * sa[1] + k * sa[2];
        const int64_t ob = i * sb[0] + j * sb[1] + k * sb[2];
        for (int64_t l = 0; l < n[3]; ++l) f(oa + l * sa[3], ob + l * sb[3]);
      }
}

}  // namespace

void CpuBackend::copy(const Tensor& src, Tensor& dst) {
  if (src.dtype() == DType::kF32 && dst.dtype() == DType::kBF16) {
    const float* s = src.f32();
    uint16_t* d = dst.data<uint16_t>();
    zip4(src, dst, [&](int64_t a, int64_t b) { d[b] = f32_to_bf16(s[a]); });
    return;
  }
  if (src.dtype() == DType::kBF16 && dst.dtype() == DType::kF32) {
    const uint16_t* s = src.data<uint16_t>();
    float* d = dst.f32();
    zip4(src, dst, [&](int64_t a, int64_t b) { d[b] = bf16_to_f32(s[a]); });
    return;
  }
  CHECK(src.dtype() == dst.dtype()) << "copy: " << dtype_name(src.dtype()) << " to " << dtype_name(dst.dtype());
  const size_t es = dtype_size(src.dtype());
  const char* s = static_cast<const char*>(src.raw());
  char* d = static_cast<char*>(dst.raw());
  zip4(src, dst, [&](int64_t a, int64_t b) { std::memcpy(d + b * es, s + a * es, es); });
}

void CpuBackend::add(const Tensor& x, Tensor& y, float alpha) {
  const float* xs = x.f32();
  float* ys = y.f32();
  zip4(x, y, [&](int64_t a, int64_t b) { ys[b] += alpha * xs[a]; });
}

void CpuBackend::sum_heads(const Tensor& x, Tensor& y) {
  CHECK(x.dim() == 3 && y.dim() == 3 && y.size(1) == 1 && x.size(0) == y.size(0) && x.size(2) == y.size(2) &&
        x.stride(2) == 1 && y.stride(2) == 1)
      << "sum_heads of " << shape_str(x.shape()) << " into " << shape_str(y.shape());
  const float* xs = x.f32();
  float* ys = y.f32();
  for (int64_t m = 0; m < x.size(0); ++m)
    for (int64_t c = 0; c < x.size(2); ++c) {
      float acc = ys[m * y.stride(0) + c];
      for (int64_t h = 0; h < x.size(1); ++h) acc += xs[m * x.stride(0) + h * x.stride(1) + c];
      ys[m * y.stride(0) + c] = acc;
    }
}

void CpuBackend::fill(Tensor& t, float value) {
  CHECK(t.is_contiguous());
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = value;
}

// h = silu(g) * u, silu(g) = g * sigmoid(g).
void CpuBackend::silu_mul_forward(const Tensor& gu, Tensor& h) {
  if (h.dtype() == DType::kBF16) {  // the f32 result, rounded
    Tensor h32 = Tensor::zeros(h.shape());
    silu_mul_forward(gu, h32);
    copy(h32, h);
    return;
  }
  const Tensor gu32 = f32_values(gu);  // bf16 products (kept rounded) as their values
  Rows in = rows_of(gu32), out = rows_of(h);
  const int64_t inter = out.cols;
  CHECK_EQ(in.cols, 2 * inter);
  CHECK_EQ(in.rows, out.rows);
#pragma omp parallel for
  for (int64_t r = 0; r < in.rows; ++r) {
    const float* g = in.row(r);
    const float* u = g + inter;
    float* o = out.row(r);
    for (int64_t i = 0; i < inter; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

// d silu(g)/dg = s(g) * (1 + g * (1 - s(g))).
void CpuBackend::silu_mul_backward(const Tensor& dh, const Tensor& gu, Tensor& dgu, Tensor* h) {
  if (h != nullptr) silu_mul_forward(gu, *h);
  Rows d = rows_of(dh), in = rows_of(gu), dout = rows_of(dgu);
  const int64_t inter = d.cols;
  CHECK_EQ(in.cols, 2 * inter);
  CHECK_EQ(dout.cols, 2 * inter);
#pragma omp parallel for
  for (int64_t r = 0; r < in.rows; ++r) {
    const float* g = in.row(r);
    const float* u = g + inter;
    const float* dr = d.row(r);
    float* dg = dout.row(r);
    float* du = dg + inter;
    for (int64_t i = 0; i < inter; ++i) {
      const float s = 1.0f / (1.0f + std::exp(-g[i]));
      dg[i] = dr[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
      du[i] = dr[i] * g[i] * s;
    }
  }
}

void CpuBackend::embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out) {
  Rows t = rows_of(table), o = rows_of(out);
  CHECK(ids.dtype() == DType::kI32 && ids.is_contiguous());
  CHECK_EQ(ids.numel(), o.rows);
  CHECK_EQ(t.cols, o.cols);
  const int32_t* id = ids.data<int32_t>();
  for (int64_t m = 0; m < o.rows; ++m) {
    CHECK(id[m] >= 0 && id[m] < t.rows) << "token id " << id[m] << " outside vocabulary " << t.rows;
    std::memcpy(o.row(m), t.row(id[m]), static_cast<size_t>(o.cols) * 4);
  }
}

void CpuBackend::embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable) {
  Rows d = rows_of(dout), t = rows_of(dtable);
  const int32_t* id = ids.data<int32_t>();
  for (int64_t m = 0; m < d.rows; ++m) {
    float* dst = t.row(id[m]);
    const float* src = d.row(m);
    for (int64_t i = 0; i < d.cols; ++i) dst[i] += src[i];
  }
}

}  // namespace r1lab::core::cpu

namespace r1lab::core {
std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<cpu::CpuBackend>(); }
}  // namespace r1lab::core
