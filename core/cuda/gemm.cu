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
#include <cudaTypedefs.h>

#include <algorithm>

#include "core/cuda/cuda_backend.h"
#include "core/cuda/silu.cuh"
#include "core/cuda/mma.cuh"
#include "core/cuda/wgmma.cuh"

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

// c[m, n] = alpha · op(a) · op(b) + beta · c on row views; c is f32 (or, ctype bf16, the f32 sums rounded).
void gemm_rows(cublasHandle_t h, cublasComputeType_t ct, const void* a, cudaDataType_t at, int64_t lda, bool ta,
               const void* b, cudaDataType_t bt, int64_t ldb, bool tb, void* c, int64_t ldc, int64_t m, int64_t n,
               int64_t k, float alpha, float beta, cudaDataType_t ctype = CUDA_R_32F) {
  if (m == 0 || n == 0) return;
  CUBLAS_CHECK(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n),
                            static_cast<int>(m), static_cast<int>(k), &alpha, b, bt, static_cast<int>(ldb), a, at,
                            static_cast<int>(lda), &beta, c, ctype, static_cast<int>(ldc), ct, CUBLAS_GEMM_DEFAULT));
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
// time; taken up to 4 rows a group on average (more go to the tensor-core kernel below).
constexpr int kSmallTile = 64, kSmallWarps = 8;

__device__ __forceinline__ __nv_bfloat16 as_bf16(float v) { return __float2bfloat16(v); }
__device__ __forceinline__ __nv_bfloat16 as_bf16(__nv_bfloat16 v) { return v; }

// A sum into an output of the grouped products: f32 with beta, or bf16 rounded (beta 0).
__device__ __forceinline__ void put_sum(float* out, float v, float beta) { *out = beta == 0.0f ? v : v + beta * *out; }
__device__ __forceinline__ void put_sum(__nv_bfloat16* out, float v, float) { *out = __float2bfloat16(v); }

// a_rows (not null): row r of a is a[a_rows[r]].
template <int kSmallRows, typename TA, typename TC>
__global__ void __launch_bounds__(kSmallWarps * 32)
    grouped_small_kernel(const TA* a, int64_t lda, const __nv_bfloat16* w, int64_t ldw, int64_t ldw0, TC* c,
                         int64_t ldc, int n, int k, const int64_t* bounds, float beta, const int32_t* a_rows) {
  extern __shared__ __nv_bfloat16 xs[];  // [rows, k]
  const int g = blockIdx.x, first = static_cast<int>(bounds[g]), last = static_cast<int>(bounds[g + 1]);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const __nv_bfloat16* wg = w + g * ldw0;
  // kSmallRows rows at a time (a group past that reads its weights again, from L2).
  for (int r0 = first; r0 < last; r0 += kSmallRows) {
    const int rows = min(kSmallRows, last - r0);
    __syncthreads();
    for (int i = threadIdx.x; i < rows * k; i += blockDim.x) {
      const int r = r0 + i / k;
      xs[i] = as_bf16(a[static_cast<int64_t>(a_rows != nullptr ? a_rows[r] : r) * lda + i % k]);
    }
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
          if (lane == 0) put_sum(c + static_cast<int64_t>(r0 + r) * ldc + j, v, beta);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Grouped products on tensor cores, one launch for all groups, group bounds read on the device (the
// host never waits for them). A block computes a kTileM × kTileN tile of one group's
//   C[m, n] = Σ_k A(m, k) · B(k, n) + beta · C[m, n]
// from bf16 operands (f32 ones are rounded into bf16 copies first, as the bf16 products round them) in
// kTileK steps through a kStages-deep cp.async pipeline: the loads of later steps are in flight while
// the tensor cores work on the current one. Each operand stays in shared memory as it lies in global
// memory, k-contiguous or not, and ldmatrix (transposing where needed) makes the mma.sync m16n8k16
// fragments. 8 warps of 64 × 32 outputs; f32 sums in a fixed order, no atomics, so results repeat
// bitwise.
constexpr int kTileM = 128, kTileN = 128, kTileK = 64, kStages = 3, kTcThreads = 256, kTcPad = 8;
// The grouped product's row tiles: 32 rows up to this mean a group, 64 up to the next, else kTileM.
// On an H100 (bench/rollout's decode kernels alone, the benchmark model's experts: 32 of them, 4 a
// token), gate_up + down at batch 64 (8 rows a group): 128-row tiles 47.8 us, 64-row 43.4, 32-row 38.9;
// at batch 256 (32 a group): 128-row 53.5, 64-row 49.5, 32-row 59.7. Inside a decode step, with the
// routing's uneven groups and the weights not in L2 (ncu, 7 MoE layers), the down product (k 512) at
// batch 256 took 21.1 us on 64-row mma.sync tiles, 17.7 on Hopper's 128-row warpgroup kernel and 17.4 on
// its 64-row one (one warpgroup a block, 3 blocks an SM; kernels alone 12.6 -> 10.1 us against 128
// rows); the gated gate/up 40.1, 40.0 and 38.9. So on Hopper 64-row tiles take the one-warpgroup kernel.
constexpr int kGroupedTile32 = 24, kGroupedTile64 = 64;
// The column tile of the 64-row warpgroup kernels (kGroupedTile64's, Hopper). A decode step's experts
// stream their weights: a 128-column tile of the gated gate/up is 256 KB of them, and ~290 such tiles
// over 132 SMs leave some SMs three and most two. 64 columns give twice the tiles at half the bytes each,
// four blocks an SM, and an evener spread: on an H100 at batch 256 (ncu, 7 MoE layers in a decode step)
// the gated gate/up went 39.0 -> 35.9 us a call and the down product 17.5 -> 17.1.
constexpr int kDecodeTileN = 64;
// The column tile of a warpgroup product with row tiles of tm rows (kTileM or 64).
constexpr int wg_column_tile(int tm) { return tm == 64 ? kDecodeTileN : kTileN; }

// A k-contiguous tile whose row i lies at a + index[i]·ld (gathered rows), loaded kPer 16-byte chunks a
// thread by kThreads threads (chunk threadIdx.x + u·kThreads: row that / (kTileK / 8), its k the rest ·
// 8): rows() takes the rows this thread's chunks read, once a tile (null past the ni rows inside the
// matrix); load() each step's tile from them, from k0 with nk ks inside the matrix, chunk (i, k) to at(i,
// k) in shared memory.
template <int kPer, int kThreads>
struct GatheredRows {
  __device__ static void rows(const __nv_bfloat16* (&rp)[kPer], const __nv_bfloat16* a, int64_t ld,
                              const int32_t* index, int ni) {
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int i = (threadIdx.x + u * kThreads) / (kTileK / 8);
      rp[u] = i < ni ? a + static_cast<int64_t>(index[i]) * ld : nullptr;
    }
  }
  template <typename At>
  __device__ static void load(const __nv_bfloat16* const (&rp)[kPer], const __nv_bfloat16* any, int k0, int nk,
                              At&& at) {
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int idx = threadIdx.x + u * kThreads;
      const int i = idx / (kTileK / 8), k = (idx % (kTileK / 8)) * 8;
      const bool valid = rp[u] != nullptr && k < nk;
      tc::cp_async16(at(i, k), valid ? rp[u] + k0 + k : any, valid);
    }
  }
};

// One operand's tile: kExtent rows along m (or n) by kTileK along k. kK: k is the contiguous dimension
// in global memory (element (i, k) at p[i·ld + k]), else i is (at p[k·ld + i]). Shared memory keeps the
// same orientation: [kExtent][kTileK + pad] or [kTileK][kExtent + pad] (the pad puts the rows ldmatrix
// reads together in distinct banks).
template <bool kK, int kExtent>
struct TcTile {
  static constexpr int kLd = kK ? kTileK + kTcPad : kExtent + kTcPad;
  static constexpr int kStage = kK ? kExtent * kLd : kTileK * kLd;  // a pipeline stage's tile, in elements
  static constexpr int kChunks = kExtent * kTileK / 8;  // of 16 bytes
  static_assert(kChunks % kTcThreads == 0, "tile not a whole number of chunks a thread");

  // The tile at p (its first element), ni rows and nk ks of it inside the matrix (the contiguous extent
  // is a multiple of 8, so a chunk is wholly in or out; chunks out are zero-filled).
  __device__ static void load(__nv_bfloat16* smem, const __nv_bfloat16* p, int64_t ld, int ni, int nk) {
#pragma unroll
    for (int u = 0; u < kChunks / kTcThreads; ++u) {
      const int idx = threadIdx.x + u * kTcThreads;
      int i, k;
      if constexpr (kK) {
        i = idx / (kTileK / 8);
        k = (idx % (kTileK / 8)) * 8;
      } else {
        k = idx / (kExtent / 8);
        i = (idx % (kExtent / 8)) * 8;
      }
      const bool valid = i < ni && k < nk;
      const __nv_bfloat16* src = kK ? p + i * ld + k : p + k * ld + i;
      tc::cp_async16(smem + (kK ? i * kLd + k : k * kLd + i), valid ? src : p, valid);
    }
  }
  // A k-contiguous tile whose first half of rows starts at p and second half at p2, ni rows of each.
  __device__ static void load_pair(__nv_bfloat16* smem, const __nv_bfloat16* p, const __nv_bfloat16* p2, int64_t ld,
                                   int ni, int nk) {
    static_assert(kK && kExtent % 2 == 0, "pairs of k-contiguous halves");
#pragma unroll
    for (int u = 0; u < kChunks / kTcThreads; ++u) {
      const int idx = threadIdx.x + u * kTcThreads;
      const int i = idx / (kTileK / 8), k = (idx % (kTileK / 8)) * 8;
      const bool hi = i >= kExtent / 2;
      const int ih = hi ? i - kExtent / 2 : i;
      const bool valid = ih < ni && k < nk;
      const __nv_bfloat16* src = (hi ? p2 : p) + ih * ld + k;
      tc::cp_async16(smem + i * kLd + k, valid ? src : p, valid);
    }
  }
  // Gathered rows (GatheredRows), k-contiguous.
  static constexpr int kPer = kChunks / kTcThreads;
  using Gathered = GatheredRows<kPer, kTcThreads>;
  __device__ static void load_gathered(__nv_bfloat16* smem, const __nv_bfloat16* const (&rp)[kPer],
                                       const __nv_bfloat16* any, int k0, int nk) {
    static_assert(kK, "gathered rows are k-contiguous");
    Gathered::load(rp, any, k0, nk, [&](int i, int k) { return smem + i * kLd + k; });
  }
};

// Where a grouped product's operand rows come from: in order, or by an index (the experts reading their
// tokens' rows where they lie): kGatherA, A's rows (k-contiguous A, the forward); kGatherK, the k rows of
// a B stored [k][n], and kGatherKA, of an A stored [k][m] (the weight gradient, which sums over the rows).
enum Gather { kInOrder = 0, kGatherA = 1, kGatherK = 2, kGatherKA = 3 };

// Issues step s of a product's pipeline (of `steps`): the A and B tiles of its k range into stage
// s % kStages of sa and sb (TileA and TileB lay them out; each tile kStage units of *sa), then commits
// (an empty group past the end keeps the count uniform). pa, pb: the block's first row (or column) of
// each operand; kGated: b's rows from pb and pb + gate_to_up rows (TileB::load_pair).
// kGatherA: A's rows from rows_a (TileA::Gathered::rows); kGatherK (kGatherKA): B's (A's) k rows of step
// s from k_rows (its kTileK indices in shared memory).
template <typename TileA, typename TileB, bool kAK, bool kBK, bool kGated, int kGather = kInOrder, bool kSkipB = false,
          typename T>
__device__ __forceinline__ void issue_step(int s, int steps, T* sa, T* sb, const __nv_bfloat16* pa, int64_t lda,
                                           const __nv_bfloat16* pb, int64_t ldb, int64_t gate_to_up, int ni_a,
                                           int ni_b, int K, const __nv_bfloat16* const (&rows_a)[TileA::kPer],
                                           const int32_t* k_rows) {
  static_assert(kGather != kGatherA || kAK, "gathered A rows are k-contiguous");
  static_assert(kGather != kGatherK || (!kBK && !kGated), "gathered k rows of a B stored [k][n]");
  static_assert(kGather != kGatherKA || !kAK, "gathered k rows of an A stored [k][m]");
  if (s < steps) {
    const int k0 = s * kTileK, st = s % kStages;
    if constexpr (kGather == kGatherA)
      TileA::load_gathered(sa + st * TileA::kStage, rows_a, pa, k0, K - k0);
    else if constexpr (kGather == kGatherKA)
      TileA::load_k_rows(sa + st * TileA::kStage, pa, lda, k_rows, ni_a, K - k0);
    else
      TileA::load(sa + st * TileA::kStage, kAK ? pa + k0 : pa + k0 * lda, lda, ni_a, K - k0);
    if constexpr (kSkipB)
      ;  // B comes by TMA (wg_accumulate's kTmaB)
    else if constexpr (kGated)
      TileB::load_pair(sb + st * TileB::kStage, pb + k0, pb + gate_to_up * ldb + k0, ldb, ni_b, K - k0);
    else if constexpr (kGather == kGatherK)
      TileB::load_k_rows(sb + st * TileB::kStage, pb, ldb, k_rows, ni_b, K - k0);
    else
      TileB::load(sb + st * TileB::kStage, kBK ? pb + k0 : pb + k0 * ldb, ldb, ni_b, K - k0);
  }
  tc::cp_async_commit();
}

// The pipeline's shared memory for row tiles of kTM rows (either orientation of either operand).
template <int kTM>
constexpr size_t tc_smem() {
  constexpr int a = std::max(TcTile<true, kTM>::kStage, TcTile<false, kTM>::kStage);
  constexpr int b = std::max(TcTile<true, kTileN>::kStage, TcTile<false, kTileN>::kStage);
  return sizeof(__nv_bfloat16) * kStages * (a + b);
}
constexpr size_t kTcSmem = tc_smem<kTileM>();

// A tensor-core grouped kernel's launch attributes: its pipeline's shared memory, and a carveout that
// leaves room for 2 blocks an SM.
template <typename K>
void set_tc_attributes(K kernel, size_t smem = kTcSmem) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
}

// The A operand (16 rows × 16 k) at row r, step kk of a tile stored [k][m] (transposed by ldmatrix).
__device__ __forceinline__ void load_a_km(uint32_t* a, const __nv_bfloat16* p, int ld) {
  const int lane = threadIdx.x % 32;
  tc::ldsm4_t(a, p + (lane % 8 + (lane / 16) * 8) * ld + ((lane / 8) % 2) * 8);
}

// The f32 sums of the block's tile at (m0, n0) of one product (8 warps, 2 along m by 4 along n), as
// tc_tile below stores them. kGated (B k-contiguous): the tile's first kTileN / 2 columns are b's rows n0 + j and its last are
// rows gate_to_up + n0 + j, so that a gated product's gate and up columns meet in one block.
// kGatherA: A's rows gathered, row i at a + a_rows[i]·lda.
template <bool kAK, bool kBK, int kTM, bool kGated = false, int kGather = kInOrder>
__device__ __forceinline__ void tc_accumulate(float (&acc)[kTM / 32][4][4], const __nv_bfloat16* a, int64_t lda,
                                              const __nv_bfloat16* b, int64_t ldb, int M, int N, int K, int m0,
                                              int n0, int64_t gate_to_up = 0, const int32_t* a_rows = nullptr) {
  static_assert(kGather == kInOrder || kGather == kGatherA, "the mma.sync kernels gather A's rows only");
  static_assert(kTM == 128 || kTM == 64 || kTM == 32, "row tiles of 128, 64 or 32");
  static_assert(!kGated || kBK, "gated tiles read k-contiguous weights");
  constexpr int kMi = kTM / 32;  // m16 tiles a warp
  using TileA = TcTile<kAK, kTM>;
  using TileB = TcTile<kBK, kTileN>;
  extern __shared__ __align__(16) unsigned char tc_smem[];
  __nv_bfloat16* sa = reinterpret_cast<__nv_bfloat16*>(tc_smem);
  __nv_bfloat16* sb = sa + kStages * TileA::kStage;
  const __nv_bfloat16* pa = kAK ? a + m0 * lda : a + m0;
  const __nv_bfloat16* pb = kBK ? b + n0 * ldb : b + n0;
  const int ni_a = min(kTM, M - m0), ni_b = min(kGated ? kTileN / 2 : kTileN, N - n0);
  const int warp = threadIdx.x / 32, wm = warp / 4, wn = warp % 4;
#pragma unroll
  for (int i = 0; i < kMi; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  const int steps = (K + kTileK - 1) / kTileK;
  const __nv_bfloat16* rows_a[TileA::kPer] = {};
  if constexpr (kGather == kGatherA) TileA::Gathered::rows(rows_a, a, lda, a_rows + m0, ni_a);
  const auto issue = [&](int s) {
    issue_step<TileA, TileB, kAK, kBK, kGated, kGather>(s, steps, sa, sb, kGather == kGatherA ? a : pa, lda, pb, ldb,
                                                        gate_to_up, ni_a, ni_b, K, rows_a, nullptr);
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);
  for (int s = 0; s < steps; ++s) {
    tc::cp_async_wait<kStages - 2>();
    __syncthreads();  // step s is in; every warp is done with step s - 1, whose buffer is reloaded next
    issue(s + kStages - 1);
    const __nv_bfloat16* ta = sa + (s % kStages) * TileA::kStage;
    const __nv_bfloat16* tb = sb + (s % kStages) * TileB::kStage;
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      uint32_t fa[kMi][4];
#pragma unroll
      for (int i = 0; i < kMi; ++i) {
        const int r = wm * (kTM / 2) + i * 16;
        if constexpr (kAK)
          tc::load_a(fa[i], ta + r * TileA::kLd + kk, TileA::kLd);
        else
          load_a_km(fa[i], ta + kk * TileA::kLd + r, TileA::kLd);
      }
#pragma unroll
      for (int jp = 0; jp < 2; ++jp) {
        const int col = wn * 32 + jp * 16;
        uint32_t fb[4];
        if constexpr (kBK)
          tc::load_b_nk(fb, tb + col * TileB::kLd + kk, TileB::kLd);
        else
          tc::load_b_kn(fb, tb + kk * TileB::kLd + col, TileB::kLd);
#pragma unroll
        for (int i = 0; i < kMi; ++i) {
          tc::mma(acc[i][2 * jp], fa[i], fb[0], fb[1]);
          tc::mma(acc[i][2 * jp + 1], fa[i], fb[2], fb[3]);
        }
      }
    }
  }
  tc::cp_async_wait<0>();
}

// Calls f(r, col, i, j, e) for each sum acc[i][j][e] that this thread holds of a block's kTM-row tile
// (tc_accumulate's layout): its row r of the M rows, and its column col of the N, counted from the
// warp's first column n_warp. Rows and columns past the ends are skipped.
template <int kTM, typename F>
__device__ __forceinline__ void for_each_fragment(int m0, int n_warp, int M, int N, F&& f) {
  const int wm = threadIdx.x / 128, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
#pragma unroll
  for (int i = 0; i < kTM / 32; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = m0 + wm * (kTM / 2) + i * 16 + g + 8 * h;
        if (r >= M) continue;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = n_warp + j * 8 + 2 * q + e;
          if (col < N) f(r, col, i, j, 2 * h + e);
        }
      }
}

// The block's tile at (m0, n0) of one product: kTM × kTileN of the M × N outputs over K, a
// (k-contiguous if kAK) and b (k-contiguous if kBK) bf16, c f32 rows (or bf16: put_sum). kTM (128, 64
// or 32) rows: a warp takes kTM / 2 of them by 32 columns. Fewer rows a tile suit groups of few rows
// (MoE decode), where a 128-row tile would spend its tensor-core time on rows past the group's end.
template <bool kAK, bool kBK, int kTM = kTileM, typename TC = float>
__device__ __forceinline__ void tc_tile(const __nv_bfloat16* a, int64_t lda, const __nv_bfloat16* b, int64_t ldb,
                                        TC* c, int64_t ldc, int M, int N, int K, int m0, int n0, float beta) {
  constexpr int kMi = kTM / 32;
  float acc[kMi][4][4];
  tc_accumulate<kAK, kBK, kTM>(acc, a, lda, b, ldb, M, N, K, m0, n0);
  for_each_fragment<kTM>(m0, n0 + threadIdx.x / 32 % 4 * 32, M, N, [&](int r, int col, int i, int j, int e) {
    put_sum(c + static_cast<int64_t>(r) * ldc + col, acc[i][j][e], beta);
  });
}

// Row tile blockIdx.y, counted over all groups' tiles of kTM rows in order: its group (-1 past the last
// group's tiles) and its first row within the group, in shared memory for the whole block.
template <int kTM>
__device__ __forceinline__ void find_row_tile(const int64_t* bounds, int groups, int* tile_group, int* tile_row) {
  if (threadIdx.x < 32) {  // the first warp scans the groups' tile counts, 32 groups at a time
    const int lane = threadIdx.x;
    int t = blockIdx.y, found = -1, row = 0;
    for (int base = 0; base < groups && found < 0; base += 32) {
      const int g = base + lane;
      const int tiles = g < groups ? static_cast<int>((bounds[g + 1] - bounds[g] + kTM - 1) / kTM) : 0;
      int upto = tiles;  // inclusive prefix sum over the lanes
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, upto, o);
        if (lane >= o) upto += v;
      }
      const unsigned hit = __ballot_sync(0xffffffffu, t >= upto - tiles && t < upto);
      if (hit) {
        const int l = __ffs(static_cast<int>(hit)) - 1;
        found = base + l;
        row = (t - __shfl_sync(0xffffffffu, upto - tiles, l)) * kTM;
      } else {
        t -= __shfl_sync(0xffffffffu, upto, 31);
      }
    }
    if (lane == 0) {
      *tile_group = found;
      *tile_row = row;
    }
  }
  __syncthreads();
}

// The block's row tile, blockIdx.y: its group (-1: none), its first row within the group, and the
// group's first row and row count. A dense product (bounds null) is one group of dense_rows rows.
struct RowTile {
  int group, row;
  int64_t r0;
  int rows;
};
template <int kTM>
__device__ __forceinline__ RowTile row_tile(const int64_t* bounds, int groups, int64_t dense_rows) {
  if (bounds == nullptr) {
    const int row = static_cast<int>(blockIdx.y) * kTM;
    return {row < dense_rows ? 0 : -1, row, 0, static_cast<int>(dense_rows)};
  }
  __shared__ int tile_group, tile_row;
  find_row_tile<kTM>(bounds, groups, &tile_group, &tile_row);
  const int g = tile_group;
  if (g < 0) return {-1, 0, 0, 0};
  return {g, tile_row, bounds[g], static_cast<int>(bounds[g + 1] - bounds[g])};
}

// c[r] = a[r] · op(w[g]) + beta · c[r] for the rows r of group g: blockIdx.x picks the column tile,
// blockIdx.y the row tile (of kTM rows) counted over all groups in order (the grid has enough for any
// bounds; blocks past the last group's tiles return). Without bounds, the dense product of dense_rows
// rows by w.
template <bool kBK, int kTM, typename TC>
__global__ void __launch_bounds__(kTcThreads, 2)
    grouped_tc_kernel(const __nv_bfloat16* a, int64_t lda, const __nv_bfloat16* w, int64_t ldw, int64_t ldw0,
                      TC* c, int64_t ldc, const int64_t* bounds, int groups, int n, int k, float beta,
                      int64_t dense_rows) {
  const RowTile t = row_tile<kTM>(bounds, groups, dense_rows);
  if (t.group < 0) return;
  tc_tile<true, kBK, kTM, TC>(a + t.r0 * lda, lda, w + t.group * ldw0, ldw, c + t.r0 * ldc, ldc, t.rows, n, k, t.row,
                              blockIdx.x * kTileN, beta);
}

// A gated tile: h[m0 + i, n0 + j] = silu(g) · u in bf16, for the gate sums g of b's rows n0 + j and the
// up sums u of rows gate_to_up + n0 + j (j < kTileN / 2). Warps 0 and 1 of each row half hold the gate
// sums that warps 2 and 3 hold the up sums for, fragment for fragment: they pass them through shared
// memory, and the up warps write h. The same sums and the same expression as tc_tile then
// silu_mul_forward, so the same bits.
// With gu (not null), the sums themselves also go there rounded, gate columns then up columns ([M, 2N]
// rows of stride ldgu): each warp writes its own. h is then made from the rounded sums, as
// silu_mul_forward makes it from gu: what backward reads and what a backward that remakes h makes agree.
// kGather as tc_accumulate's (a_rows: the group's A rows).
template <int kTM, int kGather = kInOrder>
__device__ __forceinline__ void tc_gated_tile(const __nv_bfloat16* a, int64_t lda, const __nv_bfloat16* b,
                                              int64_t ldb, int64_t gate_to_up, __nv_bfloat16* h, int64_t ldh,
                                              __nv_bfloat16* gu, int64_t ldgu, int M, int N, int K, int m0, int n0,
                                              const int32_t* a_rows = nullptr) {
  constexpr int kMi = kTM / 32;
  float acc[kMi][4][4];
  tc_accumulate<true, true, kTM, true, kGather>(acc, a, lda, b, ldb, M, N, K, m0, n0, gate_to_up, a_rows);
  if (gu != nullptr) {
    const int wn = threadIdx.x / 32 % 4;  // warps 0, 1: gate columns; 2, 3: the same columns' up sums
    __nv_bfloat16* half = gu + (wn < 2 ? 0 : N);
    for_each_fragment<kTM>(m0, n0 + wn % 2 * 32, M, N, [&](int r, int col, int i, int j, int e) {
      half[static_cast<int64_t>(r) * ldgu + col] = __float2bfloat16(acc[i][j][e]);
    });
  }
  extern __shared__ __align__(16) unsigned char gated_smem[];
  float* pass = reinterpret_cast<float*>(gated_smem);  // [wm][wn < 2][i][j][e][lane]
  static_assert(2 * 2 * kMi * 16 * 32 * sizeof(float) <= tc_smem<kTM>(), "the gate sums fit the pipeline's memory");
  const int warp = threadIdx.x / 32, wm = warp / 4, wn = warp % 4;
  const int lane = threadIdx.x % 32;
  __syncthreads();  // every warp is done with the pipeline's buffers
  float* mine = pass + ((wm * 2 + wn % 2) * kMi * 16) * 32 + lane;
  if (wn < 2) {
#pragma unroll
    for (int i = 0; i < kMi; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) mine[((i * 4 + j) * 4 + e) * 32] = acc[i][j][e];
  }
  __syncthreads();
  if (wn < 2) return;
  for_each_fragment<kTM>(m0, n0 + (wn - 2) * 32, M, N, [&](int r, int col, int i, int j, int e) {
    float gs = mine[((i * 4 + j) * 4 + e) * 32], us = acc[i][j][e];
    if (gu != nullptr) {
      gs = __bfloat162float(__float2bfloat16(gs));
      us = __bfloat162float(__float2bfloat16(us));
    }
    h[static_cast<int64_t>(r) * ldh + col] = __float2bfloat16(silu_gate(gs, us));
  });
}

// h[r] = silu(a[r] · w[g][0:n]ᵀ) · (a[r] · w[g][n:2n]ᵀ) for the rows r of group g, bf16 (and the products
// into gu, rounded, unless it is null): blockIdx.x picks n's column tile of kTileN / 2, blockIdx.y the row
// tile as in grouped_tc_kernel.
// kGather (kGatherA): row r of a is a[a_rows[r]].
template <int kTM, int kGather = kInOrder>
__global__ void __launch_bounds__(kTcThreads, 2)
    grouped_gated_kernel(const __nv_bfloat16* a, int64_t lda, const __nv_bfloat16* w, int64_t ldw, int64_t ldw0,
                         __nv_bfloat16* h, int64_t ldh, __nv_bfloat16* gu, int64_t ldgu, const int64_t* bounds,
                         int groups, int n, int k, const int32_t* a_rows) {
  __shared__ int tile_group, tile_row;
  find_row_tile<kTM>(bounds, groups, &tile_group, &tile_row);
  const int g = tile_group;
  if (g < 0) return;
  const int64_t r0 = bounds[g];
  tc_gated_tile<kTM, kGather>(kGather == kGatherA ? a : a + r0 * lda, lda, w + g * ldw0, ldw, n, h + r0 * ldh, ldh,
                              gu ? gu + r0 * ldgu : nullptr, ldgu, static_cast<int>(bounds[g + 1] - r0), n, k,
                              tile_row, blockIdx.x * (kTileN / 2), kGather == kGatherA ? a_rows + r0 : nullptr);
}

// Zeros in the block's tile (kTileM × kTileN at (m0, n0)) of the M × N matrix c: a weight gradient
// overwritten (beta 0) for a group without rows.
__device__ __forceinline__ void zero_tile(float* c, int64_t ldc, int M, int N, int m0, int n0) {
  for (int i = threadIdx.x; i < kTileM * kTileN; i += blockDim.x) {
    const int r = m0 + i / kTileN, col = n0 + i % kTileN;
    if (r < M && col < N) c[static_cast<int64_t>(r) * ldc + col] = 0.0f;
  }
}

// dw[g] [n, k] = beta · dw[g] + dc[rows_g]ᵀ · a[rows_g] (beta 1 or 0): blockIdx.z is the group; the sum
// runs over its rows.
__global__ void __launch_bounds__(kTcThreads, 2)
    grouped_wgrad_tc_kernel(const __nv_bfloat16* dc, int64_t lddc, const __nv_bfloat16* a, int64_t lda, float* dw,
                            int64_t ldw, int64_t ldw0, const int64_t* bounds, int n, int k, float beta) {
  const int g = blockIdx.z;
  const int64_t r0 = bounds[g];
  const int rows = static_cast<int>(bounds[g + 1] - r0);
  if (rows <= 0) {
    if (beta == 0.0f) zero_tile(dw + g * ldw0, ldw, n, k, blockIdx.y * kTileM, blockIdx.x * kTileN);
    return;
  }
  tc_tile<false, false>(dc + r0 * lddc, lddc, a + r0 * lda, lda, dw + g * ldw0, ldw, n, k, rows, blockIdx.y * kTileM,
                        blockIdx.x * kTileN, beta);
}

// ---------------------------------------------------------------------------------------------------
// The same grouped products on Hopper's warpgroup products (wgmma.cuh), for row tiles of kTileM: a
// block's 2 warpgroups compute its kTileM × kTileN tile, 64 rows each by all kTileN columns, from
// operands in 128-byte swizzled shared memory (k-contiguous or not, as they lie in global memory: the
// products read either orientation), filled by the same kStages-deep cp.async pipeline. Each step's 4
// products (k 16 each) run asynchronously while the loads of later steps are in flight. f32 sums in a
// fixed order, so results repeat bitwise; they are not the mma.sync kernels' bits, and a backend takes
// one kind or the other for every product (CudaBackend::hopper_).
// A block of kWG warpgroups (1 or 2) takes a row tile of 64 · kWG rows: 2 where groups are long (training,
// prefill); 1 where they are short (MoE decode: 32 rows a group at batch 256), which wastes half as many
// products on rows past a group's end and, with a third of the shared memory, fits 3 blocks an SM (a
// decode step's ~300 tiles in one wave instead of 1.5; what that bought: kGroupedTile64).
// The warpgroup kernels' dynamic shared memory, from wg::smem_base: the pipeline's tiles (which the staged
// epilogues' rows reuse), + room to align them to 1024 bytes.
constexpr size_t wg_smem_bytes(int wg, int bn = kTileN) {
  return kStages * (64 * wg * kTileK * 2 + bn * kTileK * 2) + 1024;
}
constexpr size_t kWgSmem = wg_smem_bytes(2);
static_assert(kTileM == kTileN && kTileM == 128 && kTileK == 64,
              "the swizzled tiles are 64-row multiples of 64 k (128 bytes)");

// One operand's tile of kRows rows (or columns, a multiple of 64) by kTileK, swizzled (the layouts of
// wgmma.cuh), loaded by kThreads threads. kK: k is the contiguous dimension in global memory (element
// (i, k) at p[i·ld + k]), else i is.
template <bool kK, int kRows = kTileM, int kThreads = kTcThreads>
struct WgTile {
  static constexpr int kBytes = kRows * kTileK * 2;
  static constexpr int kStage = kBytes;                // a pipeline stage's tile, in bytes
  static constexpr int kChunks = kRows * kTileK / 8;  // of 16 bytes
  static_assert(kRows % 64 == 0 && kChunks % kThreads == 0, "tile not a whole number of chunks a thread");

  // Byte offset of the chunk that holds elements (i, k..k+7) (kK) or (i..i+7, k).
  __device__ static int offset(int i, int k) {
    if constexpr (kK)
      return i * 128 + (((k >> 3) ^ (i & 7)) << 4);
    else
      return (i >> 6) * 8192 + k * 128 + ((((i >> 3) & 7) ^ (k & 7)) << 4);
  }
  // As TcTile::load: the tile at p, ni rows and nk ks of it inside the matrix, the rest zero-filled.
  __device__ static void load(unsigned char* smem, const __nv_bfloat16* p, int64_t ld, int ni, int nk) {
#pragma unroll
    for (int u = 0; u < kChunks / kThreads; ++u) {
      const int idx = threadIdx.x + u * kThreads;
      const int i = kK ? idx / (kTileK / 8) : (idx % (kRows / 8)) * 8;
      const int k = kK ? (idx % (kTileK / 8)) * 8 : idx / (kRows / 8);
      const bool valid = i < ni && k < nk;
      const __nv_bfloat16* src = kK ? p + i * ld + k : p + k * ld + i;
      tc::cp_async16(smem + offset(i, k), valid ? src : p, valid);
    }
  }
  // As TcTile::load_pair: the first half of the rows from p, the second from p2, ni rows of each.
  __device__ static void load_pair(unsigned char* smem, const __nv_bfloat16* p, const __nv_bfloat16* p2, int64_t ld,
                                   int ni, int nk) {
    static_assert(kK, "pairs of k-contiguous halves");
#pragma unroll
    for (int u = 0; u < kChunks / kThreads; ++u) {
      const int idx = threadIdx.x + u * kThreads;
      const int i = idx / (kTileK / 8), k = (idx % (kTileK / 8)) * 8;
      const bool hi = i >= kRows / 2;
      const int ih = hi ? i - kRows / 2 : i;
      const bool valid = ih < ni && k < nk;
      tc::cp_async16(smem + offset(i, k), valid ? (hi ? p2 : p) + ih * ld + k : p, valid);
    }
  }
  // Gathered rows (GatheredRows), k-contiguous, in the swizzled layout.
  static constexpr int kPer = kChunks / kThreads;
  using Gathered = GatheredRows<kPer, kThreads>;
  __device__ static void load_gathered(unsigned char* smem, const __nv_bfloat16* const (&rp)[kPer],
                                       const __nv_bfloat16* any, int k0, int nk) {
    static_assert(kK, "gathered rows are k-contiguous");
    Gathered::load(rp, any, k0, nk, [&](int i, int k) { return smem + offset(i, k); });
  }
  // As load for a tile stored [k][i] (not kK) whose k rows lie where an index says: row k at
  // p + rows[k]·ld (p the tile's first column; rows: the step's kTileK indices, in shared memory).
  __device__ static void load_k_rows(unsigned char* smem, const __nv_bfloat16* p, int64_t ld, const int32_t* rows,
                                     int ni, int nk) {
    static_assert(!kK, "k rows of a tile stored [k][i]");
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int idx = threadIdx.x + u * kThreads;
      const int i = (idx % (kRows / 8)) * 8, k = idx / (kRows / 8);
      const bool valid = i < ni && k < nk;
      tc::cp_async16(smem + offset(i, k), valid ? p + static_cast<int64_t>(rows[k]) * ld + i : p, valid);
    }
  }
  // The descriptor of the tile's rows from `row` (a multiple of 64) at k step kk (a multiple of 16).
  __device__ static uint64_t desc(const unsigned char* tile, int row, int kk) {
    if constexpr (kK)
      return wg::desc(tile + row * 128 + kk * 2, 16, 1024);
    else
      return wg::desc(tile + (row >> 6) * 8192 + kk * 128, 8192, 1024);
  }
};

// The f32 sums of the block's tile at (m0, n0) of one product (64 · kWG rows), as tc_accumulate makes
// them but in the wgmma layout (wg_for_each). kGated as there: b's rows n0 + j, then gate_to_up + n0 + j.
// kGather: kGatherA, A's rows at a + rows[i]·lda; kGatherK (kGatherKA), B's (A's) k rows at b + rows[k]·ldb
// (a + rows[k]·lda) (rows: the group's).
template <bool kAK, bool kBK, bool kGated = false, int kWG = 2, int kGather = kInOrder, int kBN = kTileN,
          bool kTmaB = false>
__device__ __forceinline__ void wg_accumulate(float (&acc)[kBN / 2], const __nv_bfloat16* a, int64_t lda,
                                              const __nv_bfloat16* b, int64_t ldb, int M, int N, int K, int m0,
                                              int n0, int64_t gate_to_up = 0, const int32_t* rows = nullptr,
                                              const CUtensorMap* bmap = nullptr, int b_group = 0) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(!kGated || kBK, "gated tiles read k-contiguous weights");
  static_assert(!kTmaB || (kBK && kGather != kGatherK), "TMA brings k-contiguous weights in order");
  using TileA = WgTile<kAK, 64 * kWG, 128 * kWG>;
  using TileB = WgTile<kBK, kBN, 128 * kWG>;
  unsigned char* sa = wg::smem_base();
  unsigned char* sb = sa + kStages * TileA::kBytes;
  const __nv_bfloat16* pa = kAK ? a + m0 * lda : a + m0;
  const __nv_bfloat16* pb = kBK ? b + n0 * ldb : b + n0;
  const int ni_a = min(64 * kWG, M - m0), ni_b = min(kGated ? kBN / 2 : kBN, N - n0);
  const int row = threadIdx.x / 128 * 64;  // the warpgroup's rows of the tile
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i) acc[i] = 0.0f;

  const int steps = (K + kTileK - 1) / kTileK;
  const __nv_bfloat16* rows_a[TileA::kPer] = {};
  if constexpr (kGather == kGatherA) TileA::Gathered::rows(rows_a, a, lda, rows + m0, ni_a);
  // kGatherK, kGatherKA: each step's kTileK k-row indices in a ring of shared memory, loaded by cp.async
  // in the group of the step kStages - 1 before theirs (so they are in, and seen by every thread, when
  // that step's tiles issue); the first kStages - 1 steps' loaded before the pipeline starts.
  constexpr bool kRingOn = kGather == kGatherK || kGather == kGatherKA;
  constexpr int kRing = kStages + 1;
  __shared__ int32_t k_ring[kRingOn ? kRing : 1][kTileK];
  const auto fetch = [&](int s) {  // step s's indices, cp.async in the current group
    if (threadIdx.x < kTileK && s < steps) {
      const int k = s * kTileK + static_cast<int>(threadIdx.x);
      tc::cp_async4(reinterpret_cast<float*>(&k_ring[s % kRing][threadIdx.x]),
                    reinterpret_cast<const float*>(rows + (k < K ? k : 0)), k < K);
    }
  };
  if constexpr (kRingOn) {
    for (int s = 0; s < kStages - 1; ++s) {
      const int k = s * kTileK + static_cast<int>(threadIdx.x);
      if (threadIdx.x < kTileK) k_ring[s][threadIdx.x] = k < K ? rows[k] : 0;
    }
    __syncthreads();
  }
  // kTmaB: B's tiles come by TMA (bmap: the weights [groups][rows][K], b_group the block's group; the
  // tile's rows from n0, a gated tile's second half from gate_to_up + n0), each stage completing on its
  // barrier; thread 0 issues them once every warpgroup is done with the stage (the loop's second barrier).
  __shared__ uint64_t b_bars[kTmaB ? kStages : 1];
  if constexpr (kTmaB) {
    if (threadIdx.x == 0) {
      for (int i = 0; i < kStages; ++i) wg::bar_init(&b_bars[i], 1);
      wg::bars_initialized();
    }
    __syncthreads();
  }
  const auto issue = [&](int s) {
    if constexpr (kRingOn) fetch(s + kStages - 1);
    if constexpr (kTmaB) {
      if (threadIdx.x == 0 && s < steps) {
        const int st = s % kStages;
        unsigned char* dst = sb + st * TileB::kBytes;
        wg::bar_expect(&b_bars[st], TileB::kBytes);
        wg::tma_load_3d(dst, bmap, &b_bars[st], s * kTileK, n0, b_group);
        if constexpr (kGated)
          wg::tma_load_3d(dst + (kBN / 2) * 128, bmap, &b_bars[st], s * kTileK, static_cast<int>(gate_to_up) + n0,
                          b_group);
      }
    }
    issue_step<TileA, TileB, kAK, kBK, kGated, kGather, kTmaB>(s, steps, sa, sb, kGather == kGatherA ? a : pa, lda, pb,
                                                               ldb, gate_to_up, ni_a, ni_b, K, rows_a,
                                                               k_ring[s % kRing]);
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);
  // Step s's products run while the block waits for the products of step s - 1 to finish and then
  // reloads their buffer with step s + kStages - 1.
  for (int s = 0; s < steps; ++s) {
    tc::cp_async_wait<kStages - 2>();
    if constexpr (kTmaB) wg::bar_wait(&b_bars[s % kStages], (s / kStages) & 1);
    wg::fence_shared();
    __syncthreads();  // step s is in
    const unsigned char* ta = sa + (s % kStages) * TileA::kBytes;
    const unsigned char* tb = sb + (s % kStages) * TileB::kBytes;
    wg::pin(acc);
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16)
      if constexpr (kBN == 128)
        wg::mma_m64n128k16<kAK ? 0 : 1, kBK ? 0 : 1>(acc, TileA::desc(ta, row, kk), TileB::desc(tb, 0, kk));
      else
        wg::mma_m64n64k16<kAK ? 0 : 1, kBK ? 0 : 1>(acc, TileA::desc(ta, row, kk), TileB::desc(tb, 0, kk));
    wg::commit();
    wg::wait<1>();
    wg::pin(acc);
    __syncthreads();  // every warpgroup's products of step s - 1 are done
    issue(s + kStages - 1);
  }
  wg::wait<0>();
  wg::pin(acc);
  tc::cp_async_wait<0>();
#else
  __trap();  // launched only where hopper_products_built() said the build has them
#endif
}

// Calls f(r, col, i) for each pair of sums acc[i], acc[i + 1] that this thread holds of a block's tile
// (wg_accumulate's layout) in its first kCols columns: its row r of the M rows and columns col, col + 1
// (col even) of the N, the tile at (m0, n0). Rows and pairs past the ends are skipped; a pair's second
// column may be past N.
template <int kCols, typename F>
__device__ __forceinline__ void wg_for_each_pair(int m0, int n0, int M, int N, F&& f) {
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int r0 = m0 + threadIdx.x / 128 * 64 + threadIdx.x / 32 % 4 * 16 + g;
#pragma unroll
  for (int j = 0; j < kCols / 8; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r0 + 8 * h, col = n0 + j * 8 + 2 * q;
      if (r < M && col < N) f(r, col, 4 * j + 2 * h);
    }
}

// Two adjacent values into an output of the grouped products (f32, or bf16 rounded once), one store
// where both columns exist and the address is aligned for it (the old value, if any, is already in:
// wg_add_old).
__device__ __forceinline__ void put_pair(float* out, float v0, float v1, bool both) {
  if (both && reinterpret_cast<uintptr_t>(out) % 8 == 0) {
    *reinterpret_cast<float2*>(out) = make_float2(v0, v1);
    return;
  }
  out[0] = v0;
  if (both) out[1] = v1;
}
__device__ __forceinline__ void put_pair(__nv_bfloat16* out, float v0, float v1, bool both) {
  if (both && reinterpret_cast<uintptr_t>(out) % 4 == 0) {
    *reinterpret_cast<__nv_bfloat162*>(out) = __floats2bfloat162_rn(v0, v1);
    return;
  }
  out[0] = __float2bfloat16(v0);
  if (both) out[1] = __float2bfloat16(v1);
}

// acc[i] += beta · c at each sum's place (wg_accumulate's layout), as put_sum adds it: the old values
// of 4 column blocks load together, so that their round trips to memory overlap (a weight gradient
// adds into the gradient so far).
template <int kCols>
__device__ __forceinline__ void wg_add_old(float (&acc)[kCols / 2], const float* c, int64_t ldc, int m0, int n0,
                                           int M, int N, float beta) {
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int r0 = m0 + threadIdx.x / 128 * 64 + threadIdx.x / 32 % 4 * 16 + g;
#pragma unroll
  for (int j0 = 0; j0 < kCols / 8; j0 += 4) {
    float old[4][2][2];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int r = r0 + 8 * h, col = n0 + (j0 + j) * 8 + 2 * q + e;
          old[j][h][e] = r < M && col < N ? c[static_cast<int64_t>(r) * ldc + col] : 0.0f;
        }
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 2; ++e) acc[4 * (j0 + j) + 2 * h + e] += beta * old[j][h][e];
  }
}
template <int kCols>
__device__ __forceinline__ void wg_add_old(float (&)[kCols / 2], const __nv_bfloat16*, int64_t, int, int, int, int,
                                           float) {}

// A staged epilogue: the block's outputs, kCols columns of a kTileM-row tile, go into shared memory
// (padded TS rows) from the accumulators' scattered places, then out to global memory 16 bytes a
// thread along rows, so that every store fills whole sectors (a bf16 pair straight from the
// accumulators fills half of one). The pipeline's buffers hold it once every warpgroup is done with them.
template <typename TS, int kCols, int kWG = 2>
struct WgStage {
  static constexpr int kRows = 64 * kWG, kThreads = 128 * kWG;
  static constexpr int kPer = 16 / static_cast<int>(sizeof(TS));  // elements a 16-byte chunk
  static constexpr int kLd = kCols + kPer;                        // padded row, in elements
  static_assert(kRows * kLd * sizeof(TS) <= wg_smem_bytes(kWG, 64) - 1024, "fits the narrowest pipeline's memory");

  // Values v0, v1 at the tile's row rl, columns cl and cl + 1.
  __device__ static void put(TS* s, int rl, int cl, float v0, float v1) {
    if constexpr (std::is_same_v<TS, float>)
      *reinterpret_cast<float2*>(s + rl * kLd + cl) = make_float2(v0, v1);
    else
      *reinterpret_cast<__nv_bfloat162*>(s + rl * kLd + cl) = __floats2bfloat162_rn(v0, v1);
  }
  // The staged tile into out's rows m0.. and columns n0.. (row stride ld; out, ld and N multiples of a
  // chunk), the rows and columns inside M × N; f32 adds beta · the old value as put_sum does.
  __device__ static void write(const TS* s, TS* out, int64_t ld, int m0, int n0, int M, int N, float beta) {
    constexpr int kRowChunks = kCols / kPer;
#pragma unroll 4
    for (int idx = threadIdx.x; idx < kRows * kRowChunks; idx += kThreads) {
      const int rl = idx / kRowChunks, cl = (idx % kRowChunks) * kPer;
      const int r = m0 + rl, col = n0 + cl;
      if (r >= M || col >= N) continue;
      uint4 v = *reinterpret_cast<const uint4*>(s + rl * kLd + cl);
      TS* p = out + static_cast<int64_t>(r) * ld + col;
      if constexpr (std::is_same_v<TS, float>) {
        if (beta != 0.0f) {
          const float4 o = *reinterpret_cast<const float4*>(p);
          float4 f = *reinterpret_cast<const float4*>(&v);
          f.x = f.x + beta * o.x;
          f.y = f.y + beta * o.y;
          f.z = f.z + beta * o.z;
          f.w = f.w + beta * o.w;
          v = *reinterpret_cast<const uint4*>(&f);
        }
      }
      *reinterpret_cast<uint4*>(p) = v;
    }
  }
};

// Calls f(rl, cl, i) for each pair of sums acc[i], acc[i + 1] this thread holds of the block's tile in
// its first kCols columns: tile row rl, columns cl and cl + 1.
template <int kCols, typename F>
__device__ __forceinline__ void wg_for_each_local(F&& f) {
  const int lane = threadIdx.x % 32;
  const int r0 = threadIdx.x / 128 * 64 + threadIdx.x / 32 % 4 * 16 + lane / 4;
#pragma unroll
  for (int j = 0; j < kCols / 8; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) f(r0 + 8 * h, j * 8 + 2 * (lane % 4), 4 * j + 2 * h);
}

// tc_tile on the warpgroup products; staged: through shared memory (WgStage's conditions hold). kGather
// and rows as wg_accumulate's.
template <bool kAK, bool kBK, typename TC, int kWG = 2, int kGather = kInOrder, int kBN = kTileN, bool kTmaB = false>
__device__ __forceinline__ void wg_tile(const __nv_bfloat16* a, int64_t lda, const __nv_bfloat16* b, int64_t ldb,
                                        TC* c, int64_t ldc, int M, int N, int K, int m0, int n0, float beta,
                                        bool staged, const int32_t* rows = nullptr, const CUtensorMap* bmap = nullptr,
                                        int b_group = 0) {
  float acc[kBN / 2];
  wg_accumulate<kAK, kBK, false, kWG, kGather, kBN, kTmaB>(acc, a, lda, b, ldb, M, N, K, m0, n0, 0, rows, bmap,
                                                           b_group);
  if (staged) {
    using S = WgStage<TC, kBN, kWG>;
    TC* s = reinterpret_cast<TC*>(wg::smem_base());
    __syncthreads();  // every warpgroup is done with the pipeline's buffers
    wg_for_each_local<kBN>([&](int rl, int cl, int i) { S::put(s, rl, cl, acc[i], acc[i + 1]); });
    __syncthreads();
    S::write(s, c, ldc, m0, n0, M, N, beta);
    return;
  }
  if (beta != 0.0f) wg_add_old<kBN>(acc, c, ldc, m0, n0, M, N, beta);  // bf16 outputs come with beta 0
  wg_for_each_pair<kBN>(m0, n0, M, N, [&](int r, int col, int i) {
    put_pair(c + static_cast<int64_t>(r) * ldc + col, acc[i], acc[i + 1], col + 1 < N);
  });
}

// tc_gated_tile on the warpgroup products: a thread holds a gate sum and its up sum (columns j and
// kBN / 2 + j of the tile of kBN columns), so the pair meets in registers. The same expression, so the same bits
// as wg_tile then silu_mul_forward.
template <int kWG, int kGather = kInOrder, int kBN = kTileN, bool kTmaB = false>
__device__ __forceinline__ void wg_gated_tile(const __nv_bfloat16* a, int64_t lda, const __nv_bfloat16* b,
                                              int64_t ldb, int64_t gate_to_up, __nv_bfloat16* h, int64_t ldh,
                                              __nv_bfloat16* gu, int64_t ldgu, int M, int N, int K, int m0, int n0,
                                              bool staged, const int32_t* a_rows = nullptr,
                                              const CUtensorMap* bmap = nullptr, int b_group = 0) {
  float acc[kBN / 2];
  wg_accumulate<true, true, true, kWG, kGather, kBN, kTmaB>(acc, a, lda, b, ldb, M, N, K, m0, n0, gate_to_up, a_rows,
                                                            bmap, b_group);
  constexpr int kUp = 4 * (kBN / 16);  // acc[i + kUp]: the up sum of gate sum acc[i]
  using S = WgStage<__nv_bfloat16, kBN / 2, kWG>;
  static_assert(3 * S::kRows * S::kLd * 2 <= wg_smem_bytes(kWG, kBN) - 1024,
                "the gated tile's three outputs fit the pipeline's memory");
  if (staged) {  // h, then the gate and the up products, each [64 · kWG][kBN / 2] staged
    __nv_bfloat16* sh = reinterpret_cast<__nv_bfloat16*>(wg::smem_base());
    __nv_bfloat16 *sg = sh + S::kRows * S::kLd, *su = sg + S::kRows * S::kLd;
    __syncthreads();  // every warpgroup is done with the pipeline's buffers
    wg_for_each_local<kBN / 2>([&](int rl, int cl, int i) {
      float gs[2] = {acc[i], acc[i + 1]}, us[2] = {acc[i + kUp], acc[i + kUp + 1]};
      if (gu != nullptr) {
        S::put(sg, rl, cl, gs[0], gs[1]);
        S::put(su, rl, cl, us[0], us[1]);
        for (int e = 0; e < 2; ++e) {
          gs[e] = __bfloat162float(__float2bfloat16(gs[e]));
          us[e] = __bfloat162float(__float2bfloat16(us[e]));
        }
      }
      S::put(sh, rl, cl, silu_gate(gs[0], us[0]), silu_gate(gs[1], us[1]));
    });
    __syncthreads();
    S::write(sh, h, ldh, m0, n0, M, N, 0.0f);
    if (gu != nullptr) {
      S::write(sg, gu, ldgu, m0, n0, M, N, 0.0f);
      S::write(su, gu + N, ldgu, m0, n0, M, N, 0.0f);
    }
    return;
  }
  wg_for_each_pair<kBN / 2>(m0, n0, M, N, [&](int r, int col, int i) {
    float gs[2] = {acc[i], acc[i + 1]}, us[2] = {acc[i + kUp], acc[i + kUp + 1]};
    const bool both = col + 1 < N;
    if (gu != nullptr) {
      __nv_bfloat16* row = gu + static_cast<int64_t>(r) * ldgu;
      put_pair(row + col, gs[0], gs[1], both);
      put_pair(row + N + col, us[0], us[1], both);
      for (int e = 0; e < 2; ++e) {
        gs[e] = __bfloat162float(__float2bfloat16(gs[e]));
        us[e] = __bfloat162float(__float2bfloat16(us[e]));
      }
    }
    put_pair(h + static_cast<int64_t>(r) * ldh + col, silu_gate(gs[0], us[0]), silu_gate(gs[1], us[1]), both);
  });
}

// grouped_tc_kernel, grouped_gated_kernel and grouped_wgrad_tc_kernel on the warpgroup products (row
// tiles of 64 · kWG rows; kWG warpgroups a block).
// kBN: the column tile (kTileN, or 64 where few rows a group leave the products streaming weights).
// kTmaB: the weights' tiles by TMA through bmap (weight_map, below).
template <bool kBK, typename TC, int kWG, int kBN = kTileN, bool kTmaB = false>
__global__ void __launch_bounds__(128 * kWG, kWG == 1 ? (kBN == 64 ? 4 : 3) : 2)
    grouped_wg_kernel(const __nv_bfloat16* a, int64_t lda, const __nv_bfloat16* w, int64_t ldw, int64_t ldw0, TC* c,
                      int64_t ldc, const int64_t* bounds, int groups, int n, int k, float beta, bool staged,
                      int64_t dense_rows, const __grid_constant__ CUtensorMap bmap) {
  const RowTile t = row_tile<64 * kWG>(bounds, groups, dense_rows);
  if (t.group < 0) return;
  wg_tile<true, kBK, TC, kWG, kInOrder, kBN, kTmaB>(a + t.r0 * lda, lda, w + t.group * ldw0, ldw, c + t.r0 * ldc,
                                                     ldc, t.rows, n, k, t.row, blockIdx.x * kBN, beta, staged, nullptr,
                                                     &bmap, t.group);
}

template <int kWG, int kGather = kInOrder, int kBN = kTileN, bool kTmaB = false>
__global__ void __launch_bounds__(128 * kWG, kWG == 1 ? (kBN == 64 ? 4 : 3) : 2)
    grouped_gated_wg_kernel(const __nv_bfloat16* a, int64_t lda, const __nv_bfloat16* w, int64_t ldw, int64_t ldw0,
                            __nv_bfloat16* h, int64_t ldh, __nv_bfloat16* gu, int64_t ldgu, const int64_t* bounds,
                            int groups, int n, int k, bool staged, const int32_t* a_rows,
                            const __grid_constant__ CUtensorMap bmap) {
  __shared__ int tile_group, tile_row;
  find_row_tile<64 * kWG>(bounds, groups, &tile_group, &tile_row);
  const int g = tile_group;
  if (g < 0) return;
  const int64_t r0 = bounds[g];
  wg_gated_tile<kWG, kGather, kBN, kTmaB>(kGather == kGatherA ? a : a + r0 * lda, lda, w + g * ldw0, ldw, n,
                                          h + r0 * ldh, ldh, gu ? gu + r0 * ldgu : nullptr, ldgu,
                                          static_cast<int>(bounds[g + 1] - r0), n, k, tile_row,
                                          blockIdx.x * (kBN / 2), staged, kGather == kGatherA ? a_rows + r0 : nullptr,
                                          &bmap, g);
}

// The experts' down data gradient ending in the gate's backward (CudaBackend::grouped_silu_backward):
// the block's tile of dh = dc · w[g] (w [G, k, n], n contiguous; kGather (kGatherA): dc's rows by
// dc_rows), staged in shared memory; then, 8 columns a thread at a time, gate_up's gate and up values at
// those places and dgu = [dg | du] from them by silu_gate_backward, 16 bytes a load and a store.
// Unscaled, dh is staged rounded to bf16 as grouped_gemm writes it: the same sums and the same
// expression as grouped_wg_kernel into bf16 then silu_mul_backward, so the same bits, with no dh in
// memory. kScaled: dh staged in f32; the rows' gradient is scale[r] · dh rounded to bf16, the gated
// activation act = silu_gate(g, u) rounded is remade, scaled_act = scale[r] · act rounded, and
// dh · act over the tile's columns goes to parts[r · gridDim.x + blockIdx.x] (the 16 threads of a row
// summed by shuffles) for grouped_silu_dots to add up in order.
template <int kWG, int kGather = kInOrder, bool kScaled = false>
__global__ void __launch_bounds__(128 * kWG, kWG == 1 ? 3 : 2)
    grouped_silu_backward_wg_kernel(const __nv_bfloat16* dc, int64_t lddc, const __nv_bfloat16* w, int64_t ldw,
                                    int64_t ldw0, const __nv_bfloat16* gu, int64_t ldgu, __nv_bfloat16* dgu,
                                    int64_t lddgu, const int64_t* bounds, int groups, int n, int k,
                                    const int32_t* dc_rows, const float* scale, float* parts,
                                    __nv_bfloat16* scaled_act, int64_t ldact) {
  const RowTile t = row_tile<64 * kWG>(bounds, groups, 0);
  if (t.group < 0) return;
  const int n0 = blockIdx.x * kTileN;
  float acc[64];
  wg_accumulate<true, false, false, kWG, kGather>(acc, kGather == kGatherA ? dc : dc + t.r0 * lddc, lddc,
                                                  w + t.group * ldw0, ldw, t.rows, n, k, t.row, n0, 0,
                                                  kGather == kGatherA ? dc_rows + t.r0 : nullptr);
  using TS = std::conditional_t<kScaled, float, __nv_bfloat16>;
  using S = WgStage<TS, kTileN, kWG>;
  TS* s = reinterpret_cast<TS*>(wg::smem_base());
  __syncthreads();  // every warpgroup is done with the pipeline's buffers
  wg_for_each_local<kTileN>([&](int rl, int cl, int i) { S::put(s, rl, cl, acc[i], acc[i + 1]); });
  __syncthreads();
  constexpr int kRowChunks = kTileN / 8;
  static_assert(32 % kRowChunks == 0 && (S::kRows * kRowChunks) % S::kThreads == 0,
                "a row's chunks in one warp, every thread through every pass");
#pragma unroll 2
  for (int idx = threadIdx.x; idx < S::kRows * kRowChunks; idx += S::kThreads) {
    const int rl = idx / kRowChunks, cl = (idx % kRowChunks) * 8;
    const int r = t.row + rl, col = n0 + cl;
    const bool inside = r < t.rows && col < n;
    const int64_t row = t.r0 + r;
    float dot = 0.0f;
    if (inside) {
      float d[8];
      if constexpr (kScaled) {
        const float4 d0 = *reinterpret_cast<const float4*>(s + rl * S::kLd + cl);
        const float4 d1 = *reinterpret_cast<const float4*>(s + rl * S::kLd + cl + 4);
        d[0] = d0.x, d[1] = d0.y, d[2] = d0.z, d[3] = d0.w, d[4] = d1.x, d[5] = d1.y, d[6] = d1.z, d[7] = d1.w;
      } else {
        const uint4 dv = *reinterpret_cast<const uint4*>(s + rl * S::kLd + cl);
        const auto* d2 = reinterpret_cast<const __nv_bfloat162*>(&dv);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 f = __bfloat1622float2(d2[e]);
          d[2 * e] = f.x, d[2 * e + 1] = f.y;
        }
      }
      const uint4 gv = *reinterpret_cast<const uint4*>(gu + row * ldgu + col);
      const uint4 uv = *reinterpret_cast<const uint4*>(gu + row * ldgu + n + col);
      const auto* g2 = reinterpret_cast<const __nv_bfloat162*>(&gv);
      const auto* u2 = reinterpret_cast<const __nv_bfloat162*>(&uv);
      const float sc = kScaled ? scale[row] : 1.0f;
      uint4 go, uo, ao;
      auto* go2 = reinterpret_cast<__nv_bfloat162*>(&go);
      auto* uo2 = reinterpret_cast<__nv_bfloat162*>(&uo);
      auto* ao2 = reinterpret_cast<__nv_bfloat162*>(&ao);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 g = __bfloat1622float2(g2[e]), u = __bfloat1622float2(u2[e]);
        float dg[2], du[2], dh[2] = {d[2 * e], d[2 * e + 1]};
        if constexpr (kScaled) {
          const float act[2] = {__bfloat162float(__float2bfloat16(silu_gate(g.x, u.x))),
                                __bfloat162float(__float2bfloat16(silu_gate(g.y, u.y)))};
          dot += dh[0] * act[0] + dh[1] * act[1];
          ao2[e] = __floats2bfloat162_rn(sc * act[0], sc * act[1]);
          for (int j = 0; j < 2; ++j) dh[j] = __bfloat162float(__float2bfloat16(sc * dh[j]));
        }
        silu_gate_backward(dh[0], g.x, u.x, &dg[0], &du[0]);
        silu_gate_backward(dh[1], g.y, u.y, &dg[1], &du[1]);
        go2[e] = __floats2bfloat162_rn(dg[0], dg[1]);
        uo2[e] = __floats2bfloat162_rn(du[0], du[1]);
      }
      *reinterpret_cast<uint4*>(dgu + row * lddgu + col) = go;
      *reinterpret_cast<uint4*>(dgu + row * lddgu + n + col) = uo;
      if constexpr (kScaled) *reinterpret_cast<uint4*>(scaled_act + row * ldact + col) = ao;
    }
    if constexpr (kScaled) {
#pragma unroll
      for (int off = kRowChunks / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      if (cl == 0 && r < t.rows) parts[row * gridDim.x + blockIdx.x] = dot;
    }
  }
}

// dots[r] = the sum of parts[r] ([rows, tiles] f32), in order.
__global__ void grouped_silu_dots_kernel(const float* parts, int tiles, int64_t rows, float* dots) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  float sum = 0.0f;
  for (int t = 0; t < tiles; ++t) sum += parts[r * tiles + t];
  dots[r] = sum;
}

// kGather: kGatherK, row r of a is a[rows[r]]; kGatherKA, row r of dc is dc[rows[r]].
template <int kGather = kInOrder>
__global__ void __launch_bounds__(kTcThreads, 2)
    grouped_wgrad_wg_kernel(const __nv_bfloat16* dc, int64_t lddc, const __nv_bfloat16* a, int64_t lda, float* dw,
                            int64_t ldw, int64_t ldw0, const int64_t* bounds, int n, int k, float beta, bool staged,
                            const int32_t* rows_by) {
  const int g = blockIdx.z;
  const int64_t r0 = bounds[g];
  const int rows = static_cast<int>(bounds[g + 1] - r0);
  if (rows <= 0) {
    if (beta == 0.0f) zero_tile(dw + g * ldw0, ldw, n, k, blockIdx.y * kTileM, blockIdx.x * kTileN);
    return;
  }
  wg_tile<false, false, float, 2, kGather>(kGather == kGatherKA ? dc : dc + r0 * lddc, lddc,
                                           kGather == kGatherK ? a : a + r0 * lda, lda, dw + g * ldw0, ldw, n, k, rows,
                                           blockIdx.y * kTileM, blockIdx.x * kTileN, beta, staged,
                                           kGather == kInOrder ? nullptr : rows_by + r0);
}

// A TMA map over bf16 weights [groups][rows][k] (k contiguous, rows ld elements apart, groups ld0 apart)
// whose box is kTileK ks by box_rows rows, swizzled by 128 bytes as WgTile lays a k-contiguous tile out;
// coordinates (k, row, group), zeros outside. False where TMA cannot take the layout (alignment, sizes) or
// the driver has no encoder: the products then load their weights by cp.async.
bool weight_map(CUtensorMap* map, const void* w, int64_t groups, int64_t rows, int64_t k, int64_t ld, int64_t ld0,
                int box_rows) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult got{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &got) !=
            cudaSuccess ||
        got != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  if (encode == nullptr || reinterpret_cast<uintptr_t>(w) % 16 != 0 || ld % 8 != 0 || groups < 1 || rows < 1 ||
      k < 1 || k >= (int64_t{1} << 31) || rows >= (int64_t{1} << 31) || groups >= (int64_t{1} << 31) ||
      (groups > 1 && ld0 % 8 != 0))
    return false;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(groups)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(2 * ld),
                                 static_cast<cuuint64_t>(2 * (groups > 1 ? ld0 : rows * ld))};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(kTileK), static_cast<cuuint32_t>(box_rows), 1};
  const cuuint32_t unit[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(w), dims, strides, box, unit,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

__global__ void hopper_probe_kernel(int* built) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *built = 1;
#else
  *built = 0;
#endif
}

}  // namespace

bool hopper_products_built(int device) {
  int major = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major != 9) return false;
  int* flag = nullptr;
  CUDA_CHECK(cudaMalloc(&flag, sizeof(int)));
  hopper_probe_kernel<<<1, 1>>>(flag);
  int built = 0;
  const cudaError_t launched = cudaGetLastError();
  if (launched == cudaSuccess) CUDA_CHECK(cudaMemcpy(&built, flag, sizeof(int), cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaFree(flag));
  return launched == cudaSuccess && built == 1;
}

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

// Whether the grouped kernels can take an operand of `cols` contiguous columns, row stride ld (bf16
// elements): 16-byte chunks of whole rows.
bool tc_operand(const Operand& o, int64_t cols) {
  return o.type == CUDA_R_16BF && cols % 8 == 0 && o.ld % 8 == 0 && (o.rows1 == o.rows || o.ld0 % 8 == 0) &&
         reinterpret_cast<uintptr_t>(o.p) % 16 == 0;
}

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
  check_operand(c);
  const bool c16 = c.dtype() == DType::kBF16;
  CHECK(!c16 || beta == 0.0f) << "gemm into bf16 takes beta 0";
  const Rows A = rows_of(a), B = rows_of(b), C = rows_of(c);
  const int64_t m = C.rows, n = C.cols, k = trans_a ? A.rows : A.cols;
  CHECK_EQ(trans_a ? A.cols : A.rows, m) << "gemm: rows of op(a) vs c";
  CHECK_EQ(trans_b ? B.cols : B.rows, k) << "gemm: inner dimension";
  CHECK_EQ(trans_b ? B.rows : B.cols, n) << "gemm: columns of op(b) vs c";
  const bool bf16 = bf16_products(a, b);
  if (c16 && !bf16) {  // f32 products: their f32 result, rounded
    Tensor c32 = empty(c.shape(), DType::kF32);
    this->gemm(a, trans_a, b, trans_b, c32, alpha, 0.0f);
    copy(c32, c);
    return;
  }
  const char* name = "gemm";
  if (opt_.profile && opt_.profile_shapes) {
    const std::string shape = "gemm " + std::to_string(m) + "×" + std::to_string(n) + "×" + std::to_string(k) + " " +
                              (trans_a ? "T" : "N") + (trans_b ? "T" : "N") + " " + dtype_name(a.dtype()) + "·" +
                              dtype_name(b.dtype()) + (beta != 0.0f ? " +=" : "");
    name = op_names_.insert(shape).first->c_str();
  }
  Op op(
      this, name, 2.0 * m * n * k,
      1.0 * dtype_size(a.dtype()) * m * k + 1.0 * dtype_size(b.dtype()) * k * n +
          1.0 * dtype_size(c.dtype()) * m * n * (beta != 0.0f ? 2 : 1));
  Tensor ka, kb;
  const Operand oa = gemm_operand(a, bf16, A.rows, A.cols, A.ld, A.rows, 0, ka);
  const Operand ob = gemm_operand(b, bf16, B.rows, B.cols, B.ld, B.rows, 0, kb);
  // Batch-invariant products: a row's result may not depend on the rows beside it, so not cuBLAS (whose
  // kernel, tiling and split of k follow the shape) but the tensor-core kernel with fixed 128-row tiles,
  // where each row's sums run in the same order whatever m is.
  if (opt_.batch_invariant && bf16 && !trans_a && alpha == 1.0f && m > 0 && n > 0 && k > 0 &&
      m < (int64_t{1} << 31) && n < (int64_t{1} << 31) && k < (int64_t{1} << 31) && tc_operand(oa, k) &&
      tc_operand(ob, B.cols)) {
    tc_products(oa, ob, trans_b, 1, nullptr, m, C.p, C.ld, c16, n, k, beta, kTileM);
    return;
  }
  gemm_rows(ctx_->blas, operand_compute(oa, opt_.gemm), oa.p, oa.type, oa.ld, trans_a, ob.p, ob.type, ob.ld, trans_b,
            C.p, C.ld, m, n, k, alpha, beta, c16 ? CUDA_R_16BF : CUDA_R_32F);
}

void CudaBackend::gemm_batched(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, float alpha,
                               float beta) {
  CHECK(a.dim() == 3 && b.dim() == 3 && c.dim() == 3) << "gemm_batched takes 3-D views";
  check_operand(a);
  check_operand(b);
  check_operand(c);  // f32, or bf16 (rounded once)
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
                 1.0 * dtype_size(c.dtype()) * m * n * (beta != 0.0f ? 2 : 1)));
  const bool bf16 = bf16_products(a, b);
  Tensor ka, kb;
  // A stack of matrices of size(1) rows each, size(0) of them, stride(0) apart.
  const Operand oa = gemm_operand(a, bf16, batch * a.size(1), a.size(2), a.stride(1), a.size(1), a.stride(0), ka);
  const Operand ob = gemm_operand(b, bf16, batch * b.size(1), b.size(2), b.stride(1), b.size(1), b.stride(0), kb);
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: the operands swap (see gemm_rows).
  CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      ctx_->blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n),
      static_cast<int>(m), static_cast<int>(k), &alpha, ob.p, ob.type, static_cast<int>(ob.ld), ob.ld0, oa.p, oa.type,
      static_cast<int>(oa.ld), oa.ld0, &beta, c.raw(), c.dtype() == DType::kBF16 ? CUDA_R_16BF : CUDA_R_32F,
      static_cast<int>(c.stride(1)), c.stride(0),
      static_cast<int>(batch), operand_compute(oa, opt_.gemm), CUBLAS_GEMM_DEFAULT));
}

namespace {

void check_offsets(const Tensor& offsets, int64_t groups) {
  check_device(offsets, DType::kI64);
  CHECK(offsets.is_contiguous() && offsets.numel() == groups + 1)
      << "group offsets: " << shape_str(offsets.shape()) << " for " << groups << " groups";
}

// A grouped product's rows of a: by index (a_rows: `rows` of them, I32 on the device), or (null) a's own
// rows in order, `rows` of them (a_count: a's rows).
void check_a_rows(const Tensor* a_rows, int64_t rows, int64_t a_count) {
  if (a_rows == nullptr) {
    CHECK_EQ(a_count, rows) << "a's rows against the product's";
    return;
  }
  check_device(*a_rows, DType::kI32);
  CHECK(a_rows->is_contiguous() && a_rows->numel() == rows)
      << "a's rows by index: " << shape_str(a_rows->shape()) << " for " << rows << " rows";
  CHECK_LT(rows, int64_t{1} << 31) << "a's rows by index: " << rows << " rows";
}

}  // namespace

std::vector<int64_t> CudaBackend::host_offsets(const Tensor& offsets, int64_t rows) {
  const Tensor h = download(offsets);
  std::vector<int64_t> o(h.data<int64_t>(), h.data<int64_t>() + h.numel());
  check_group_bounds(o.data(), h.numel() - 1, rows);
  return o;
}

void CudaBackend::tc_products(const Operand& oa, const Operand& ow, bool trans_w, int64_t groups,
                              const int64_t* bounds, int64_t rows, void* c, int64_t ldc, bool c16, int64_t n, int64_t k,
                              float beta, int tm) {
  // On Hopper, row tiles of 128 and 64 take the warpgroup kernels (2 warpgroups a block, or 1); 64-row
  // tiles (few rows a group: decode) with 64 columns (kDecodeTileN).
  const bool wgmma = (tm == kTileM || tm == 64) && hopper_;
  const int bn = wgmma ? wg_column_tile(tm) : kTileN;
  const dim3 grid(static_cast<unsigned>((n + bn - 1) / bn),
                  static_cast<unsigned>((rows + tm - 1) / tm + (bounds ? groups : 0)));
  CHECK_LT(grid.y, 65536u) << "tensor-core products: too many rows";
  const size_t smem = wgmma     ? wg_smem_bytes(tm / 64, bn)
                      : tm == 32 ? tc_smem<32>()
                      : tm == 64 ? tc_smem<64>()
                                 : tc_smem<128>();
  const int64_t dense_rows = bounds ? 0 : rows;
  const auto launch = [&](auto* out) {
    using TC = std::remove_pointer_t<decltype(out)>;
    const auto pick = [&](auto tile) {
      constexpr int kTM = decltype(tile)::value;
      return trans_w ? grouped_tc_kernel<true, kTM, TC> : grouped_tc_kernel<false, kTM, TC>;
    };
    if (wgmma) {
      // k-contiguous weights come by TMA where the map takes them.
      CUtensorMap map{};
      const bool tma = trans_w && weight_map(&map, ow.p, groups, n, k, ow.ld, ow.ld0, bn);
      const auto kernel = tm == 64 ? (trans_w ? (tma ? grouped_wg_kernel<true, TC, 1, kDecodeTileN, true>
                                                     : grouped_wg_kernel<true, TC, 1, kDecodeTileN>)
                                              : grouped_wg_kernel<false, TC, 1, kDecodeTileN>)
                                   : (trans_w ? (tma ? grouped_wg_kernel<true, TC, 2, kTileN, true>
                                                     : grouped_wg_kernel<true, TC, 2>)
                                              : grouped_wg_kernel<false, TC, 2>);
      set_tc_attributes(kernel, smem);
      constexpr int kPer = 16 / sizeof(TC);
      const bool staged = n % kPer == 0 && ldc % kPer == 0 && reinterpret_cast<uintptr_t>(c) % 16 == 0;
      kernel<<<grid, 2 * tm, smem, stream()>>>(
          static_cast<const __nv_bfloat16*>(oa.p), oa.ld, static_cast<const __nv_bfloat16*>(ow.p), ow.ld, ow.ld0,
          static_cast<TC*>(c), ldc, bounds, static_cast<int>(groups), static_cast<int>(n), static_cast<int>(k), beta,
          staged, dense_rows, map);
      return;
    }
    const auto kernel = tm == 32   ? pick(std::integral_constant<int, 32>())
                        : tm == 64 ? pick(std::integral_constant<int, 64>())
                                   : pick(std::integral_constant<int, 128>());
    set_tc_attributes(kernel, smem);
    kernel<<<grid, kTcThreads, smem, stream()>>>(
        static_cast<const __nv_bfloat16*>(oa.p), oa.ld, static_cast<const __nv_bfloat16*>(ow.p), ow.ld, ow.ld0,
        static_cast<TC*>(c), ldc, bounds, static_cast<int>(groups), static_cast<int>(n), static_cast<int>(k), beta,
        dense_rows);
  };
  if (c16)
    launch(static_cast<__nv_bfloat16*>(nullptr));
  else
    launch(static_cast<float*>(nullptr));
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::grouped_gemm(const Tensor& a, const Tensor& w, bool trans_w, const Tensor& offsets, Tensor& c,
                               float beta, const Tensor* a_rows) {
  CHECK_EQ(w.dim(), 3);
  check_operand(a);
  check_operand(w);
  check_device(c, c.dtype());
  CHECK(c.dtype() == DType::kF32 || (c.dtype() == DType::kBF16 && beta == 0.0f))
      << "grouped_gemm into " << dtype_name(c.dtype()) << " with beta " << beta;
  CHECK_EQ(w.stride(2), 1);
  const Rows A = rows_of(a), C = rows_of(c);
  const bool c16 = c.dtype() == DType::kBF16;
  const int64_t groups = w.size(0), n = trans_w ? w.size(1) : w.size(2), k = trans_w ? w.size(2) : w.size(1);
  check_offsets(offsets, groups);
  CHECK_EQ(A.cols, k);
  CHECK_EQ(C.cols, n);
  check_a_rows(a_rows, C.rows, A.rows);
  // Counted as if every row is in a group (the bounds stay on the device).
  const int64_t rows = C.rows;
  Op op(this, "grouped_gemm", 2.0 * rows * n * k,
        1.0 * dtype_size(a.dtype()) * rows * k + 1.0 * dtype_size(c.dtype()) * rows * n +
            1.0 * dtype_size(w.dtype()) * groups * n * k);
  if (rows == 0 || groups == 0) return;
  const bool bf16 = bf16_products(a, w);
  const bool fits = rows < (int64_t{1} << 31) && A.rows < (int64_t{1} << 31) && n < (int64_t{1} << 31) &&
                    k < (int64_t{1} << 31);
  // Few rows a group (decode): the weight-streaming kernel (which reads rows by index too); 16 or 32 rows
  // at a time by the mean.
  const size_t small_bytes = static_cast<size_t>(rows <= 2 * groups ? 16 : 32) * k * 2;
  if (!opt_.batch_invariant && trans_w && w.dtype() == DType::kBF16 && fits && rows <= 4 * groups && k % 8 == 0 &&
      w.stride(1) % 8 == 0 &&
      w.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(w.raw()) % 16 == 0 && small_bytes <= 96 * 1024) {
    const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>((n + kSmallTile - 1) / kSmallTile));
    const auto launch = [&](auto* tag, auto* out) {
      using TA = std::remove_cv_t<std::remove_pointer_t<decltype(tag)>>;
      using TC = std::remove_pointer_t<decltype(out)>;
      const auto kernel = rows <= 2 * groups ? grouped_small_kernel<16, TA, TC> : grouped_small_kernel<32, TA, TC>;
      if (small_bytes > 48 * 1024)  // an opt-in, per device
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024));
      kernel<<<grid, kSmallWarps * 32, small_bytes, stream()>>>(
          static_cast<const TA*>(A.p), A.ld, static_cast<const __nv_bfloat16*>(w.raw()), w.stride(1), w.stride(0),
          static_cast<TC*>(C.p), C.ld, static_cast<int>(n), static_cast<int>(k), offsets.data<int64_t>(), beta,
          a_rows != nullptr ? a_rows->data<int32_t>() : nullptr);
    };
    const auto with_out = [&](auto* tag) {
      if (c16)
        launch(tag, static_cast<__nv_bfloat16*>(nullptr));
      else
        launch(tag, static_cast<float*>(nullptr));
    };
    if (a.dtype() == DType::kBF16)
      with_out(static_cast<__nv_bfloat16*>(nullptr));
    else
      with_out(static_cast<float*>(nullptr));
    CUDA_CHECK(cudaGetLastError());
    return;
  }
  if (a_rows != nullptr) {  // the other kernels read rows in order (the model's gathered products take
                            // grouped_gate_up)
    grouped_gemm(rows_in_order(a, a_rows), w, trans_w, offsets, c, beta, nullptr);
    return;
  }
  // bf16 products: the tensor-core kernel, all groups in one launch.
  Tensor ka, kw;
  const Operand oa = gemm_operand(a, bf16, A.rows, A.cols, A.ld, A.rows, 0, ka);
  const Operand ow = gemm_operand(w, bf16, groups * w.size(1), w.size(2), w.stride(1), w.size(1), w.stride(0), kw);
  if (bf16 && fits && tc_operand(oa, k) && tc_operand(ow, w.size(2)) && groups < 65535) {
    // Row tiles by the mean rows a group: 32 or 64 where the groups are short (decode), so that the
    // tensor cores work on rows that exist; 128 otherwise, and always where products are batch-invariant.
    const int64_t mean = rows / groups;
    const int tm = opt_.batch_invariant ? 128 : mean <= kGroupedTile32 ? 32 : mean <= kGroupedTile64 ? 64 : 128;
    tc_products(oa, ow, trans_w, groups, offsets.data<int64_t>(), rows, C.p, C.ld, c16, n, k, beta, tm);
    return;
  }
  // f32 or tf32 products (or operands the kernels cannot take): cuBLAS a group at a time, which needs
  // the bounds on the host; into bf16 through f32 sums rounded once.
  if (c16) {
    Tensor c32 = empty(c.shape(), DType::kF32);
    copy(c, c32);  // rows outside the groups round-trip exactly
    grouped_gemm(a, w, trans_w, offsets, c32, 0.0f, nullptr);
    copy(c32, c);
    return;
  }
  const std::vector<int64_t> o = host_offsets(offsets, rows);
  const cublasComputeType_t ct = operand_compute(oa, opt_.gemm);
  const auto& sides = fork_sides();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r0 = o[g], nr = o[g + 1] - o[g];
    if (nr == 0) continue;
    gemm_rows(sides[g % sides.size()].blas, ct, row_ptr(oa, r0), oa.type, oa.ld, false, row_ptr(ow, g * w.size(1)),
              ow.type, ow.ld, trans_w, C.f() + r0 * C.ld, C.ld, nr, n, k, 1.0f, beta);
  }
  join_sides();
}

void CudaBackend::grouped_gate_up(const Tensor& a, const Tensor& w, const Tensor& offsets, Tensor& h,
                                  Tensor* gate_up, const Tensor* a_rows) {
  CHECK_EQ(w.dim(), 3);
  check_operand(a);
  check_operand(w);
  CHECK(h.dtype() == DType::kBF16) << "grouped_gate_up writes bf16, not " << dtype_name(h.dtype());
  check_device(h, DType::kBF16);
  const Rows A = rows_of(a), H = rows_of(h);
  const int64_t groups = w.size(0), n = w.size(1) / 2, k = w.size(2);
  check_offsets(offsets, groups);
  CHECK_EQ(w.size(1), 2 * n);
  CHECK_EQ(A.cols, k);
  CHECK_EQ(H.cols, n);
  check_a_rows(a_rows, H.rows, A.rows);
  Rows GU{nullptr, 0, 0, 0};
  if (gate_up != nullptr) {
    CHECK(gate_up->dtype() == DType::kBF16) << "grouped_gate_up's products go out in bf16, not "
                                            << dtype_name(gate_up->dtype());
    check_device(*gate_up, DType::kBF16);
    GU = rows_of(*gate_up);
    CHECK(GU.rows == H.rows && GU.cols == 2 * n) << "grouped_gate_up: gate_up " << shape_str(gate_up->shape());
  }
  const int64_t rows = H.rows;
  const int32_t* index = a_rows != nullptr ? a_rows->data<int32_t>() : nullptr;
  const bool fits = rows < (int64_t{1} << 31) && n < (int64_t{1} << 31) && k < (int64_t{1} << 31);
  // Few rows a group take grouped_gemm's weight-streaming kernel, and f32 products cuBLAS: those run
  // as the reference composition does.
  const bool bf16 = bf16_products(a, w);
  if (groups == 0 || (rows <= 4 * groups && !opt_.batch_invariant) || !fits || !bf16 || w.stride(2) != 1 ||
      groups >= 65535 || A.rows >= (int64_t{1} << 31)) {
    Backend::grouped_gate_up(a, w, offsets, h, gate_up, a_rows);
    return;
  }
  Tensor ka, kw;
  const Operand oa = gemm_operand(a, bf16, A.rows, A.cols, A.ld, A.rows, 0, ka);
  const Operand ow = gemm_operand(w, bf16, groups * w.size(1), k, w.stride(1), w.size(1), w.stride(0), kw);
  if (!tc_operand(oa, k) || !tc_operand(ow, k)) {
    Backend::grouped_gate_up(a, w, offsets, h, gate_up, a_rows);
    return;
  }
  Op op(this, "grouped_gate_up", 4.0 * rows * n * k,
        2.0 * rows * (k + n) + 2.0 * groups * 2 * n * k + (gate_up ? 4.0 * rows * n : 0.0));
  // A training forward keeps the products and makes h from them rounded; batch-invariant products make
  // h so in every forward (the products go to a scratch buffer), so that inference and training give the
  // same bits.
  Tensor scratch;
  if (opt_.batch_invariant && gate_up == nullptr) {
    scratch = empty({rows, 2 * n}, DType::kBF16);
    GU = rows_of(scratch);
  }
  const int64_t mean = rows / groups;
  const int tm = opt_.batch_invariant ? 128 : mean <= kGroupedTile32 ? 32 : mean <= kGroupedTile64 ? 64 : 128;
  // The warpgroup kernel (Hopper), 2 warpgroups a block or 1; 64-row tiles with 64 columns (kDecodeTileN).
  const bool wgmma = (tm == kTileM || tm == 64) && hopper_;
  const int bn = wgmma ? wg_column_tile(tm) : kTileN;
  const dim3 grid(static_cast<unsigned>((n + bn / 2 - 1) / (bn / 2)),
                  static_cast<unsigned>((rows + tm - 1) / tm + groups));
  CHECK_LT(grid.y, 65536u) << "grouped_gate_up: too many rows";
  if (wgmma) {
    const auto aligned = [](const Rows& x) { return x.ld % 8 == 0 && reinterpret_cast<uintptr_t>(x.p) % 16 == 0; };
    const bool staged = n % 8 == 0 && aligned(H) && (GU.p == nullptr || aligned(GU));
    // The weights by TMA where the map takes them (boxes of half a tile's rows: gate, then up).
    CUtensorMap map{};
    const bool tma = weight_map(&map, ow.p, groups, 2 * n, k, ow.ld, ow.ld0, bn / 2);
    const auto pick = [&](auto wg, auto gather, auto bn_tag) {
      constexpr int kWG = decltype(wg)::value, kG = decltype(gather)::value, kBN = decltype(bn_tag)::value;
      return tma ? grouped_gated_wg_kernel<kWG, kG, kBN, true> : grouped_gated_wg_kernel<kWG, kG, kBN>;
    };
    using I1 = std::integral_constant<int, 1>;
    using I2 = std::integral_constant<int, 2>;
    using Gather = std::integral_constant<int, kGatherA>;
    using InOrder = std::integral_constant<int, kInOrder>;
    using Narrow = std::integral_constant<int, kDecodeTileN>;
    using Wide = std::integral_constant<int, kTileN>;
    const auto kernel = index ? (tm == 64 ? pick(I1(), Gather(), Narrow()) : pick(I2(), Gather(), Wide()))
                              : (tm == 64 ? pick(I1(), InOrder(), Narrow()) : pick(I2(), InOrder(), Wide()));
    const size_t smem = wg_smem_bytes(tm / 64, bn);
    set_tc_attributes(kernel, smem);
    kernel<<<grid, 2 * tm, smem, stream()>>>(
        static_cast<const __nv_bfloat16*>(oa.p), oa.ld, static_cast<const __nv_bfloat16*>(ow.p), ow.ld, ow.ld0,
        static_cast<__nv_bfloat16*>(H.p), H.ld, static_cast<__nv_bfloat16*>(GU.p), GU.ld, offsets.data<int64_t>(),
        static_cast<int>(groups), static_cast<int>(n), static_cast<int>(k), staged, index, map);
    CUDA_CHECK(cudaGetLastError());
    return;
  }
  const auto plain = tm == 32   ? grouped_gated_kernel<32>
                     : tm == 64 ? grouped_gated_kernel<64>
                                : grouped_gated_kernel<128>;
  const auto gathered = tm == 32   ? grouped_gated_kernel<32, kGatherA>
                        : tm == 64 ? grouped_gated_kernel<64, kGatherA>
                                   : grouped_gated_kernel<128, kGatherA>;
  const auto kernel = index ? gathered : plain;
  const size_t smem = tm == 32 ? tc_smem<32>() : tm == 64 ? tc_smem<64>() : tc_smem<128>();
  set_tc_attributes(kernel, smem);
  kernel<<<grid, kTcThreads, smem, stream()>>>(static_cast<const __nv_bfloat16*>(oa.p), oa.ld,
                                                 static_cast<const __nv_bfloat16*>(ow.p), ow.ld, ow.ld0,
                                                 static_cast<__nv_bfloat16*>(H.p), H.ld,
                                                 static_cast<__nv_bfloat16*>(GU.p), GU.ld, offsets.data<int64_t>(),
                                                 static_cast<int>(groups), static_cast<int>(n), static_cast<int>(k),
                                                 index);
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::grouped_silu_backward(const Tensor& dc, const Tensor& w, const Tensor& offsets,
                                        const Tensor& gate_up, Tensor& dgu, const Tensor* dc_rows,
                                        const Tensor* scale, Tensor* dscale, Tensor* scaled_act) {
  CHECK_EQ(w.dim(), 3);
  check_operand(dc);
  check_operand(w);
  check_device(gate_up, dgu.dtype());
  check_device(dgu, dgu.dtype());
  const Rows D = rows_of(dc), GU = rows_of(gate_up), DG = rows_of(dgu);
  const int64_t groups = w.size(0), k = w.size(1), n = w.size(2);
  const int64_t rows = dc_rows != nullptr ? dc_rows->numel() : D.rows;
  check_offsets(offsets, groups);
  check_a_rows(dc_rows, rows, D.rows);
  CHECK_EQ(D.cols, k) << "grouped_silu_backward: dc vs w";
  CHECK(GU.rows == rows && GU.cols == 2 * n) << "grouped_silu_backward: gate_up " << shape_str(gate_up.shape());
  CHECK(DG.rows == rows && DG.cols == 2 * n) << "grouped_silu_backward: dgu " << shape_str(dgu.shape());
  CHECK((scale == nullptr) == (dscale == nullptr) && (scale == nullptr) == (scaled_act == nullptr))
      << "grouped_silu_backward: scale, dscale and scaled_act come together";
  Rows SA{};
  if (scale != nullptr) {
    check_device(*scale, DType::kF32);
    check_device(*dscale, DType::kF32);
    check_device(*scaled_act, dgu.dtype());
    CHECK(scale->is_contiguous() && scale->numel() == rows) << "grouped_silu_backward: scale";
    CHECK(dscale->is_contiguous() && dscale->numel() == rows) << "grouped_silu_backward: dscale";
    SA = rows_of(*scaled_act);
    CHECK(SA.rows == rows && SA.cols == n) << "grouped_silu_backward: scaled_act " << shape_str(scaled_act->shape());
  }
  // Where grouped_gemm would take the warpgroup kernel (bf16 operands of whole 16-byte chunks, row tiles
  // of 64 or 128 on Hopper) and the gate's rows are bf16 chunks too: the fused kernel; otherwise the
  // reference composition (the same bits either way, but for the dots' order of sums).
  const int64_t mean = groups > 0 ? rows / groups : 0;
  const int tm = opt_.batch_invariant ? 128 : mean <= kGroupedTile32 ? 32 : mean <= kGroupedTile64 ? 64 : 128;
  const auto chunks = [](const Rows& x) { return x.ld % 8 == 0 && reinterpret_cast<uintptr_t>(x.p) % 16 == 0; };
  const Operand od{D.p, CUDA_R_16BF, D.rows, k, D.ld, D.rows, 0};
  const Operand ow{w.raw(), CUDA_R_16BF, groups * k, n, w.stride(1), k, w.stride(0)};
  const bool fused = hopper_ && (tm == 64 || tm == kTileM) && rows > 0 && groups > 0 && groups < 65535 &&
                     rows < (int64_t{1} << 31) && D.rows < (int64_t{1} << 31) && k < (int64_t{1} << 31) &&
                     n % 8 == 0 && dc.dtype() == DType::kBF16 && w.dtype() == DType::kBF16 &&
                     dgu.dtype() == DType::kBF16 && w.stride(2) == 1 && tc_operand(od, k) && tc_operand(ow, n) &&
                     chunks(GU) && chunks(DG) && (scale == nullptr || chunks(SA));
  if (!fused) {
    Backend::grouped_silu_backward(dc, w, offsets, gate_up, dgu, dc_rows, scale, dscale, scaled_act);
    return;
  }
  Op op(this, "grouped_silu_backward", 2.0 * rows * n * k + (scale ? 20.0 : 12.0) * rows * n,
        2.0 * rows * k + 2.0 * groups * k * n + (scale ? 10.0 : 8.0) * rows * n);
  const unsigned tiles = static_cast<unsigned>((n + kTileN - 1) / kTileN);
  const dim3 grid(tiles, static_cast<unsigned>((rows + tm - 1) / tm + groups));
  CHECK_LT(grid.y, 65536u) << "grouped_silu_backward: too many rows";
  Tensor parts = scale != nullptr ? empty({rows, static_cast<int64_t>(tiles)}, DType::kF32) : Tensor();
  const auto launch = [&](auto kernel) {
    set_tc_attributes(kernel, wg_smem_bytes(tm / 64));
    kernel<<<grid, 2 * tm, wg_smem_bytes(tm / 64), stream()>>>(
        static_cast<const __nv_bfloat16*>(od.p), od.ld, static_cast<const __nv_bfloat16*>(ow.p), ow.ld, ow.ld0,
        static_cast<const __nv_bfloat16*>(GU.p), GU.ld, static_cast<__nv_bfloat16*>(DG.p), DG.ld,
        offsets.data<int64_t>(), static_cast<int>(groups), static_cast<int>(n), static_cast<int>(k),
        dc_rows != nullptr ? dc_rows->data<int32_t>() : nullptr, scale != nullptr ? scale->f32() : nullptr,
        scale != nullptr ? parts.f32() : nullptr, static_cast<__nv_bfloat16*>(SA.p), SA.ld);
    CUDA_CHECK(cudaGetLastError());
  };
  if (scale == nullptr && dc_rows == nullptr)
    launch(tm == 64 ? grouped_silu_backward_wg_kernel<1> : grouped_silu_backward_wg_kernel<2>);
  else if (scale == nullptr)
    launch(tm == 64 ? grouped_silu_backward_wg_kernel<1, kGatherA> : grouped_silu_backward_wg_kernel<2, kGatherA>);
  else if (dc_rows == nullptr)
    launch(tm == 64 ? grouped_silu_backward_wg_kernel<1, kInOrder, true>
                    : grouped_silu_backward_wg_kernel<2, kInOrder, true>);
  else
    launch(tm == 64 ? grouped_silu_backward_wg_kernel<1, kGatherA, true>
                    : grouped_silu_backward_wg_kernel<2, kGatherA, true>);
  if (scale != nullptr) {
    grouped_silu_dots_kernel<<<static_cast<unsigned>((rows + 255) / 256), 256, 0, stream()>>>(
        parts.f32(), static_cast<int>(tiles), rows, dscale->f32());
    CUDA_CHECK(cudaGetLastError());
  }
}

void CudaBackend::grouped_gemm_wgrad(const Tensor& dc, const Tensor& a, const Tensor& offsets, Tensor& dw,
                                     float beta, const Tensor* a_rows, const Tensor* dc_rows) {
  CHECK_EQ(dw.dim(), 3);
  CHECK(beta == 0.0f || beta == 1.0f) << "grouped_gemm_wgrad adds (beta 1) or overwrites (0), not beta " << beta;
  check_operand(dc);
  check_operand(a);
  check_device(dw, DType::kF32);
  CHECK_EQ(dw.stride(2), 1);
  const Rows D = rows_of(dc), A = rows_of(a);
  const int64_t groups = dw.size(0), n = dw.size(1), k = dw.size(2);
  check_offsets(offsets, groups);
  CHECK_EQ(D.cols, n);
  CHECK_EQ(A.cols, k);
  const int64_t rows = dc_rows != nullptr ? dc_rows->numel() : D.rows;
  check_a_rows(dc_rows, rows, D.rows);
  check_a_rows(a_rows, rows, A.rows);
  if (groups == 0) return;
  const bool bf16 = bf16_products(dc, a);
  Tensor kd, ka;
  const Operand od = gemm_operand(dc, bf16, D.rows, D.cols, D.ld, D.rows, 0, kd);
  const Operand oa = gemm_operand(a, bf16, A.rows, A.cols, A.ld, A.rows, 0, ka);
  const bool tc = bf16 && tc_operand(od, n) && tc_operand(oa, k) && rows < (int64_t{1} << 31) &&
                  A.rows < (int64_t{1} << 31) && D.rows < (int64_t{1} << 31) && groups < 65536;
  // Only the warpgroup kernel reads rows by index, of one operand.
  if (dc_rows != nullptr && (a_rows != nullptr || !(tc && hopper_))) {
    grouped_gemm_wgrad(rows_in_order(dc, dc_rows), a, offsets, dw, beta, a_rows, nullptr);
    return;
  }
  if (a_rows != nullptr && !(tc && hopper_)) {
    grouped_gemm_wgrad(dc, rows_in_order(a, a_rows), offsets, dw, beta, nullptr, nullptr);
    return;
  }
  Op op(this, "grouped_gemm_wgrad", 2.0 * rows * n * k,
        4.0 * (rows * (n + k) + (beta == 0.0f ? 1 : 2) * groups * n * k));
  if (rows == 0) {
    if (beta == 0.0f) fill(dw, 0.0f);
    return;
  }
  if (tc) {
    const dim3 grid(static_cast<unsigned>((k + kTileN - 1) / kTileN), static_cast<unsigned>((n + kTileM - 1) / kTileM),
                    static_cast<unsigned>(groups));
    if (hopper_) {
      const bool staged = k % 4 == 0 && dw.stride(1) % 4 == 0 && dw.stride(0) % 4 == 0 &&
                          reinterpret_cast<uintptr_t>(dw.raw()) % 16 == 0;
      const auto kernel = a_rows    ? grouped_wgrad_wg_kernel<kGatherK>
                          : dc_rows ? grouped_wgrad_wg_kernel<kGatherKA>
                                    : grouped_wgrad_wg_kernel<>;
      set_tc_attributes(kernel, kWgSmem);
      const Tensor* by = a_rows != nullptr ? a_rows : dc_rows;
      kernel<<<grid, kTcThreads, kWgSmem, stream()>>>(
          static_cast<const __nv_bfloat16*>(od.p), od.ld, static_cast<const __nv_bfloat16*>(oa.p), oa.ld, dw.f32(),
          dw.stride(1), dw.stride(0), offsets.data<int64_t>(), static_cast<int>(n), static_cast<int>(k), beta, staged,
          by != nullptr ? by->data<int32_t>() : nullptr);
      CUDA_CHECK(cudaGetLastError());
      return;
    }
    set_tc_attributes(grouped_wgrad_tc_kernel);
    grouped_wgrad_tc_kernel<<<grid, kTcThreads, kTcSmem, stream()>>>(
        static_cast<const __nv_bfloat16*>(od.p), od.ld, static_cast<const __nv_bfloat16*>(oa.p), oa.ld, dw.f32(),
        dw.stride(1), dw.stride(0), offsets.data<int64_t>(), static_cast<int>(n), static_cast<int>(k), beta);
    CUDA_CHECK(cudaGetLastError());
    return;
  }
  const std::vector<int64_t> o = host_offsets(offsets, rows);
  if (beta == 0.0f) {  // groups without rows get zeros (on the main stream, before the side streams start)
    for (int64_t g = 0; g < groups; ++g) {
      Tensor dwg = dw[g];
      if (o[g + 1] == o[g]) fill(dwg, 0.0f);
    }
  }
  const cublasComputeType_t ct = operand_compute(od, opt_.gemm);
  const auto& sides = fork_sides();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r0 = o[g], nr = o[g + 1] - o[g];
    if (nr == 0) continue;
    // dw[g] [n, k] = beta · dw[g] + dc[rows]ᵀ · a[rows]
    gemm_rows(sides[g % sides.size()].blas, ct, row_ptr(od, r0), od.type, od.ld, true, row_ptr(oa, r0), oa.type, oa.ld,
              false, dw.f32() + g * dw.stride(0), dw.stride(1), n, k, nr, 1.0f, beta);
  }
  join_sides();
}

}  // namespace r1lab::core::cuda
