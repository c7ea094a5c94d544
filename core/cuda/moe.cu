// The MoE router, the expert dispatch/combine, and token log-probabilities of the CUDA backend, forward
// and backward. Each follows its CPU reference's order of operations (ties in the router broken toward
// the lower expert index, assignments grouped by expert stably in token order), with no atomics.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>

#include "core/cuda/cuda_backend.h"
#include "core/policy_loss.h"
#include "core/cuda/silu.cuh"
#include "core/cuda/vec.cuh"

namespace r1lab::core::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kRouteWarps = 4;

// The better of two (value, index) candidates: larger value, then lower index; NaN never wins.
__device__ __forceinline__ void better(float& v, int& i, float ov, int oi) {
  if (oi < 0) return;
  if (i < 0 || ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}
__device__ __forceinline__ void warp_best(float& v, int& i) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFull, v, o);
    const int oi = __shfl_xor_sync(kFull, i, o);
    better(v, i, ov, oi);
  }
}

// The shared experts' gated activation that route_kernel makes beside the selection (gu null: none):
// act[m, j] = silu(g) · u for gu's row m = [g | u] (f32, 16-byte aligned rows), inter a multiple of 4.
struct SharedGate {
  const float* gu = nullptr;
  int64_t ldgu = 0;
  void* act = nullptr;  // f32 or bf16 (act16)
  int64_t ldact = 0;
  int inter = 0;
  bool act16 = false;
};

// The warp's token m of a SharedGate: kVec float4s of g and of u a lane in flight at once, then their
// products by silu_gate, as silu_mul_forward_kernel makes them (the same bits; into bf16 from the products
// rounded to bf16, as it makes them from bf16 products). (Its loads issued before the
// selection and finished after it, the kernel held 255 registers and took longer: 8.6 us against 8.2 at
// batch 256 on an H100.)
__device__ __forceinline__ void shared_gate_row(const SharedGate& sg, int64_t m, int lane) {
  constexpr int kVec = 8;
  const float* gr = sg.gu + m * sg.ldgu;
  for (int c0 = 0; c0 < sg.inter; c0 += 32 * 4 * kVec) {
    float4 g[kVec], u[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const int c = c0 + 4 * (lane + 32 * v);
      if (c < sg.inter) {
        g[v] = *reinterpret_cast<const float4*>(gr + c);
        u[v] = *reinterpret_cast<const float4*>(gr + sg.inter + c);
      }
    }
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const int c = c0 + 4 * (lane + 32 * v);
      if (c >= sg.inter) continue;
      const float gs[4] = {g[v].x, g[v].y, g[v].z, g[v].w}, us[4] = {u[v].x, u[v].y, u[v].z, u[v].w};
      float h[4];
#pragma unroll
      for (int e = 0; e < 4; ++e)
        h[e] = sg.act16 ? silu_gate(__bfloat162float(__float2bfloat16(gs[e])), __bfloat162float(__float2bfloat16(us[e])))
                        : silu_gate(gs[e], us[e]);
      if (sg.act16) {
        __nv_bfloat16* out = static_cast<__nv_bfloat16*>(sg.act) + m * sg.ldact + c;
        for (int e = 0; e < 4; ++e) out[e] = __float2bfloat16(h[e]);
      } else {
        float* out = static_cast<float*>(sg.act) + m * sg.ldact + c;
        for (int e = 0; e < 4; ++e) out[e] = h[e];
      }
    }
  }
}

// One warp per token. Shared memory per warp (route_smem_floats): the scores s[E] and choice[E] f32,
// gscore[G] f32, the picks[K] I32, taken[E] u8 (within E floats): every read after the first pass over the
// logits stays on chip (the scores go out to memory once; the selection's chain of reads waited on memory
// round trips before). With a SharedGate, a warp of its own makes the token's shared-experts activation.
__host__ __device__ inline int route_smem_floats(const RouterConfig& cfg) {
  return 4 * cfg.n_experts + cfg.n_group + cfg.top_k;
}
__global__ void route_kernel(const float* logits, int64_t ldl, const float* bias, RouterConfig cfg, int64_t rows,
                             int32_t* idx, float* weights, float* scores, SharedGate gate) {
  extern __shared__ float sm[];
  const int E = cfg.n_experts, K = cfg.top_k, G = cfg.n_group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // With the shared experts' gate, warps kRouteWarps .. 2·kRouteWarps - 1 make the same tokens' gated
  // activations while the first kRouteWarps select: the two chains of memory round trips run side by side
  // rather than one after the other.
  if (warp >= kRouteWarps) {
    const int64_t m = static_cast<int64_t>(blockIdx.x) * kRouteWarps + (warp - kRouteWarps);
    if (m < rows) shared_gate_row(gate, m, lane);
    return;
  }
  float* s = sm + warp * route_smem_floats(cfg);
  float* choice = s + E;
  float* gscore = choice + E;
  int32_t* picks = reinterpret_cast<int32_t*>(gscore + G);
  unsigned char* taken = reinterpret_cast<unsigned char*>(picks + K);
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (m >= rows) return;
  const float* l = logits + m * ldl;
  if (cfg.scoring == RouterConfig::Scoring::kSigmoid) {
    for (int j = lane; j < E; j += 32) s[j] = 1.0f / (1.0f + expf(-l[j]));
  } else {
    float mx = -INFINITY;
    for (int j = lane; j < E; j += 32) mx = fmaxf(mx, l[j]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, o));
    double sum = 0;
    for (int j = lane; j < E; j += 32) sum += exp(static_cast<double>(l[j] - mx));
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(kFull, sum, o);
    for (int j = lane; j < E; j += 32) s[j] = static_cast<float>(exp(static_cast<double>(l[j] - mx)) / sum);
  }
  __syncwarp();
  for (int j = lane; j < E; j += 32) {
    scores[m * E + j] = s[j];
    choice[j] = s[j] + (bias ? bias[j] : 0.0f);
    taken[j] = 0;
  }
  __syncwarp();
  if (cfg.method != RouterConfig::TopkMethod::kGreedy && G > 1) {
    const int per = E / G;
    for (int g = lane; g < G; g += 32) {
      float a = -INFINITY, b = -INFINITY;  // the two largest in the group
      for (int j = g * per; j < (g + 1) * per; ++j) {
        const float c = choice[j];
        if (c > a) {
          b = a;
          a = c;
        } else if (c > b) {
          b = c;
        }
      }
      gscore[g] = cfg.method == RouterConfig::TopkMethod::kNoauxTc ? a + (per > 1 ? b : 0.0f) : a;
    }
    __syncwarp();
    // Keep the topk_group best groups (ties to the lower group); the rest are marked by -inf scores.
    unsigned long long keep = 0;
    for (int r = 0; r < cfg.topk_group; ++r) {
      float v = -INFINITY;
      int i = -1;
      for (int g = lane; g < G; g += 32)
        if (!((keep >> g) & 1ull)) better(v, i, gscore[g], g);
      warp_best(v, i);
      if (i >= 0) keep |= 1ull << i;
    }
    for (int j = lane; j < E; j += 32)
      if (!((keep >> (j / per)) & 1ull)) choice[j] = -INFINITY;
    __syncwarp();
  }
  double denom = 0;
  for (int k = 0; k < K; ++k) {
    float v = -INFINITY;
    int i = -1;
    for (int j = lane; j < E; j += 32)
      if (!taken[j]) better(v, i, choice[j], j);
    warp_best(v, i);
    if (lane == 0) {
      taken[i] = 1;
      picks[k] = i;
    }
    __syncwarp();
    denom += s[i];
  }
  const float norm = cfg.norm_topk_prob ? static_cast<float>(denom + 1e-20) : 1.0f;
  for (int k = lane; k < K; k += 32) {
    idx[m * K + k] = picks[k];
    weights[m * K + k] = s[picks[k]] / norm * cfg.routed_scaling_factor;
  }
}

// One warp per token; ds[E] doubles in shared memory.
__global__ void route_backward_kernel(const float* dw, const float* scores, const int32_t* idx, RouterConfig cfg,
                                      int64_t rows, float* dlogits, int64_t ldd) {
  extern __shared__ double dsm[];
  const int E = cfg.n_experts, K = cfg.top_k;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  double* ds = dsm + warp * E;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (m >= rows) return;
  const float* s = scores + m * E;
  for (int j = lane; j < E; j += 32) ds[j] = 0;
  __syncwarp();
  const float c = cfg.routed_scaling_factor;
  if (lane == 0) {
    double denom = 1.0, cross = 0.0;
    if (cfg.norm_topk_prob) {
      denom = 1e-20;
      for (int k = 0; k < K; ++k) denom += s[idx[m * K + k]];
      for (int k = 0; k < K; ++k) cross += static_cast<double>(dw[m * K + k]) * s[idx[m * K + k]];
    }
    for (int k = 0; k < K; ++k) {
      const int j = idx[m * K + k];
      ds[j] += c * dw[m * K + k] / denom;
      if (cfg.norm_topk_prob) ds[j] -= c * cross / (denom * denom);
    }
  }
  __syncwarp();
  float* g = dlogits + m * ldd;
  if (cfg.scoring == RouterConfig::Scoring::kSigmoid) {
    for (int j = lane; j < E; j += 32) g[j] += static_cast<float>(ds[j] * s[j] * (1.0 - s[j]));
  } else {
    double dot = 0;
    if (lane == 0)
      for (int j = 0; j < E; ++j) dot += ds[j] * s[j];
    dot = __shfl_sync(kFull, dot, 0);
    for (int j = lane; j < E; j += 32) g[j] += static_cast<float>(s[j] * (ds[j] - dot));
  }
}

constexpr int kScanThreads = 256;

// Ranks in chunks of kScanThreads assignments (block c takes chunk c): the rank of each assignment among
// the assignments to its expert before it in the chunk (lanes of a warp with the same expert find each
// other with __match_any_sync; the warps before count in shared memory), and each expert's count in the
// chunk, into counts [E][C] (expert-major). Assignments to no expert (outside [0, E)) take no rank.
__global__ void chunk_rank_kernel(const int32_t* idx, int64_t n, int n_experts, int32_t* rank, int32_t* counts) {
  constexpr int kWarps = kScanThreads / 32;
  extern __shared__ int warp_counts[];  // [kWarps][n_experts]
  for (int i = threadIdx.x; i < kWarps * n_experts; i += kScanThreads) warp_counts[i] = 0;
  __syncthreads();
  const int64_t a = static_cast<int64_t>(blockIdx.x) * kScanThreads + threadIdx.x;
  const int32_t e = a < n ? idx[a] : -1;
  const bool valid = e >= 0 && e < n_experts;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned same = __match_any_sync(0xffffffffu, valid ? e : -1);
  const int before = __popc(same & ((1u << lane) - 1u));
  if (valid && before == 0) warp_counts[warp * n_experts + e] = __popc(same);
  __syncthreads();
  if (valid) {
    int r = before;
    for (int w = 0; w < warp; ++w) r += warp_counts[w * n_experts + e];
    rank[a] = r;
  }
  for (int g = threadIdx.x; g < n_experts; g += kScanThreads) {
    int c = 0;
    for (int w = 0; w < kWarps; ++w) c += warp_counts[w * n_experts + g];
    counts[static_cast<int64_t>(g) * gridDim.x + blockIdx.x] = c;
  }
}

// One block of kStartThreads: starts[g][c] = the first row of expert g's assignments of chunk c, the
// exclusive prefix sum of counts in expert-major order; offsets[g] = starts[g][0], offsets[E] = n's
// assignments to experts.
constexpr int kStartThreads = 1024;
__global__ void __launch_bounds__(kStartThreads)
    chunk_starts_kernel(const int32_t* counts, int n_experts, int64_t chunks, int64_t* starts, int64_t* offsets) {
  using Scan = cub::BlockScan<int64_t, kStartThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int64_t total = n_experts * chunks;
  int64_t carry = 0;
  for (int64_t j0 = 0; j0 < total; j0 += kStartThreads) {
    const int64_t j = j0 + threadIdx.x;
    int64_t before = 0, tile = 0;
    Scan(temp).ExclusiveSum(j < total ? static_cast<int64_t>(counts[j]) : 0, before, tile);
    if (j < total) {
      starts[j] = carry + before;
      if (j % chunks == 0) offsets[j / chunks] = carry + before;
    }
    carry += tile;
    __syncthreads();
  }
  if (threadIdx.x == 0) offsets[n_experts] = carry;
}

// cols elements of a row from src to dst: 16 bytes a thread at a time where both allow (vec16).
template <typename T>
__device__ __forceinline__ void copy_row(const T* src, T* dst, int64_t cols, bool vec16) {
  if (vec16) {
    const int64_t chunks = cols * static_cast<int64_t>(sizeof(T)) / 16;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x)
      reinterpret_cast<int4*>(dst)[c] = reinterpret_cast<const int4*>(src)[c];
  } else {
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
  }
}

// The group bounds from the experts' counts, by one block of kScanThreads: offsets[g] = Σ_{g' < g}
// counts[g'].
using BoundsScan = cub::BlockScan<int64_t, kScanThreads>;
template <typename C>
__device__ void write_bounds(const C* counts, int n_experts, int64_t* offsets, BoundsScan::TempStorage& temp) {
  int64_t carry = 0;
  for (int g0 = 0; g0 < n_experts; g0 += kScanThreads) {
    const int g = g0 + static_cast<int>(threadIdx.x);
    int64_t upto = 0, total = 0;
    BoundsScan(temp).InclusiveSum(g < n_experts ? static_cast<int64_t>(counts[g]) : 0, upto, total);
    if (g < n_experts) offsets[g + 1] = carry + upto;
    carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) offsets[0] = 0;
}

// Assignment a (a thread each): row_of[a] = starts[idx[a]][a / kScanThreads] + rank[a]; token_of[row] = a / K.
__global__ void dispatch_kernel(const int32_t* idx, int64_t n, const int32_t* rank, const int64_t* starts,
                                int64_t chunks, int64_t k, int32_t* row_of, int32_t* token_of, int n_experts) {
  const int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (a >= n) return;
  const int32_t e = idx[a];
  if (e < 0 || e >= n_experts) return;
  const int64_t row = starts[e * chunks + a / kScanThreads] + rank[a];
  row_of[a] = static_cast<int32_t>(row);
  token_of[row] = static_cast<int32_t>(a / k);
}

// The same for few assignments (n ≤ kSmallDispatch), without the rank kernels before it: block a counts
// the assignments to idx[a] before a and those to lower experts itself, one pass over idx, and block 0
// counts every expert's (shared-memory integer atomics: exact) for the bounds.
constexpr int64_t kSmallDispatch = 2048;
__global__ void dispatch_small_kernel(const int32_t* idx, int64_t n, int64_t* offsets, int64_t k, int32_t* row_of,
                                      int32_t* token_of, int n_experts) {
  using Reduce = cub::BlockReduce<long long, kScanThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename BoundsScan::TempStorage scan;
  } temp;
  extern __shared__ int hist[];  // block 0's, n_experts of them
  const int64_t a = blockIdx.x;
  if (a == 0) {
    for (int g = threadIdx.x; g < n_experts; g += kScanThreads) hist[g] = 0;
    __syncthreads();
    for (int64_t b = threadIdx.x; b < n; b += kScanThreads) {
      const int32_t e = idx[b];
      if (e >= 0 && e < n_experts) atomicAdd(&hist[e], 1);
    }
    __syncthreads();
    write_bounds(hist, n_experts, offsets, temp.scan);
  }
  const int32_t e = idx[a];
  if (e < 0 || e >= n_experts) return;  // the whole block alike
  long long count = 0;  // (assignments to lower experts) << 32 | (those to e before a)
  for (int64_t b = threadIdx.x; b < n; b += kScanThreads) {
    const int32_t f = idx[b];
    count += (f >= 0 && f < e ? (1ll << 32) : 0) + (f == e && b < a ? 1 : 0);
  }
  count = Reduce(temp.reduce).Sum(count);
  if (threadIdx.x == 0) {
    const int64_t row = (count >> 32) + (count & 0xffffffffll);
    row_of[a] = static_cast<int32_t>(row);
    token_of[row] = static_cast<int32_t>(a / k);
  }
}

// out[r] = x[index[r]], a block a row.
template <typename T>
__global__ void gather_rows_kernel(const T* x, int64_t ldx, const int32_t* index, T* out, int64_t ldo, int64_t cols,
                                   bool vec16) {
  const int64_t r = blockIdx.x;
  copy_row(x + index[r] * ldx, out + r * ldo, cols, vec16);
}

// gather_rows_kernel for narrow rows (fewer columns than a warp): a thread an element.
template <typename T>
__global__ void gather_narrow_rows_kernel(const T* x, int64_t ldx, const int32_t* index, T* out, int64_t ldo,
                                          int64_t rows, int64_t cols) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t r = i / cols, c = i % cols;
  out[r * ldo + c] = x[index[r] * ldx + c];
}

// dx[m] += Σ_k dxs[row_of[m·K + k]] (k in order; dxs f32 or bf16, the sums f32); without accumulate
// the sums start from 0.
// kV (1 or 4) columns a thread at a time (4: rows, strides and pointers allow vector accesses).
template <typename TX, int kV>
__global__ void dispatch_backward_kernel(const TX* dxs, int64_t ldxs, const int32_t* row_of, int64_t k, float* dx,
                                         int64_t ldx, int64_t cols, bool accumulate) {
  const int64_t m = blockIdx.x;
  const int32_t* rows = row_of + m * k;
  for (int64_t c = kV * threadIdx.x; c < cols; c += kV * blockDim.x) {
    float acc[kV] = {};
    if (accumulate) loadv<kV>(dx + m * ldx + c, acc);
    for (int64_t j = 0; j < k; ++j) {
      float y[kV];
      loadv<kV>(dxs + rows[j] * ldxs + c, y);
#pragma unroll
      for (int e = 0; e < kV; ++e) acc[e] += y[e];
    }
    storev<kV>(dx + m * ldx + c, acc);
  }
}

// out[m] += Σ_k w[m, k] · ys[row_of[m·K + k]] (ys f32 or bf16), kV (1 or 4) columns a thread at a time
// (4: rows, strides and pointers allow vector accesses); each element's sum in the same order either way.
template <typename TY, int kV>
__global__ void combine_kernel(const TY* ys, int64_t ldy, const float* w, const int32_t* row_of, int64_t k,
                               float* out, int64_t ldo, int64_t cols) {
  const int64_t m = blockIdx.x;
  const int32_t* rows = row_of + m * k;
  const float* wm = w + m * k;
  for (int64_t c = kV * threadIdx.x; c < cols; c += kV * blockDim.x) {
    float acc[kV];
    loadv<kV>(out + m * ldo + c, acc);
    for (int64_t j = 0; j < k; ++j) {
      const float wj = wm[j];
      float y[kV];
      loadv<kV>(ys + rows[j] * ldy + c, y);
#pragma unroll
      for (int e = 0; e < kV; ++e) acc[e] += wj * y[e];
    }
    storev<kV>(out + m * ldo + c, acc);
  }
}

__device__ float block_sum256(float v) {
  __shared__ float part[8];
  __shared__ float total;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0;
    for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) t += part[i];
    total = t;
  }
  __syncthreads();
  return total;
}

// dys[row] = w · dout[m];  dweights[m, k] = dout[m] · ys[row] (ys f32 or bf16), kV (1 or 4) columns a
// thread at a time (4: rows, strides and pointers allow vector accesses).
template <typename T, typename TY, int kV>
__global__ void combine_backward_kernel(const float* dout, int64_t ldo, const TY* ys, int64_t ldy, const float* w,
                                        const int32_t* row_of, int64_t k, T* dys, int64_t lddy, float* dw,
                                        int64_t cols) {
  const int64_t m = blockIdx.x;
  const float* g = dout + m * ldo;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t row = row_of[m * k + j];
    const float wk = w[m * k + j];
    float dot = 0;
    for (int64_t c = kV * threadIdx.x; c < cols; c += kV * blockDim.x) {
      float gv[kV], yv[kV], d[kV];
      loadv<kV>(g + c, gv);
      loadv<kV>(ys + row * ldy + c, yv);
#pragma unroll
      for (int e = 0; e < kV; ++e) {
        d[e] = wk * gv[e];
        dot += gv[e] * yv[e];
      }
      storev<kV>(dys + row * lddy + c, d);
    }
    dot = block_sum256(dot);
    if (threadIdx.x == 0) dw[m * k + j] = dot;
  }
}

__device__ float block_max256(float v) {
  __shared__ float part[8];
  __shared__ float total;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = -INFINITY;
    for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) t = fmaxf(t, part[i]);
    total = t;
  }
  __syncthreads();
  return total;
}

// lp[m] = logits[m, target] - logsumexp(logits[m]) (one block per row), in one pass over the row: each
// thread keeps a running maximum and its sum of exponentials (rescaled when the maximum grows), then the
// threads' pairs combine. 4 logits a load where the rows allow (vec4).
__global__ void logprobs_forward_kernel(const float* logits, int64_t ld, int64_t v, const int32_t* targets, float* lp,
                                        float* lse, bool vec4) {
  const float* l = logits + blockIdx.x * ld;
  float mx = -INFINITY, sum = 0.0f;
  const auto take = [&](float x) {
    if (x > mx) {
      sum = sum * expf(mx - x) + 1.0f;
      mx = x;
    } else if (mx != -INFINITY) {  // (x and mx both -inf: nothing to add)
      sum += expf(x - mx);
    }
  };
  // Four at a time: the running max moves once for the four, their exponentials independent of each
  // other; two loads in flight a thread.
  const auto take4 = [&](float4 x) {
    const float m4 = fmaxf(fmaxf(x.x, x.y), fmaxf(x.z, x.w));
    if (m4 > mx) {
      sum = mx == -INFINITY ? 0.0f : sum * expf(mx - m4);
      mx = m4;
    }
    if (mx != -INFINITY) sum += (expf(x.x - mx) + expf(x.y - mx)) + (expf(x.z - mx) + expf(x.w - mx));
  };
  const int64_t body = vec4 ? v / 4 * 4 : 0, step = 4 * blockDim.x;
  int64_t j = 4 * threadIdx.x;
  for (; j + step < body; j += 2 * step) {
    const float4 x = *reinterpret_cast<const float4*>(l + j), y = *reinterpret_cast<const float4*>(l + j + step);
    take4(x);
    take4(y);
  }
  for (; j < body; j += step) take4(*reinterpret_cast<const float4*>(l + j));
  for (int64_t i = body + threadIdx.x; i < v; i += blockDim.x) take(l[i]);
  const float row_max = block_max256(mx);
  sum = block_sum256(mx == -INFINITY ? 0.0f : sum * expf(mx - row_max));
  if (threadIdx.x == 0) {
    const float ls = row_max + logf(sum);
    const int32_t t = targets[blockIdx.x];
    lse[blockIdx.x] = ls;
    lp[blockIdx.x] = t >= 0 && t < v ? l[t] - ls : NAN;
  }
}

// dlogits[m] = dlp[m] · (onehot(target) - softmax(logits[m])), written as T: -(g·p_j), and at the
// target -(g·p_t) + g (the CPU reference's f32 operations, in its order). kV (1 or 4) logits a thread
// at a time (4: rows, strides and pointers allow vector accesses).
template <typename T, int kV>
__global__ void logprobs_backward_kernel(const float* dlp, const float* logits, int64_t ldl, int64_t v,
                                         const int32_t* targets, const float* lse, T* dlogits, int64_t ldd) {
  const float g = dlp[blockIdx.x];
  T* d = dlogits + blockIdx.x * ldd;
  if (g == 0.0f) {
    const float zero[kV] = {};
    for (int64_t j = kV * threadIdx.x; j < v; j += kV * blockDim.x) storev<kV>(d + j, zero);
    return;
  }
  const float* l = logits + blockIdx.x * ldl;
  const float ls = lse[blockIdx.x];
  const int32_t t = targets[blockIdx.x];
  for (int64_t j = kV * threadIdx.x; j < v; j += kV * blockDim.x) {
    float x[kV];
    loadv<kV>(l + j, x);
#pragma unroll
    for (int e = 0; e < kV; ++e) {
      const float y = -(g * expf(x[e] - ls));
      x[e] = j + e == t ? y + g : y;
    }
    storev<kV>(d + j, x);
  }
}

// entropy[m] = lse[m] - Σ_j softmax_j · logits_j, argmax[m] the first index of the maximum (one block per row).
__global__ void logit_stats_kernel(const float* logits, int64_t ld, int64_t v, const float* lse, float* entropy,
                                   int32_t* argmax) {
  const float* l = logits + blockIdx.x * ld;
  const float ls = lse[blockIdx.x];
  float mean = 0, best = -INFINITY;
  int64_t at = v;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    const float x = l[j];
    mean += expf(x - ls) * x;
    if (x > best || at == v) best = x, at = j;  // strided ascending: the first maximum of this thread
  }
  __shared__ float best_of[256];
  __shared__ int64_t at_of[256];
  best_of[threadIdx.x] = best;
  at_of[threadIdx.x] = at;
  mean = block_sum256(mean);
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    __syncthreads();
    if (threadIdx.x < s) {
      const float b = best_of[threadIdx.x + s];
      const int64_t a = at_of[threadIdx.x + s];
      if (a < v && (b > best_of[threadIdx.x] || (b == best_of[threadIdx.x] && a < at_of[threadIdx.x]) ||
                    at_of[threadIdx.x] == v)) {
        best_of[threadIdx.x] = b;
        at_of[threadIdx.x] = a;
      }
    }
  }
  if (threadIdx.x == 0) {
    entropy[blockIdx.x] = ls - mean;
    argmax[blockIdx.x] = static_cast<int32_t>(at_of[0]);
  }
}

}  // namespace

void CudaBackend::route_into(const Tensor& logits, const Tensor& bias, const RouterConfig& cfg, Tensor& idx,
                             Tensor& weights, Tensor& scores, const Tensor* gate_up, Tensor* act) {
  const Rows L = rows_of(logits);
  check_device(logits, DType::kF32);
  check_device(idx, DType::kI32);
  check_device(weights, DType::kF32);
  check_device(scores, DType::kF32);
  if (bias.defined()) check_device(bias, DType::kF32);
  CHECK_EQ(L.cols, cfg.n_experts);
  CHECK(idx.is_contiguous() && weights.is_contiguous() && scores.is_contiguous());
  CHECK_EQ(cfg.n_experts % cfg.n_group, 0);
  CHECK_LE(cfg.n_group, 64) << "at most 64 expert groups";
  CHECK(cfg.top_k >= 1 && cfg.top_k <= cfg.n_experts);
  if (L.rows == 0) return;
  // With the shared experts' gate: the [g | u] rows read and the activation written too.
  const double gate_bytes =
      gate_up ? 1.0 * L.rows * act->size(1) * (8 + static_cast<double>(dtype_size(act->dtype()))) : 0.0;
  Op op(this, gate_up ? "moe_route_and_gate" : "moe_route", 0, 8.0 * L.rows * cfg.n_experts + gate_bytes);
  const size_t bytes = kRouteWarps * sizeof(float) * static_cast<size_t>(route_smem_floats(cfg));
  CUDA_CHECK(cudaFuncSetAttribute(route_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  SharedGate gate;
  if (gate_up != nullptr) {
    const Rows GU = rows_of(*gate_up), A = rows_of(*act);
    gate = SharedGate{GU.f(), GU.ld, A.p, A.ld, static_cast<int>(A.cols), act->dtype() == DType::kBF16};
  }
  route_kernel<<<blocks(L.rows, kRouteWarps), (gate_up != nullptr ? 2 : 1) * kRouteWarps * 32, bytes, stream()>>>(
      L.f(), L.ld, bias.defined() ? bias.f32() : nullptr, cfg, L.rows, idx.data<int32_t>(), weights.f32(),
      scores.f32(), gate);
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::moe_route(const Tensor& logits, const Tensor& bias, const RouterConfig& cfg, Tensor& idx,
                            Tensor& weights, Tensor& scores) {
  route_into(logits, bias, cfg, idx, weights, scores, nullptr, nullptr);
}

void CudaBackend::moe_route_and_gate(const Tensor& logits, const Tensor& bias, const RouterConfig& cfg, Tensor& idx,
                                     Tensor& weights, Tensor& scores, const Tensor& gate_up, Tensor& act) {
  const Rows GU = rows_of(gate_up), A = rows_of(act);
  const int64_t inter = A.cols;
  // f32 rows of [g | u] that float4 loads can take, into f32 or bf16: the fused kernel; else the two ops.
  const bool fused = gate_up.dtype() == DType::kF32 && (act.dtype() == DType::kF32 || act.dtype() == DType::kBF16) &&
                     GU.rows == logits.size(0) && A.rows == GU.rows && GU.cols == 2 * inter && inter % 4 == 0 &&
                     inter < (int64_t{1} << 30) && GU.ld % 4 == 0 && reinterpret_cast<uintptr_t>(GU.p) % 16 == 0;
  if (!fused) {
    Backend::moe_route_and_gate(logits, bias, cfg, idx, weights, scores, gate_up, act);
    return;
  }
  check_device(gate_up, DType::kF32);
  check_device(act, act.dtype());
  route_into(logits, bias, cfg, idx, weights, scores, &gate_up, &act);
}

void CudaBackend::moe_route_backward(const Tensor& dweights, const Tensor& scores, const Tensor& idx,
                                     const RouterConfig& cfg, Tensor& dlogits) {
  const Rows D = rows_of(dlogits);
  check_device(dweights, DType::kF32);
  check_device(scores, DType::kF32);
  check_device(idx, DType::kI32);
  check_device(dlogits, DType::kF32);
  CHECK_EQ(D.cols, cfg.n_experts);
  if (D.rows == 0) return;
  Op op(this, "moe_route_backward", 0, 8.0 * D.rows * cfg.n_experts);
  const size_t bytes = kRouteWarps * sizeof(double) * cfg.n_experts;
  CUDA_CHECK(cudaFuncSetAttribute(route_backward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)));
  route_backward_kernel<<<blocks(D.rows, kRouteWarps), kRouteWarps * 32, bytes, stream()>>>(
      dweights.f32(), scores.f32(), idx.data<int32_t>(), cfg, D.rows, D.f(), D.ld);
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::moe_dispatch(const Tensor& idx, int n_experts, Tensor& row_of, Tensor& token_of, Tensor& offsets) {
  check_device(idx, DType::kI32);
  check_device(row_of, DType::kI32);
  check_device(token_of, DType::kI32);
  CHECK(idx.dim() == 2 && idx.is_contiguous()) << "moe_dispatch: idx " << shape_str(idx.shape());
  const int64_t k = idx.size(1), n = idx.numel();
  CHECK(row_of.is_contiguous() && row_of.numel() == n) << "moe_dispatch: row_of " << shape_str(row_of.shape());
  CHECK(token_of.is_contiguous() && token_of.numel() == n) << "moe_dispatch: token_of " << shape_str(token_of.shape());
  CHECK_LT(n, int64_t{1} << 31) << "moe_dispatch: " << n << " assignments";
  if (n == 0) {
    offsets = zeros({n_experts + 1}, DType::kI64);
    return;
  }
  offsets = empty({n_experts + 1}, DType::kI64);
  Op op(this, "moe_dispatch", 0, 4.0 * 4 * n);
  if (n <= kSmallDispatch) {
    const size_t hist = sizeof(int) * static_cast<size_t>(n_experts);
    CHECK_LE(hist, 48u * 1024) << "moe_dispatch: " << n_experts << " experts";
    dispatch_small_kernel<<<static_cast<unsigned>(n), kScanThreads, hist, stream()>>>(
        idx.data<int32_t>(), n, offsets.data<int64_t>(), k, row_of.data<int32_t>(), token_of.data<int32_t>(),
        n_experts);
    CUDA_CHECK(cudaGetLastError());
    return;
  }
  // Ranks within chunks of assignments and each chunk's count a expert, then every (expert, chunk)'s
  // first row and the bounds (one scan), then each assignment's row.
  const int64_t chunks = (n + kScanThreads - 1) / kScanThreads;
  const size_t warp_counts = sizeof(int) * (kScanThreads / 32) * static_cast<size_t>(n_experts);
  CHECK_LE(warp_counts, 48u * 1024) << "moe_dispatch: " << n_experts << " experts";
  Tensor rank = empty({n}, DType::kI32), counts = empty({n_experts * chunks}, DType::kI32),
         starts = empty({n_experts * chunks}, DType::kI64);
  chunk_rank_kernel<<<static_cast<unsigned>(chunks), kScanThreads, warp_counts, stream()>>>(
      idx.data<int32_t>(), n, n_experts, rank.data<int32_t>(), counts.data<int32_t>());
  chunk_starts_kernel<<<1, kStartThreads, 0, stream()>>>(counts.data<int32_t>(), n_experts, chunks,
                                                         starts.data<int64_t>(), offsets.data<int64_t>());
  dispatch_kernel<<<static_cast<unsigned>(chunks), kScanThreads, 0, stream()>>>(
      idx.data<int32_t>(), n, rank.data<int32_t>(), starts.data<int64_t>(), chunks, k, row_of.data<int32_t>(),
      token_of.data<int32_t>(), n_experts);
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::gather_rows(const Tensor& x, const Tensor& index, Tensor& out) {
  CHECK(x.dtype() == out.dtype() && (x.dtype() == DType::kF32 || x.dtype() == DType::kBF16))
      << "gather_rows from " << dtype_name(x.dtype()) << " into " << dtype_name(out.dtype());
  check_device(x, x.dtype());
  check_device(out, out.dtype());
  check_device(index, DType::kI32);
  CHECK(index.is_contiguous()) << "gather_rows: index";
  const Rows X = rows_of(x), O = rows_of(out);
  CHECK_EQ(index.numel(), O.rows);
  CHECK_EQ(X.cols, O.cols);
  if (O.rows == 0) return;
  Op op(this, "gather_rows", 0, 2.0 * O.rows * O.cols * dtype_size(x.dtype()));
  const int64_t es = static_cast<int64_t>(dtype_size(x.dtype()));
  const bool vec16 = (X.cols * es) % 16 == 0 && (X.ld * es) % 16 == 0 && (O.ld * es) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(X.p) % 16 == 0 && reinterpret_cast<uintptr_t>(O.p) % 16 == 0;
  if (X.cols < 32) {  // narrow rows (a value or a few a row): a thread an element, not a block a row
    const unsigned grid = static_cast<unsigned>((O.rows * X.cols + 255) / 256);
    if (x.dtype() == DType::kBF16)
      gather_narrow_rows_kernel<<<grid, 256, 0, stream()>>>(static_cast<const __nv_bfloat16*>(X.p), X.ld,
                                                           index.data<int32_t>(), static_cast<__nv_bfloat16*>(O.p),
                                                           O.ld, O.rows, X.cols);
    else
      gather_narrow_rows_kernel<<<grid, 256, 0, stream()>>>(X.f(), X.ld, index.data<int32_t>(), O.f(), O.ld, O.rows,
                                                           X.cols);
  } else if (x.dtype() == DType::kBF16)
    gather_rows_kernel<<<static_cast<unsigned>(O.rows), kScanThreads, 0, stream()>>>(
        static_cast<const __nv_bfloat16*>(X.p), X.ld, index.data<int32_t>(), static_cast<__nv_bfloat16*>(O.p), O.ld,
        X.cols, vec16);
  else
    gather_rows_kernel<<<static_cast<unsigned>(O.rows), kScanThreads, 0, stream()>>>(
        X.f(), X.ld, index.data<int32_t>(), O.f(), O.ld, X.cols, vec16);
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::moe_dispatch_backward(const Tensor& dxs, const Tensor& row_of, Tensor& dx, bool accumulate) {
  const Rows DXS = rows_of(dxs), DX = rows_of(dx);
  check_device(row_of, DType::kI32);
  const int64_t k = row_of.numel() / std::max<int64_t>(1, DX.rows);
  if (DX.rows == 0) return;
  CHECK(dxs.dtype() == DType::kF32 || dxs.dtype() == DType::kBF16)
      << "moe_dispatch_backward of " << dtype_name(dxs.dtype());
  check_device(dx, DType::kF32);
  Op op(this, "moe_dispatch_backward", 0, (dtype_size(dxs.dtype()) * k + (accumulate ? 8.0 : 4.0)) * DX.rows * DX.cols);
  const auto launch = [&](auto* tx) {
    using TX = std::remove_pointer_t<decltype(tx)>;
    const auto* p = static_cast<const TX*>(DXS.p);
    const unsigned grid = static_cast<unsigned>(DX.rows);
    if (rows_by4(DXS.p, DX.cols, DXS.ld, sizeof(TX)) && rows_by4(DX.p, DX.cols, DX.ld, sizeof(float)))
      dispatch_backward_kernel<TX, 4><<<grid, 256, 0, stream()>>>(p, DXS.ld, row_of.data<int32_t>(), k, DX.f(), DX.ld,
                                                                  DX.cols, accumulate);
    else
      dispatch_backward_kernel<TX, 1><<<grid, 256, 0, stream()>>>(p, DXS.ld, row_of.data<int32_t>(), k, DX.f(), DX.ld,
                                                                  DX.cols, accumulate);
  };
  if (dxs.dtype() == DType::kBF16)
    launch(static_cast<__nv_bfloat16*>(nullptr));
  else
    launch(static_cast<float*>(nullptr));
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::moe_combine(const Tensor& ys, const Tensor& weights, const Tensor& row_of, Tensor& out) {
  const Rows Y = rows_of(ys), O = rows_of(out);
  check_device(weights, DType::kF32);
  check_device(row_of, DType::kI32);
  const int64_t k = weights.size(1);
  if (O.rows == 0) return;
  CHECK(ys.dtype() == DType::kF32 || ys.dtype() == DType::kBF16) << "moe_combine of " << dtype_name(ys.dtype());
  check_device(out, DType::kF32);
  Op op(this, "moe_combine", 2.0 * k * O.rows * O.cols, (dtype_size(ys.dtype()) * k + 8.0) * O.rows * O.cols);
  const unsigned grid = static_cast<unsigned>(O.rows);
  const auto launch = [&](auto* ty) {
    using TY = std::remove_pointer_t<decltype(ty)>;
    const auto* y = static_cast<const TY*>(Y.p);
    if (rows_by4(Y.p, O.cols, Y.ld, sizeof(TY)) && rows_by4(O.p, O.cols, O.ld, sizeof(float)))
      combine_kernel<TY, 4><<<grid, 256, 0, stream()>>>(y, Y.ld, weights.f32(), row_of.data<int32_t>(), k, O.f(), O.ld,
                                                        O.cols);
    else
      combine_kernel<TY, 1><<<grid, 256, 0, stream()>>>(y, Y.ld, weights.f32(), row_of.data<int32_t>(), k, O.f(), O.ld,
                                                        O.cols);
  };
  if (ys.dtype() == DType::kBF16)
    launch(static_cast<__nv_bfloat16*>(nullptr));
  else
    launch(static_cast<float*>(nullptr));
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::moe_combine_backward(const Tensor& dout, const Tensor& ys, const Tensor& weights,
                                       const Tensor& row_of, Tensor& dys, Tensor& dweights) {
  const Rows G = rows_of(dout), Y = rows_of(ys), DY = rows_of(dys);
  check_device(dout, DType::kF32);
  CHECK(ys.dtype() == DType::kF32 || ys.dtype() == DType::kBF16) << "ys of dtype " << dtype_name(ys.dtype());
  check_device(weights, DType::kF32);
  check_device(dweights, DType::kF32);
  check_device(row_of, DType::kI32);
  CHECK(dys.dtype() == DType::kF32 || dys.dtype() == DType::kBF16) << "dys of dtype " << dtype_name(dys.dtype());
  const int64_t k = weights.size(1);
  if (G.rows == 0) return;
  // dout read once (its k passes hit the cache), ys read and dys written once a pick.
  Op op(this, "moe_combine_backward", 4.0 * k * G.rows * G.cols,
        1.0 * (dtype_size(ys.dtype()) + dtype_size(dys.dtype())) * k * G.rows * G.cols + 4.0 * G.rows * G.cols);
  const unsigned grid = static_cast<unsigned>(G.rows);
  const auto launch = [&](auto* ty, auto* td) {
    using TY = std::remove_pointer_t<decltype(ty)>;
    using T = std::remove_pointer_t<decltype(td)>;
    const bool by4 = rows_by4(G.p, G.cols, G.ld, sizeof(float)) && rows_by4(Y.p, G.cols, Y.ld, sizeof(TY)) &&
                     rows_by4(DY.p, G.cols, DY.ld, sizeof(T));
    const auto kernel = by4 ? combine_backward_kernel<T, TY, 4> : combine_backward_kernel<T, TY, 1>;
    kernel<<<grid, 256, 0, stream()>>>(G.f(), G.ld, static_cast<const TY*>(Y.p), Y.ld, weights.f32(),
                                       row_of.data<int32_t>(), k, static_cast<T*>(DY.p), DY.ld, dweights.f32(),
                                       G.cols);
  };
  const auto with_dys = [&](auto* ty) {
    if (dys.dtype() == DType::kBF16)
      launch(ty, static_cast<__nv_bfloat16*>(nullptr));
    else
      launch(ty, static_cast<float*>(nullptr));
  };
  if (ys.dtype() == DType::kBF16)
    with_dys(static_cast<__nv_bfloat16*>(nullptr));
  else
    with_dys(static_cast<float*>(nullptr));
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::logprobs_forward(const Tensor& logits, const Tensor& targets, Tensor& lp, Tensor& lse) {
  const Rows L = rows_of(logits);
  check_device(targets, DType::kI32);
  check_device(lp, DType::kF32);
  check_device(lse, DType::kF32);
  CHECK(targets.numel() == L.rows && lp.numel() == L.rows && lse.numel() == L.rows);
  if (L.rows == 0) return;
  Op op(this, "logprobs", 3.0 * L.rows * L.cols, 4.0 * L.rows * L.cols);
  const bool vec4 = L.ld % 4 == 0 && reinterpret_cast<uintptr_t>(L.p) % 16 == 0;
  logprobs_forward_kernel<<<static_cast<unsigned>(L.rows), 256, 0, stream()>>>(
      L.f(), L.ld, L.cols, targets.data<int32_t>(), lp.f32(), lse.f32(), vec4);
  CUDA_CHECK(cudaGetLastError());
}

namespace {

__global__ void clipped_ratio_grad_kernel(const float* lp, const float4* rows, ClippedRatioLoss loss, float* dlp,
                                          int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float4 r = rows[i];
  dlp[i] = static_cast<float>(clipped_ratio_token_grad(lp[i], r.x, r.y, r.z, r.w, loss));
}

}  // namespace

void CudaBackend::clipped_ratio_grad(const Tensor& lp, const Tensor& rows, const ClippedRatioLoss& loss, Tensor& dlp) {
  const int64_t n = lp.numel();
  check_device(lp, DType::kF32);
  check_device(dlp, DType::kF32);
  check_device(rows, DType::kF32);
  CHECK(lp.is_contiguous() && dlp.is_contiguous() && dlp.numel() == n) << "clipped_ratio_grad: lp and dlp [N] f32";
  CHECK(rows.is_contiguous() && rows.shape() == Shape({n, 4}) && reinterpret_cast<uintptr_t>(rows.raw()) % 16 == 0)
      << "clipped_ratio_grad: rows " << shape_str(rows.shape()) << " for " << n << " tokens";
  if (n == 0) return;
  Op op(this, "clipped_ratio_grad", 10.0 * n, 24.0 * n);
  clipped_ratio_grad_kernel<<<blocks(n, 256), 256, 0, stream()>>>(lp.f32(), static_cast<const float4*>(rows.raw()),
                                                                    loss, dlp.f32(), n);
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::logprobs_backward(const Tensor& dlp, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                                    Tensor& dlogits) {
  const Rows L = rows_of(logits), D = rows_of(dlogits);
  check_device(logits, DType::kF32);
  check_device(dlp, DType::kF32);
  check_device(targets, DType::kI32);
  check_device(lse, DType::kF32);
  CHECK(dlogits.dtype() == DType::kF32 || dlogits.dtype() == DType::kBF16)
      << "dlogits of dtype " << dtype_name(dlogits.dtype());
  CHECK(L.rows == D.rows && L.cols == D.cols);
  if (L.rows == 0) return;
  Op op(this, "logprobs_backward", 3.0 * L.rows * L.cols, (4.0 + dtype_size(dlogits.dtype())) * L.rows * L.cols);
  const unsigned grid = static_cast<unsigned>(L.rows);
  const auto launch = [&](auto* td) {
    using T = std::remove_pointer_t<decltype(td)>;
    const bool by4 = rows_by4(L.p, L.cols, L.ld, sizeof(float)) && rows_by4(D.p, L.cols, D.ld, sizeof(T));
    const auto kernel = by4 ? logprobs_backward_kernel<T, 4> : logprobs_backward_kernel<T, 1>;
    kernel<<<grid, 256, 0, stream()>>>(dlp.f32(), L.f(), L.ld, L.cols, targets.data<int32_t>(), lse.f32(),
                                       static_cast<T*>(D.p), D.ld);
  };
  if (dlogits.dtype() == DType::kBF16)
    launch(static_cast<__nv_bfloat16*>(nullptr));
  else
    launch(static_cast<float*>(nullptr));
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::logit_stats(const Tensor& logits, const Tensor& lse, Tensor& entropy, Tensor& argmax) {
  const Rows L = rows_of(logits);
  check_device(lse, DType::kF32);
  check_device(entropy, DType::kF32);
  check_device(argmax, DType::kI32);
  CHECK(lse.numel() == L.rows && entropy.numel() == L.rows && argmax.numel() == L.rows);
  CHECK(lse.is_contiguous() && entropy.is_contiguous() && argmax.is_contiguous());
  if (L.rows == 0) return;
  Op op(this, "logit_stats", 4.0 * L.rows * L.cols, 4.0 * L.rows * L.cols);
  logit_stats_kernel<<<static_cast<unsigned>(L.rows), 256, 0, stream()>>>(L.f(), L.ld, L.cols, lse.f32(),
                                                                          entropy.f32(), argmax.data<int32_t>());
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace r1lab::core::cuda
