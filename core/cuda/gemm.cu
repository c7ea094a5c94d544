// Matrix products of the CUDA backend through cuBLAS. Our tensors are row-major; cuBLAS is column-major,
// and a row-major [r, c] matrix with row stride ld is the column-major [c, r] matrix with the same ld, so
//   C = op(A) · op(B)  (row-major)   is   Cᵀ = op(B)ᵀ · op(A)ᵀ  (column-major),
// which is one cublasGemmEx with the operands swapped and the same transpose flags.
#include "core/cuda/cuda_backend.h"

namespace r1lab::core::cuda {
namespace {

cublasComputeType_t compute_type(Options::GemmPrecision p) {
  switch (p) {
    case Options::GemmPrecision::kTF32:
      return CUBLAS_COMPUTE_32F_FAST_TF32;
    case Options::GemmPrecision::kBF16:
      return CUBLAS_COMPUTE_32F_FAST_16BF;
    default:
      return CUBLAS_COMPUTE_32F;
  }
}

// c[m, n] = alpha · op(a) · op(b) + beta · c on f32 row views.
void gemm_rows(cublasHandle_t h, cublasComputeType_t ct, const float* a, int64_t lda, bool ta, const float* b,
               int64_t ldb, bool tb, float* c, int64_t ldc, int64_t m, int64_t n, int64_t k, float alpha,
               float beta) {
  if (m == 0 || n == 0) return;
  CUBLAS_CHECK(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n),
                            static_cast<int>(m), static_cast<int>(k), &alpha, b, CUDA_R_32F, static_cast<int>(ldb), a,
                            CUDA_R_32F, static_cast<int>(lda), &beta, c, CUDA_R_32F, static_cast<int>(ldc), ct,
                            CUBLAS_GEMM_DEFAULT));
}

}  // namespace

void CudaBackend::gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, float alpha,
                       float beta) {
  CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2) << "gemm takes 2-D views";
  check_device(a, DType::kF32);
  check_device(b, DType::kF32);
  check_device(c, DType::kF32);
  const Rows A = rows_of(a), B = rows_of(b), C = rows_of(c);
  const int64_t m = C.rows, n = C.cols, k = trans_a ? A.rows : A.cols;
  CHECK_EQ(trans_a ? A.cols : A.rows, m) << "gemm: rows of op(a) vs c";
  CHECK_EQ(trans_b ? B.cols : B.rows, k) << "gemm: inner dimension";
  CHECK_EQ(trans_b ? B.rows : B.cols, n) << "gemm: columns of op(b) vs c";
  Op op(this, "gemm", 2.0 * m * n * k, 4.0 * (m * k + k * n + m * n * (beta != 0.0f ? 2 : 1)));
  gemm_rows(ctx_->blas, compute_type(opt_.gemm), A.f(), A.ld, trans_a, B.f(), B.ld, trans_b, C.f(), C.ld, m, n, k,
            alpha, beta);
}

void CudaBackend::grouped_gemm(const Tensor& a, const Tensor& w, bool trans_w, const std::vector<int64_t>& offsets,
                               Tensor& c, float beta) {
  CHECK_EQ(w.dim(), 3);
  CHECK_EQ(static_cast<int64_t>(offsets.size()), w.size(0) + 1);
  check_device(a, DType::kF32);
  check_device(w, DType::kF32);
  check_device(c, DType::kF32);
  CHECK_EQ(w.stride(2), 1);
  const Rows A = rows_of(a), C = rows_of(c);
  const int64_t groups = w.size(0), n = trans_w ? w.size(1) : w.size(2), k = trans_w ? w.size(2) : w.size(1);
  CHECK_EQ(A.cols, k);
  CHECK_EQ(C.cols, n);
  CHECK_EQ(offsets.back(), A.rows);
  const int64_t rows = offsets.back() - offsets.front();
  Op op(this, "grouped_gemm", 2.0 * rows * n * k, 4.0 * (rows * k + groups * n * k + rows * n));
  const cublasComputeType_t ct = compute_type(opt_.gemm);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r0 = offsets[g], nr = offsets[g + 1] - offsets[g];
    if (nr == 0) continue;
    gemm_rows(ctx_->blas, ct, A.f() + r0 * A.ld, A.ld, false, w.f32() + g * w.stride(0), w.stride(1), trans_w,
              C.f() + r0 * C.ld, C.ld, nr, n, k, 1.0f, beta);
  }
}

void CudaBackend::grouped_gemm_wgrad(const Tensor& dc, const Tensor& a, const std::vector<int64_t>& offsets,
                                     Tensor& dw) {
  CHECK_EQ(dw.dim(), 3);
  CHECK_EQ(static_cast<int64_t>(offsets.size()), dw.size(0) + 1);
  check_device(dc, DType::kF32);
  check_device(a, DType::kF32);
  check_device(dw, DType::kF32);
  CHECK_EQ(dw.stride(2), 1);
  const Rows D = rows_of(dc), A = rows_of(a);
  const int64_t groups = dw.size(0), n = dw.size(1), k = dw.size(2);
  CHECK_EQ(D.cols, n);
  CHECK_EQ(A.cols, k);
  const int64_t rows = offsets.back() - offsets.front();
  Op op(this, "grouped_gemm_wgrad", 2.0 * rows * n * k, 4.0 * (rows * (n + k) + 2 * groups * n * k));
  const cublasComputeType_t ct = compute_type(opt_.gemm);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r0 = offsets[g], nr = offsets[g + 1] - offsets[g];
    if (nr == 0) continue;
    // dw[g] [n, k] += dc[rows]ᵀ · a[rows]
    gemm_rows(ctx_->blas, ct, D.f() + r0 * D.ld, D.ld, true, A.f() + r0 * A.ld, A.ld, false,
              dw.f32() + g * dw.stride(0), dw.stride(1), n, k, nr, 1.0f, 1.0f);
  }
}

}  // namespace r1lab::core::cuda
