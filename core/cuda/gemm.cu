// Matrix products of the CUDA backend through cuBLAS. Our tensors are row-major; cuBLAS is column-major,
// and a row-major [r, c] matrix with row stride ld is the column-major [c, r] matrix with the same ld, so
//   C = op(A) · op(B)  (row-major)   is   Cᵀ = op(B)ᵀ · op(A)ᵀ  (column-major),
// which is one cublasGemmEx with the operands swapped and the same transpose flags.
//
// With bf16 products the f32 operands are first rounded to bf16 copies (one pass at memory bandwidth),
// then multiplied by cuBLAS's bf16 tensor-core kernels into f32 outputs: the same rounding as
// CUBLAS_COMPUTE_32F_FAST_16BF gives, at 2-3x its speed on Hopper, where the f32-input path converts
// inside a slower kernel. The copies live only for the call (stream-ordered pool memory).
#include <cuda_bf16.h>

#include <algorithm>

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

// c[m, n] = alpha · op(a) · op(b) + beta · c on row views; c is f32.
void gemm_rows(cublasHandle_t h, cublasComputeType_t ct, const void* a, cudaDataType_t at, int64_t lda, bool ta,
               const void* b, cudaDataType_t bt, int64_t ldb, bool tb, float* c, int64_t ldc, int64_t m, int64_t n,
               int64_t k, float alpha, float beta) {
  if (m == 0 || n == 0) return;
  CUBLAS_CHECK(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n),
                            static_cast<int>(m), static_cast<int>(k), &alpha, b, bt, static_cast<int>(ldb), a, at,
                            static_cast<int>(lda), &beta, c, CUDA_R_32F, static_cast<int>(ldc), ct,
                            CUBLAS_GEMM_DEFAULT));
}

// dst [rows, cols] contiguous bf16 = src rounded; 4 elements a thread when rows are float4-aligned.
template <bool kVec4>
__global__ void to_bf16_kernel(const float* src, int64_t rows, int64_t cols, int64_t ld, int64_t rows1, int64_t ld0,
                               __nv_bfloat16* dst) {
  constexpr int kPer = kVec4 ? 4 : 1;
  const int64_t per_row = cols / kPer, n = rows * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, c = (i % per_row) * kPer;
    const float* s = src + (r / rows1) * ld0 + (r % rows1) * ld + c;
    __nv_bfloat16* d = dst + r * cols + c;
    if constexpr (kVec4) {
      const float4 v = *reinterpret_cast<const float4*>(s);
      reinterpret_cast<__nv_bfloat162*>(d)[0] = __floats2bfloat162_rn(v.x, v.y);
      reinterpret_cast<__nv_bfloat162*>(d)[1] = __floats2bfloat162_rn(v.z, v.w);
    } else {
      *d = __float2bfloat16(*s);
    }
  }
}

// The grouped product for few rows a group (MoE decode: a handful of tokens an expert), where cuBLAS's
// one call per group leaves the GPU mostly idle: c[r] = a[r] · w[g]ᵀ + beta · c[r] with w[g] [n, k] bf16,
// every weight read once. A block takes kSmallTile rows of one group's w; a warp takes one w row at a
// time and dots it with the group's (at most kSmallRows) activation rows, rounded to bf16 in shared
// memory as the bf16 products round them; f32 sums in a fixed order. kSmallRows (16 or 32) rows at a
// time; up to 96 rows a group (more go to cuBLAS, whose tiles then pay off).
constexpr int kSmallTile = 64, kSmallWarps = 8, kMaxSmallGroups = 512;
struct GroupBounds {
  int32_t at[kMaxSmallGroups + 1];
};

template <int kSmallRows>
__global__ void __launch_bounds__(kSmallWarps * 32)
    grouped_small_kernel(const float* a, int64_t lda, const __nv_bfloat16* w, int64_t ldw, int64_t ldw0, float* c,
                         int64_t ldc, int n, int k, GroupBounds bounds, float beta) {
  extern __shared__ __nv_bfloat16 xs[];  // [rows, k]
  const int g = blockIdx.x, first = bounds.at[g], last = bounds.at[g + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const __nv_bfloat16* wg = w + g * ldw0;
  // kSmallRows rows at a time (a group past that reads its weights again, from L2).
  for (int r0 = first; r0 < last; r0 += kSmallRows) {
    const int rows = min(kSmallRows, last - r0);
    __syncthreads();
    for (int i = threadIdx.x; i < rows * k; i += blockDim.x)
      xs[i] = __float2bfloat16(a[static_cast<int64_t>(r0 + i / k) * lda + i % k]);
    __syncthreads();
    for (int j = blockIdx.y * kSmallTile + warp; j < min(n, (blockIdx.y + 1) * kSmallTile); j += kSmallWarps) {
      const __nv_bfloat16* wr = wg + static_cast<int64_t>(j) * ldw;
      float acc[kSmallRows];
#pragma unroll
      for (int r = 0; r < kSmallRows; ++r) acc[r] = 0.0f;
      for (int kk = lane * 8; kk < k; kk += 256) {  // 8 weights (16 bytes) a lane
        const uint4 raw = *reinterpret_cast<const uint4*>(wr + kk);
        const __nv_bfloat162* w2 = reinterpret_cast<const __nv_bfloat162*>(&raw);
        float2 wf[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) wf[q] = __bfloat1622float2(w2[q]);
#pragma unroll
        for (int r = 0; r < kSmallRows; ++r) {
          if (r < rows) {
            const uint4 xraw = *reinterpret_cast<const uint4*>(xs + r * k + kk);
            const __nv_bfloat162* x2 = reinterpret_cast<const __nv_bfloat162*>(&xraw);
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              const float2 xf = __bfloat1622float2(x2[q]);
              acc[r] = fmaf(wf[q].x, xf.x, acc[r]);
              acc[r] = fmaf(wf[q].y, xf.y, acc[r]);
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kSmallRows; ++r) {
        if (r < rows) {
          float v = acc[r];
          for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
          if (lane == 0) {
            float* out = c + static_cast<int64_t>(r0 + r) * ldc + j;
            *out = beta == 0.0f ? v : v + beta * *out;
          }
        }
      }
    }
  }
}

}  // namespace

void CudaBackend::to_bf16(const float* p, int64_t rows, int64_t cols, int64_t ld, int64_t rows1, int64_t ld0,
                          void* out) {
  if (rows == 0 || cols == 0) return;
  auto* dst = static_cast<__nv_bfloat16*>(out);
  const bool vec4 = cols % 4 == 0 && ld % 4 == 0 && ld0 % 4 == 0 && reinterpret_cast<uintptr_t>(p) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(dst) % 8 == 0;
  const int64_t work = rows * cols / (vec4 ? 4 : 1);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(blocks(work, 256), 132 * 16));
  if (vec4)
    to_bf16_kernel<true><<<grid, 256, 0, stream()>>>(p, rows, cols, ld, rows1, ld0, dst);
  else
    to_bf16_kernel<false><<<grid, 256, 0, stream()>>>(p, rows, cols, ld, rows1, ld0, dst);
  CUDA_CHECK(cudaGetLastError());
}

bool CudaBackend::bf16_products(const Tensor& a, const Tensor& b) const {
  return opt_.gemm == Options::GemmPrecision::kBF16 || a.dtype() == DType::kBF16 || b.dtype() == DType::kBF16;
}

// The operand as a product takes it: bf16 as it is; f32 as it is, or (bf16 products) a bf16 copy in `keep`.
Operand CudaBackend::gemm_operand(const Tensor& t, bool bf16, int64_t rows, int64_t cols, int64_t ld, int64_t rows1,
                                  int64_t ld0, Tensor& keep) {
  if (t.dtype() == DType::kBF16) return {t.raw(), CUDA_R_16BF, rows, cols, ld, rows1, ld0};
  const float* p = t.f32();
  if (!bf16 || rows == 0 || cols == 0) return {p, CUDA_R_32F, rows, cols, ld, rows1, ld0};
  keep = empty({rows, cols}, DType::kBF16);
  to_bf16(p, rows, cols, ld, rows1, ld0, keep.raw());
  return {keep.raw(), CUDA_R_16BF, rows, cols, cols, rows1, rows1 * cols};
}

namespace {

cublasComputeType_t operand_compute(const Operand& a, Options::GemmPrecision p) {
  return a.type == CUDA_R_16BF ? CUBLAS_COMPUTE_32F : compute_type(p);
}

// An operand of a product: f32, or bf16 (a weight kept in the backend's weight_dtype()).
void check_operand(const Tensor& t) {
  CHECK(t.defined() && t.device() == Device::kCuda) << "expected a device tensor";
  CHECK(t.dtype() == DType::kF32 || t.dtype() == DType::kBF16) << "gemm operand of dtype " << dtype_name(t.dtype());
}

size_t elem_size(const Operand& a) { return a.type == CUDA_R_16BF ? 2 : 4; }

// Row r of operand x.
const void* row_ptr(const Operand& x, int64_t r) {
  return static_cast<const char*>(x.p) + elem_size(x) * ((r / x.rows1) * x.ld0 + (r % x.rows1) * x.ld);
}

}  // namespace

void CudaBackend::gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, float alpha,
                       float beta) {
  CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2) << "gemm takes 2-D views";
  check_operand(a);
  check_operand(b);
  check_device(c, DType::kF32);
  const Rows A = rows_of(a), B = rows_of(b), C = rows_of(c);
  const int64_t m = C.rows, n = C.cols, k = trans_a ? A.rows : A.cols;
  CHECK_EQ(trans_a ? A.cols : A.rows, m) << "gemm: rows of op(a) vs c";
  CHECK_EQ(trans_b ? B.cols : B.rows, k) << "gemm: inner dimension";
  CHECK_EQ(trans_b ? B.rows : B.cols, n) << "gemm: columns of op(b) vs c";
  Op op(
      this, "gemm", 2.0 * m * n * k,
      1.0 * dtype_size(a.dtype()) * m * k + 1.0 * dtype_size(b.dtype()) * k * n + 4.0 * m * n * (beta != 0.0f ? 2 : 1));
  const bool bf16 = bf16_products(a, b);
  Tensor ka, kb;
  const Operand oa = gemm_operand(a, bf16, A.rows, A.cols, A.ld, A.rows, 0, ka);
  const Operand ob = gemm_operand(b, bf16, B.rows, B.cols, B.ld, B.rows, 0, kb);
  gemm_rows(ctx_->blas, operand_compute(oa, opt_.gemm), oa.p, oa.type, oa.ld, trans_a, ob.p, ob.type, ob.ld, trans_b,
            C.f(), C.ld, m, n, k, alpha, beta);
}

void CudaBackend::gemm_batched(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, float alpha,
                               float beta) {
  CHECK(a.dim() == 3 && b.dim() == 3 && c.dim() == 3) << "gemm_batched takes 3-D views";
  check_operand(a);
  check_operand(b);
  check_device(c, DType::kF32);
  const int64_t batch = c.size(0);
  CHECK(a.size(0) == batch && b.size(0) == batch) << "gemm_batched: batch sizes";
  CHECK(a.stride(2) == 1 && b.stride(2) == 1 && c.stride(2) == 1) << "gemm_batched: last dimensions must be contiguous";
  const int64_t m = c.size(1), n = c.size(2), k = trans_a ? a.size(1) : a.size(2);
  CHECK_EQ(trans_a ? a.size(2) : a.size(1), m) << "gemm_batched: rows of op(a) vs c";
  CHECK_EQ(trans_b ? b.size(2) : b.size(1), k) << "gemm_batched: inner dimension";
  CHECK_EQ(trans_b ? b.size(1) : b.size(2), n) << "gemm_batched: columns of op(b) vs c";
  if (batch == 0 || m == 0 || n == 0) return;
  Op op(this, "gemm_batched", 2.0 * batch * m * n * k,
        batch * (1.0 * dtype_size(a.dtype()) * m * k + 1.0 * dtype_size(b.dtype()) * k * n +
                 4.0 * m * n * (beta != 0.0f ? 2 : 1)));
  const bool bf16 = bf16_products(a, b);
  Tensor ka, kb;
  // A stack of matrices of size(1) rows each, size(0) of them, stride(0) apart.
  const Operand oa = gemm_operand(a, bf16, batch * a.size(1), a.size(2), a.stride(1), a.size(1), a.stride(0), ka);
  const Operand ob = gemm_operand(b, bf16, batch * b.size(1), b.size(2), b.stride(1), b.size(1), b.stride(0), kb);
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: the operands swap (see gemm_rows).
  CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      ctx_->blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n),
      static_cast<int>(m), static_cast<int>(k), &alpha, ob.p, ob.type, static_cast<int>(ob.ld), ob.ld0, oa.p, oa.type,
      static_cast<int>(oa.ld), oa.ld0, &beta, c.f32(), CUDA_R_32F, static_cast<int>(c.stride(1)), c.stride(0),
      static_cast<int>(batch), operand_compute(oa, opt_.gemm), CUBLAS_GEMM_DEFAULT));
}

void CudaBackend::grouped_gemm(const Tensor& a, const Tensor& w, bool trans_w, const std::vector<int64_t>& offsets,
                               Tensor& c, float beta) {
  CHECK_EQ(w.dim(), 3);
  CHECK_EQ(static_cast<int64_t>(offsets.size()), w.size(0) + 1);
  check_device(a, DType::kF32);
  check_operand(w);
  check_device(c, DType::kF32);
  CHECK_EQ(w.stride(2), 1);
  const Rows A = rows_of(a), C = rows_of(c);
  const int64_t groups = w.size(0), n = trans_w ? w.size(1) : w.size(2), k = trans_w ? w.size(2) : w.size(1);
  CHECK_EQ(A.cols, k);
  CHECK_EQ(C.cols, n);
  CHECK_EQ(offsets.back(), A.rows);
  const int64_t rows = offsets.back() - offsets.front();
  Op op(this, "grouped_gemm", 2.0 * rows * n * k,
        4.0 * (rows * k + rows * n) + 1.0 * dtype_size(w.dtype()) * groups * n * k);
  int64_t most = 0;
  for (int64_t g = 0; g < groups; ++g) most = std::max(most, offsets[g + 1] - offsets[g]);
  const size_t small_bytes = static_cast<size_t>(std::min<int64_t>(most, 32)) * k * 2;
  if (trans_w && w.dtype() == DType::kBF16 && most <= 96 && groups <= kMaxSmallGroups && k % 8 == 0 &&
      w.stride(1) % 8 == 0 && w.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(w.raw()) % 16 == 0 &&
      small_bytes <= 96 * 1024 && offsets.front() == 0 && A.rows < (int64_t{1} << 31)) {
    if (rows == 0) return;
    GroupBounds b;
    for (int64_t g = 0; g <= groups; ++g) b.at[g] = static_cast<int32_t>(offsets[g]);
    const auto kernel = most <= 16 ? grouped_small_kernel<16> : grouped_small_kernel<32>;
    if (small_bytes > 48 * 1024)  // an opt-in, per device
      CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024));
    const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>((n + kSmallTile - 1) / kSmallTile));
    kernel<<<grid, kSmallWarps * 32, small_bytes, stream()>>>(A.f(), A.ld, static_cast<const __nv_bfloat16*>(w.raw()),
                                                              w.stride(1), w.stride(0), C.f(), C.ld,
                                                              static_cast<int>(n), static_cast<int>(k), b, beta);
    CUDA_CHECK(cudaGetLastError());
    return;
  }
  const bool bf16 = bf16_products(a, w);
  Tensor ka, kw;
  const Operand oa = gemm_operand(a, bf16, A.rows, A.cols, A.ld, A.rows, 0, ka);
  const Operand ow = gemm_operand(w, bf16, groups * w.size(1), w.size(2), w.stride(1), w.size(1), w.stride(0), kw);
  const cublasComputeType_t ct = operand_compute(oa, opt_.gemm);
  const auto& sides = fork_sides();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r0 = offsets[g], nr = offsets[g + 1] - offsets[g];
    if (nr == 0) continue;
    gemm_rows(sides[g % sides.size()].blas, ct, row_ptr(oa, r0), oa.type, oa.ld, false, row_ptr(ow, g * w.size(1)),
              ow.type, ow.ld, trans_w, C.f() + r0 * C.ld, C.ld, nr, n, k, 1.0f, beta);
  }
  join_sides();
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
  const bool bf16 = bf16_products(dc, a);
  Tensor kd, ka;
  const Operand od = gemm_operand(dc, bf16, D.rows, D.cols, D.ld, D.rows, 0, kd);
  const Operand oa = gemm_operand(a, bf16, A.rows, A.cols, A.ld, A.rows, 0, ka);
  const cublasComputeType_t ct = operand_compute(od, opt_.gemm);
  const auto& sides = fork_sides();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r0 = offsets[g], nr = offsets[g + 1] - offsets[g];
    if (nr == 0) continue;
    // dw[g] [n, k] += dc[rows]ᵀ · a[rows]
    gemm_rows(sides[g % sides.size()].blas, ct, row_ptr(od, r0), od.type, od.ld, true, row_ptr(oa, r0), oa.type, oa.ld,
              false, dw.f32() + g * dw.stride(0), dw.stride(1), n, k, nr, 1.0f, 1.0f);
  }
  join_sides();
}

}  // namespace r1lab::core::cuda
