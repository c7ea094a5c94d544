// Causal softmax attention of the CUDA backend in the flash-attention manner: tiles of keys and values
// pass through shared memory, the softmax is computed online (running max and sum), and no T×S matrix
// is ever stored; backward recomputes the probabilities from the saved log-sum-exp. fp32 on CUDA cores.
// Also the decode/prefill attention in MLA's latent space over the paged cache.
//
// Work split: a block of kWarps warps owns kWarps·kRows consecutive queries (forward, dq) or keys
// (dk/dv); a warp owns kRows of them; lane j of a warp owns key (or query) j of the current 32-row tile
// for scores, and output dimensions lane, lane+32, ... for the accumulators. No atomics: every output
// element is written by one thread, so results are bitwise repeatable.
#include <cfloat>

#include <cuda_fp8.h>

#include "core/cuda/cuda_backend.h"
#include "core/latent_rows.h"

namespace r1lab::core::cuda {

struct AttnDims {
  int64_t T, S, Hq, Hk, D, Dv;
  int64_t q0, q1, q2, k0, k1, k2, v0, v1, v2, o0, o1, o2;  // strides of dims 0..2 (dim 3 contiguous)
  int64_t g0, g1, g2;                                      // dout (backward)
  // Keys in two parts (the tensor-core kernels): each row's first kd columns from k, the rest from the
  // tail (strides kt0..kt2); kd = D where they come whole. The kernels take kd as a template parameter.
  int64_t kt0, kt1, kt2;
  int kd;
  float scale;
};

}  // namespace r1lab::core::cuda

#include "core/cuda/attention_tc.cuh"
#include "core/cuda/attention_wg.cuh"

namespace r1lab::core::cuda {
namespace {

using Dims = AttnDims;
constexpr int kWarps = 8;
constexpr int kRows = 4;   // queries (or keys) per warp
constexpr int kTile = 32;  // keys (or queries) per shared-memory tile
constexpr int kMaxDU = 8;  // head dim ≤ 256
constexpr int kMaxVU = 4;  // value dim ≤ 128
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// dst[r][c] = src[(r0 + r)·ld + c] for r < rows, c < width (dst rows ld_dst apart); 0 where r0 + r ≥ limit.
// The staging of every tile of the fp32 kernels (the block's threads share the work).
__device__ __forceinline__ void load_rows(float* dst, int ld_dst, const float* src, int64_t ld, int64_t r0,
                                          int64_t limit, int rows, int width) {
  for (int i = threadIdx.x; i < rows * width; i += blockDim.x) {
    const int r = i / width, c = i % width;
    dst[r * ld_dst + c] = r0 + r < limit ? src[(r0 + r) * ld + c] : 0.0f;
  }
}

// out[t] = Σ_s softmax_s(scale·q[t]·k[s]) v[s];  lse[t] = log Σ_s exp(scale·q[t]·k[s]).
// grid (ceil(T / 32), B·Hq).
__global__ void __launch_bounds__(kWarps * 32)
    attention_forward_kernel(const float* q, const float* k, const float* v, float* out, float* lse, Dims a) {
  extern __shared__ float sm[];
  const int D = static_cast<int>(a.D), Dv = static_cast<int>(a.Dv), ldk = D + 1, ldv = Dv + 1;
  float* Ks = sm;                // [kTile][D + 1]
  float* Vs = Ks + kTile * ldk;  // [kTile][Dv + 1]
  float* Qs = Vs + kTile * ldv;  // [kWarps·kRows][D]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y / a.Hq, h = blockIdx.y % a.Hq, kh = h / (a.Hq / a.Hk);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kWarps * kRows, off = a.S - a.T;
  load_rows(Qs, D, q + b * a.q0 + h * a.q2, a.q1, t0, a.T, kWarps * kRows, D);
  float m[kRows], l[kRows], acc[kRows][kMaxVU];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0;
#pragma unroll
    for (int u = 0; u < kMaxVU; ++u) acc[r][u] = 0;
  }
  const int64_t last = min(a.S - 1, off + min(a.T - 1, t0 + kWarps * kRows - 1));
  const float* kb = k + b * a.k0 + kh * a.k2;
  const float* vb = v + b * a.v0 + kh * a.v2;
  for (int64_t s0 = 0; s0 <= last; s0 += kTile) {
    __syncthreads();
    load_rows(Ks, ldk, kb, a.k1, s0, a.S, kTile, D);
    load_rows(Vs, ldv, vb, a.v1, s0, a.S, kTile, Dv);
    __syncthreads();
    const int64_t s = s0 + lane;
    float sc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) sc[r] = 0;
    const float* kr = Ks + lane * ldk;
    const float* qw = Qs + warp * kRows * D;
    for (int c = 0; c < D; ++c) {
      const float kc = kr[c];
#pragma unroll
      for (int r = 0; r < kRows; ++r) sc[r] += qw[r * D + c] * kc;
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t t = t0 + warp * kRows + r;
      const bool visible = t < a.T && s <= off + t;
      const float x = visible ? sc[r] * a.scale : -INFINITY;
      const float mn = fmaxf(m[r], warp_max(x));
      if (mn == -INFINITY) {
        sc[r] = 0;
        continue;
      }
      const float p = visible ? expf(x - mn) : 0.0f;
      const float alpha = expf(m[r] - mn);
      l[r] = l[r] * alpha + warp_sum(p);
#pragma unroll
      for (int u = 0; u < kMaxVU; ++u) acc[r][u] *= alpha;
      m[r] = mn;
      sc[r] = p;
    }
    for (int j = 0; j < kTile; ++j) {
      float pj[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) pj[r] = __shfl_sync(kFull, sc[r], j);
#pragma unroll
      for (int u = 0; u < kMaxVU; ++u) {
        const int c = lane + 32 * u;
        if (c < Dv) {
          const float vv = Vs[j * ldv + c];
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[r][u] += pj[r] * vv;
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t t = t0 + warp * kRows + r;
    if (t >= a.T) continue;
    const float inv = l[r] > 0 ? 1.0f / l[r] : 0.0f;
    float* o = out + b * a.o0 + t * a.o1 + h * a.o2;
#pragma unroll
    for (int u = 0; u < kMaxVU; ++u) {
      const int c = lane + 32 * u;
      if (c < Dv) o[c] = acc[r][u] * inv;
    }
    if (lane == 0) lse[(b * a.Hq + h) * a.T + t] = m[r] + logf(l[r]);
  }
}

// delta[b, h, t] = dout[t] · out[t] (one warp per row); with gb, dout also rounded to bf16 there
// (strides gb0..gb2: the tensor-core kernels' operand) in the same pass.
template <typename TO>
__global__ void attention_delta_kernel(const float* dout, const TO* out, float* delta, Dims a, int64_t rows,
                                       tc::bf16* gb, int64_t gb0, int64_t gb1, int64_t gb2) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t t = row % a.T, h = (row / a.T) % a.Hq, b = row / (a.T * a.Hq);
  const float* g = dout + b * a.g0 + t * a.g1 + h * a.g2;
  const TO* o = out + b * a.o0 + t * a.o1 + h * a.o2;
  tc::bf16* gr = gb != nullptr ? gb + b * gb0 + t * gb1 + h * gb2 : nullptr;
  float s = 0;
  for (int c = lane; c < a.Dv; c += 32) {
    const float gc = g[c];
    s += gc * static_cast<float>(o[c]);
    if (gr != nullptr) gr[c] = __float2bfloat16_rn(gc);
  }
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
}

// dq[t] += scale · Σ_s p[t,s] (dout[t]·v[s] - delta[t]) k[s]. grid (ceil(T / 32), B·Hq).
__global__ void __launch_bounds__(kWarps * 32)
    attention_dq_kernel(const float* q, const float* k, const float* v, const float* dout, const float* lse,
                        const float* delta, float* dq, int64_t dq0, int64_t dq1, int64_t dq2, bool accumulate,
                        Dims a) {
  extern __shared__ float sm[];
  const int D = static_cast<int>(a.D), Dv = static_cast<int>(a.Dv), ldk = D + 1, ldv = Dv + 1;
  float* Ks = sm;                       // [kTile][D + 1]
  float* Vs = Ks + kTile * ldk;         // [kTile][Dv + 1]
  float* Qs = Vs + kTile * ldv;         // [kWarps·kRows][D]
  float* Gs = Qs + kWarps * kRows * D;  // [kWarps·kRows][Dv]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y / a.Hq, h = blockIdx.y % a.Hq, kh = h / (a.Hq / a.Hk);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kWarps * kRows, off = a.S - a.T;
  load_rows(Qs, D, q + b * a.q0 + h * a.q2, a.q1, t0, a.T, kWarps * kRows, D);
  load_rows(Gs, Dv, dout + b * a.g0 + h * a.g2, a.g1, t0, a.T, kWarps * kRows, Dv);
  float L[kRows], Dl[kRows], acc[kRows][kMaxDU];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t t = t0 + warp * kRows + r;
    L[r] = t < a.T ? lse[(b * a.Hq + h) * a.T + t] : 0.0f;
    Dl[r] = t < a.T ? delta[(b * a.Hq + h) * a.T + t] : 0.0f;
#pragma unroll
    for (int u = 0; u < kMaxDU; ++u) acc[r][u] = 0;
  }
  const int64_t last = min(a.S - 1, off + min(a.T - 1, t0 + kWarps * kRows - 1));
  const float* kb = k + b * a.k0 + kh * a.k2;
  const float* vb = v + b * a.v0 + kh * a.v2;
  for (int64_t s0 = 0; s0 <= last; s0 += kTile) {
    __syncthreads();
    load_rows(Ks, ldk, kb, a.k1, s0, a.S, kTile, D);
    load_rows(Vs, ldv, vb, a.v1, s0, a.S, kTile, Dv);
    __syncthreads();
    const int64_t s = s0 + lane;
    float sc[kRows], dp[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) sc[r] = dp[r] = 0;
    const float* qw = Qs + warp * kRows * D;
    const float* gw = Gs + warp * kRows * Dv;
    for (int c = 0; c < D; ++c) {
      const float kc = Ks[lane * ldk + c];
#pragma unroll
      for (int r = 0; r < kRows; ++r) sc[r] += qw[r * D + c] * kc;
    }
    for (int c = 0; c < Dv; ++c) {
      const float vc = Vs[lane * ldv + c];
#pragma unroll
      for (int r = 0; r < kRows; ++r) dp[r] += gw[r * Dv + c] * vc;
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t t = t0 + warp * kRows + r;
      const bool visible = t < a.T && s <= off + t;
      const float p = visible ? expf(sc[r] * a.scale - L[r]) : 0.0f;
      sc[r] = p * (dp[r] - Dl[r]) * a.scale;  // ds
    }
    for (int j = 0; j < kTile; ++j) {
      float dsj[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) dsj[r] = __shfl_sync(kFull, sc[r], j);
#pragma unroll
      for (int u = 0; u < kMaxDU; ++u) {
        const int c = lane + 32 * u;
        if (c < D) {
          const float kc = Ks[j * ldk + c];
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[r][u] += dsj[r] * kc;
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t t = t0 + warp * kRows + r;
    if (t >= a.T) continue;
    float* o = dq + b * dq0 + t * dq1 + h * dq2;
#pragma unroll
    for (int u = 0; u < kMaxDU; ++u) {
      const int c = lane + 32 * u;
      if (c < D) o[c] = accumulate ? o[c] + acc[r][u] : acc[r][u];
    }
  }
}

// dv[s] += Σ_t p[t,s] dout[t];  dk[s] += scale · Σ_t p[t,s] (dout[t]·v[s] - delta[t]) q[t], over every
// query head of kv head kh. grid (ceil(S / 32), B·Hk).
__global__ void __launch_bounds__(kWarps * 32)
    attention_dkdv_kernel(const float* q, const float* k, const float* v, const float* dout, const float* lse,
                          const float* delta, float* dk, int64_t dk0, int64_t dk1, int64_t dk2, float* dv, int64_t dv0,
                          int64_t dv1, int64_t dv2, bool accumulate, Dims a) {
  extern __shared__ float sm[];
  const int D = static_cast<int>(a.D), Dv = static_cast<int>(a.Dv), ldq = D + 1, ldg = Dv + 1;
  float* Kown = sm;                         // [kWarps·kRows][D]
  float* Vown = Kown + kWarps * kRows * D;  // [kWarps·kRows][Dv]
  float* Qt = Vown + kWarps * kRows * Dv;   // [kTile][D + 1]
  float* Gt = Qt + kTile * ldq;             // [kTile][Dv + 1]
  float* Lt = Gt + kTile * ldg;             // [kTile]
  float* Dt = Lt + kTile;                   // [kTile]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y / a.Hk, kh = blockIdx.y % a.Hk, group = a.Hq / a.Hk;
  const int64_t s_first = static_cast<int64_t>(blockIdx.x) * kWarps * kRows, off = a.S - a.T;
  load_rows(Kown, D, k + b * a.k0 + kh * a.k2, a.k1, s_first, a.S, kWarps * kRows, D);
  load_rows(Vown, Dv, v + b * a.v0 + kh * a.v2, a.v1, s_first, a.S, kWarps * kRows, Dv);
  float gk[kRows][kMaxDU], gv[kRows][kMaxVU];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int u = 0; u < kMaxDU; ++u) gk[r][u] = 0;
#pragma unroll
    for (int u = 0; u < kMaxVU; ++u) gv[r][u] = 0;
  }
  // The first query that sees key s_first sits at t = s_first - off.
  const int64_t t_begin = (s_first > off ? s_first - off : 0) / kTile * kTile;
  const float* kw = Kown + warp * kRows * D;
  const float* vw = Vown + warp * kRows * Dv;
  for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
    for (int64_t t0 = t_begin; t0 < a.T; t0 += kTile) {
      __syncthreads();
      load_rows(Qt, ldq, q + b * a.q0 + h * a.q2, a.q1, t0, a.T, kTile, D);
      load_rows(Gt, ldg, dout + b * a.g0 + h * a.g2, a.g1, t0, a.T, kTile, Dv);
      if (threadIdx.x < kTile) {
        const int64_t t = t0 + threadIdx.x;
        Lt[threadIdx.x] = t < a.T ? lse[(b * a.Hq + h) * a.T + t] : 0.0f;
        Dt[threadIdx.x] = t < a.T ? delta[(b * a.Hq + h) * a.T + t] : 0.0f;
      }
      __syncthreads();
      const int64_t t = t0 + lane;
      float sc[kRows], dp[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) sc[r] = dp[r] = 0;
      for (int c = 0; c < D; ++c) {
        const float qc = Qt[lane * ldq + c];
#pragma unroll
        for (int r = 0; r < kRows; ++r) sc[r] += kw[r * D + c] * qc;
      }
      for (int c = 0; c < Dv; ++c) {
        const float gc = Gt[lane * ldg + c];
#pragma unroll
        for (int r = 0; r < kRows; ++r) dp[r] += vw[r * Dv + c] * gc;
      }
      float p[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int64_t s = s_first + warp * kRows + r;
        const bool visible = t < a.T && s < a.S && s <= off + t;
        p[r] = visible ? expf(sc[r] * a.scale - Lt[lane]) : 0.0f;
        sc[r] = p[r] * (dp[r] - Dt[lane]) * a.scale;  // ds
      }
      for (int j = 0; j < kTile; ++j) {
        float pj[kRows], dsj[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          pj[r] = __shfl_sync(kFull, p[r], j);
          dsj[r] = __shfl_sync(kFull, sc[r], j);
        }
#pragma unroll
        for (int u = 0; u < kMaxVU; ++u) {
          const int c = lane + 32 * u;
          if (c < Dv) {
            const float gc = Gt[j * ldg + c];
#pragma unroll
            for (int r = 0; r < kRows; ++r) gv[r][u] += pj[r] * gc;
          }
        }
#pragma unroll
        for (int u = 0; u < kMaxDU; ++u) {
          const int c = lane + 32 * u;
          if (c < D) {
            const float qc = Qt[j * ldq + c];
#pragma unroll
            for (int r = 0; r < kRows; ++r) gk[r][u] += dsj[r] * qc;
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t s = s_first + warp * kRows + r;
    if (s >= a.S) continue;
    float* ok = dk + b * dk0 + s * dk1 + kh * dk2;
    float* ov = dv + b * dv0 + s * dv1 + kh * dv2;
#pragma unroll
    for (int u = 0; u < kMaxDU; ++u) {
      const int c = lane + 32 * u;
      if (c < D) ok[c] = accumulate ? ok[c] + gk[r][u] : gk[r][u];
    }
#pragma unroll
    for (int u = 0; u < kMaxVU; ++u) {
      const int c = lane + 32 * u;
      if (c < Dv) ov[c] = accumulate ? ov[c] + gv[r][u] : gv[r][u];
    }
  }
}

// ---- MLA latent attention over the paged cache. grid (N, ceil(H / kWarps), splits); a warp per head,
// the block's heads share each tile of latent rows in shared memory (a row is read once per block).
// Tiles come in by cp.async into two buffers, so the next tile's loads are in flight while the warps
// score the current one; kU (32-lane units of a latent row) sizes the registers to the model's rows.
// With splits > 1 (few query rows: decode), block z takes positions [z·split_len, (z+1)·split_len) and
// leaves its running max, sum and unnormalised output in part_ml [N, H, splits, 2] and part_acc
// [N, H, splits, dv]; paged_combine_kernel merges them (flash-decoding), so that a few long sequences
// still fill the GPU.
constexpr int kPagedTile = 16;
constexpr int kMaxLatentU = 20;  // latent row ≤ 640

// The sequence of query row i: the s with starts[s] <= i < starts[s + 1] (empty sequences never hold
// one). Row i is sequence i in a decode step, which one look confirms; otherwise a binary search.
__device__ __forceinline__ int32_t seq_of_row(const int32_t* starts, int64_t n_seq, int64_t i) {
  const int64_t guess = min(i, n_seq - 1);
  if (starts[guess] <= i && i < starts[guess + 1]) return static_cast<int32_t>(guess);
  int64_t lo = 0, hi = n_seq - 1;  // the last s with starts[s] <= i
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (starts[mid] <= i)
      lo = mid;
    else
      hi = mid - 1;
  }
  return static_cast<int32_t>(lo);
}

template <int kU>
__global__ void __launch_bounds__(kWarps * 32)
    paged_latent_kernel(const float* q, int64_t qs0, int64_t qs1, const float* pool, int64_t ldp, int64_t pool_rows,
                        int block_size, const int32_t* tables, int64_t max_blocks, int64_t n_seq,
                        const int32_t* starts, const int32_t* ctx, float* out, int64_t os0, int64_t os1, int64_t heads,
                        int D, int dv, float scale, int64_t split_len, float* part_ml, float* part_acc) {
  extern __shared__ float sm[];  // two tiles [kPagedTile][D]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = blockIdx.x, h = static_cast<int64_t>(blockIdx.y) * kWarps + warp;
  const int32_t s = seq_of_row(starts, n_seq, i);
  const int64_t last = ctx[s] - (starts[s + 1] - starts[s]) + (i - starts[s]);  // own position
  float qr[kU], acc[kU];
  const float* qh = q + i * qs0 + min(h, heads - 1) * qs1;
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const int c = lane + 32 * u;
    qr[u] = c < D ? qh[c] : 0.0f;
    acc[u] = 0;
  }
  float m = -INFINITY, l = 0;
  const int64_t z = blockIdx.z, splits = gridDim.z;
  const int64_t begin = z * split_len, end = splits == 1 ? last : min(last, begin + split_len - 1);
  // A warp a row: its block-table entry once, then the row's D floats (zeros past the end).
  const auto load = [&](float* rows, int64_t p0) {
    for (int j = warp; j < kPagedTile; j += kWarps) {
      const int64_t pos = p0 + j;
      const float* src = pool;
      bool valid = false;
      if (pos <= end) {
        const int64_t blk = tables[s * max_blocks + pos / block_size];
        const int64_t row = blk * block_size + pos % block_size;
        if (blk >= 0 && row < pool_rows) src = pool + row * ldp, valid = true;
      }
      for (int c = lane; c < D; c += 32) tc::cp_async4(rows + j * D + c, valid ? src + c : pool, valid);
    }
    tc::cp_async_commit();
  };
  if (begin <= end) load(sm, begin);
  int buf = 0;
  for (int64_t p0 = begin; p0 <= end; p0 += kPagedTile, buf ^= 1) {
    if (p0 + kPagedTile <= end) {
      load(sm + (buf ^ 1) * kPagedTile * D, p0 + kPagedTile);
      tc::cp_async_wait<1>();
    } else {
      tc::cp_async_wait<0>();
    }
    __syncthreads();
    const float* rows = sm + buf * kPagedTile * D;
    if (h < heads) {
      const int n = static_cast<int>(end - p0 + 1 < kPagedTile ? end - p0 + 1 : kPagedTile);
      // The tile's kPagedTile scores side by side (independent sums, reduced across the warp together),
      // then one online-softmax update for the tile.
      float x[kPagedTile];
#pragma unroll
      for (int j = 0; j < kPagedTile; ++j) {
        const float* r = rows + j * D;
        float part = 0;
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int c = lane + 32 * u;
          if (c < D) part += qr[u] * r[c];
        }
        x[j] = part;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1)
#pragma unroll
        for (int j = 0; j < kPagedTile; ++j) x[j] += __shfl_xor_sync(0xffffffffu, x[j], o);
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kPagedTile; ++j) {
        x[j] = j < n ? x[j] * scale : -INFINITY;
        tile_max = fmaxf(tile_max, x[j]);
      }
      const float mn = fmaxf(m, tile_max);
      const float alpha = expf(m - mn);
      l *= alpha;
#pragma unroll
      for (int u = 0; u < kU; ++u) acc[u] *= alpha;
#pragma unroll
      for (int j = 0; j < kPagedTile; ++j) {
        if (j >= n) break;
        const float p = expf(x[j] - mn);
        l += p;
        const float* r = rows + j * D;
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int c = lane + 32 * u;
          if (c < dv) acc[u] += p * r[c];
        }
      }
      m = mn;
    }
    __syncthreads();  // every warp is done with this buffer before it is loaded again
  }
  if (h >= heads) return;
  if (splits > 1) {
    const int64_t slot = (i * heads + h) * splits + z;
    if (lane == 0) part_ml[2 * slot] = m, part_ml[2 * slot + 1] = l;
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int c = lane + 32 * u;
      if (c < dv) part_acc[slot * dv + c] = acc[u];
    }
    return;
  }
  float* o = out + i * os0 + h * os1;
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const int c = lane + 32 * u;
    if (c < dv) o[c] = acc[u] / l;
  }
}

__device__ __forceinline__ void put(float* p, float v) { *p = v; }
__device__ __forceinline__ void put(tc::bf16* p, float v) { *p = __float2bfloat16(v); }
// Two adjacent values at p (aligned to both).
__device__ __forceinline__ void put2(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
__device__ __forceinline__ void put2(tc::bf16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// out[i, h] = Σ_z acc_z · e^(m_z - M) / Σ_z l_z · e^(m_z - M), M = max_z m_z (splits without positions
// carry m = -inf, l = 0); out f32 or bf16. grid (N, H), 128 threads.
template <typename TO>
__global__ void paged_combine_kernel(const float* part_ml, const float* part_acc, int64_t splits, int dv, TO* out,
                                     int64_t os0, int64_t os1, int64_t heads) {
  const int64_t i = blockIdx.x, h = blockIdx.y, base = (i * heads + h) * splits;
  float mx = -INFINITY;
  for (int64_t z = 0; z < splits; ++z) mx = fmaxf(mx, part_ml[2 * (base + z)]);
  float l = 0;
  for (int64_t z = 0; z < splits; ++z) {
    const float mz = part_ml[2 * (base + z)];
    if (mz != -INFINITY) l += part_ml[2 * (base + z) + 1] * expf(mz - mx);
  }
  for (int c = threadIdx.x; c < dv; c += blockDim.x) {
    float o = 0;
    for (int64_t z = 0; z < splits; ++z) {
      const float mz = part_ml[2 * (base + z)];
      if (mz != -INFINITY) o += part_acc[(base + z) * dv + c] * expf(mz - mx);
    }
    put(out + i * os0 + h * os1 + c, o / l);
  }
}

// ---- MLA decode on tensor cores over a bf16 latent cache, in FlashMLA's shape with mma.sync: a block
// takes one query row and 16 heads (the m16 of the mma), so every latent row it reads serves all of
// them, and positions [z·split_len, (z+1)·split_len) of its sequence (splits as above, merged by
// paged_combine_kernel). Tiles of kLatTile positions arrive by cp.async into two buffers. Per tile the
// 8 warps score 8 positions each (S = Q·Kᵀ over the whole latent row, two chains of products), share
// the tile's row maxima and sums through shared memory, write the softmax weights P in bf16, and then
// each warp adds P·V for its eighth of the dv columns (V is the first dv columns of the same rows).
// Eight warps rather than four: with two blocks an SM (the tiles' shared memory) the kernel waits on
// instruction latencies, and twice the warps hide them. Scores are kept in log2 units
// (exp2); maxima leave in natural units for the combine. q and P are rounded to bf16, as the training
// attention rounds K and V; sums and accumulators stay f32.
// kFp8: fp8 rows (core/latent_rows.h, Fp8LatentRow{dv, D - dv}) arrive as they lie into two staging
// buffers, and each tile is widened into one bf16 tile before its products: the stored values times
// their power-of-two scales, exact in bf16, so attention over fp8 rows is the same kernel over their
// dequantised values, reading 0.58 of a bf16 row's bytes (r 256, rope 32).
// On Hopper (sm_90a) each latent row comes as one bulk copy (cp.async.bulk, a lane a row) completing on
// its buffer's barrier, in place of 16-byte cp.async pieces from every lane; rows past the end are
// zeroed by their lane (only a sequence's last tile has them).
constexpr int kLatTile = 64, kLatWarps = 8, kLatHeads = 16;

// The shared memory of paged_latent_tc_kernel for rows of D values (row_bytes each where kFp8).
constexpr size_t paged_tc_smem(int64_t D, bool fp8, int64_t row_bytes) {
  return sizeof(tc::bf16) * ((kLatHeads + (fp8 ? 1 : 2) * kLatTile) * (D + 8) + kLatHeads * (kLatTile + 8)) +
         sizeof(float) * 2 * kLatWarps * 16 + (fp8 ? 2 * kLatTile * row_bytes : 0) + 2 * sizeof(uint64_t);
}

// pool: rows of row_bytes bytes (bf16 values, or fp8 rows where kFp8).
// kDvw: dv / 8, the columns of one warp; kD: the row's values where the launch knows them at compile time
// (the products' shared-memory addresses are then constants, and the loop over the row unrolled: the
// kernel's integer work was most of its instructions), else 0 and `row` says; TO: the output's dtype
// (f32 or bf16).
template <int kDvw, int kD, typename TO, bool kFp8>
__global__ void __launch_bounds__(kLatWarps * 32)
    paged_latent_tc_kernel(const float* q, int64_t qs0, int64_t qs1, const unsigned char* pool, int64_t row_bytes,
                           int64_t pool_rows, int block_size, const int32_t* tables, int64_t max_blocks, int64_t n_seq,
                           const int32_t* starts, const int32_t* ctx, TO* out, int64_t os0, int64_t os1, int64_t heads,
                           int row, float scale, int64_t split_len, float* part_ml, float* part_acc) {
  constexpr int kNt = kDvw / 8;  // accumulator n-tiles of a warp
  const int D = kD > 0 ? kD : row;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ld = D + 8;  // bf16 row stride of the Q and K tiles (an odd number of 16-byte units)
  constexpr int kLdp = kLatTile + 8;
  tc::bf16* Qs = reinterpret_cast<tc::bf16*>(smem_raw);
  tc::bf16* Ks = Qs + kLatHeads * ld;                    // two tiles [kLatTile][ld] (fp8: one)
  tc::bf16* Ps = Ks + (kFp8 ? 1 : 2) * kLatTile * ld;    // [16][kLdp]
  float* red = reinterpret_cast<float*>(Ps + kLatHeads * kLdp);  // [2][kLatWarps][16]: maxima, sums
  // Where tile buffer b's rows arrive, row_bytes apart in fp8 staging, else ld values apart in Ks.
  unsigned char* staging = reinterpret_cast<unsigned char*>(red + 2 * kLatWarps * 16);  // fp8: [2][kLatTile][row_bytes]
  const int64_t arrive_ld = kFp8 ? row_bytes : 2 * ld;
  const auto arrival = [&](int b) {
    return kFp8 ? staging + b * kLatTile * row_bytes : reinterpret_cast<unsigned char*>(Ks + b * kLatTile * ld);
  };
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kBulk = true;
#else
  constexpr bool kBulk = false;
#endif
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int64_t i = blockIdx.x, h0 = static_cast<int64_t>(blockIdx.y) * kLatHeads;
  // Q: 16 heads (zeros past the last) in bf16, as float4 loads issued kBatch at a time (a loop of one
  // load each would wait out a memory round trip per element). The host checks the alignment. The first
  // kBatch a thread are issued before anything else waits, and stored once the first tile is on its way.
  constexpr int kBatch = 8;
  const int quads = D / 4, q_total = kLatHeads * quads;
  float4 qv[kBatch];
  const auto load_q = [&](int base) {
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int e = base + k * blockDim.x, r = e / quads;
      qv[k] = e < q_total && h0 + r < heads
                  ? __ldg(reinterpret_cast<const float4*>(q + i * qs0 + (h0 + r) * qs1) + e % quads)
                  : make_float4(0, 0, 0, 0);
    }
  };
  const auto store_q = [&](int base) {
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int e = base + k * blockDim.x;
      if (e >= q_total) break;
      __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(Qs + (e / quads) * ld + 4 * (e % quads));
      dst[0] = __floats2bfloat162_rn(qv[k].x, qv[k].y);
      dst[1] = __floats2bfloat162_rn(qv[k].z, qv[k].w);
    }
  };
  load_q(threadIdx.x);
  // A warp takes every kLatWarps-th row of a tile. Its lanes look up those rows' block-table entries
  // together a tile ahead of the tile's load (the entries arrive while the tile before is computed),
  // then the rows come in 16-byte pieces, or on Hopper a bulk copy a row (zeros past the end).
  const int pieces = static_cast<int>(kFp8 ? row_bytes / 16 : D / 8);
  constexpr int kRowsPerWarp = kLatTile / kLatWarps;
  struct Entry {
    int32_t blk;  // the lane's row's block-table entry, -1 outside the table (read only by fetch)
    int32_t at;   // the row's place in its block
    int32_t pos;  // the row's position (fetch takes it only up to the end)
  };
  const auto lookup = [&](int32_t seq, int64_t p0) {
    // Positions fit 32 bits (the host checks the tables' extent), and 32-bit division is a fraction of
    // 64-bit division's instructions.
    const int32_t pos = static_cast<int32_t>(p0 + warp + kLatWarps * lane);
    const uint32_t in_table = static_cast<uint32_t>(pos) / static_cast<uint32_t>(block_size);
    Entry e{-1, static_cast<int32_t>(static_cast<uint32_t>(pos) - in_table * static_cast<uint32_t>(block_size)), pos};
    if (lane < kRowsPerWarp && in_table < max_blocks) e.blk = tables[seq * max_blocks + in_table];
    return e;
  };
  // The row's sequence. In a decode step row i is sequence i: its bounds, its context length and its
  // first tile's entries are loaded together on that guess (one memory round trip before the first
  // tile's copy, not four), and again where the guess is wrong.
  const int64_t z = blockIdx.z, splits = gridDim.z, begin = z * split_len;
  int32_t s = static_cast<int32_t>(min(i, n_seq - 1));
  int32_t s0 = starts[s], s1 = starts[s + 1], cs = ctx[s];
  Entry first = lookup(s, begin);
  if (!(s0 <= i && i < s1)) {
    s = seq_of_row(starts, n_seq, i);
    s0 = starts[s], s1 = starts[s + 1], cs = ctx[s];
    first = lookup(s, begin);
  }
  const int64_t last = cs - (s1 - s0) + (i - s0);  // own position
  const int64_t end = splits == 1 ? last : min(last, begin + split_len - 1);
  // The buffers' barriers (kBulk), made while the loads above are in flight: each warp arrives once a
  // tile, announcing its rows' bytes.
  uint64_t* bars = reinterpret_cast<uint64_t*>(staging + (kFp8 ? 2 * kLatTile * row_bytes : 0));
  if constexpr (kBulk) {
    if (threadIdx.x == 0) {
      wg::bar_init(&bars[0], kLatWarps);
      wg::bar_init(&bars[1], kLatWarps);
      wg::bars_initialized();
    }
    __syncthreads();
  }
  // The warp's kRowsPerWarp × pieces copies spread over all its lanes: copy e = lane + 32·j is piece
  // e % pieces of the warp's row e / pieces (kept as a running row and piece, no division a copy).
  const int total = kRowsPerWarp * pieces, row0 = lane / pieces, piece0 = lane % pieces;
  const auto fetch = [&](unsigned char* rows, const Entry& e, uint64_t* bar) {
    const int64_t row = static_cast<int64_t>(e.blk) * block_size + e.at;
    const int64_t mine = e.pos <= end && e.blk >= 0 && row < pool_rows ? row : -1;
    if constexpr (kBulk) {
      const uint32_t bytes = 16 * pieces;
      const unsigned copied = __ballot_sync(0xffffffffu, mine >= 0);
      if (lane == 0) wg::bar_expect(bar, __popc(copied) * bytes);
      __syncwarp();
      unsigned char* dst = rows + (warp + kLatWarps * lane) * arrive_ld;
      if (mine >= 0) {
        wg::bulk_load(dst, pool + mine * row_bytes, bytes, bar);
      } else if (lane < kRowsPerWarp) {
        for (int piece = 0; piece < pieces; ++piece) reinterpret_cast<uint4*>(dst)[piece] = make_uint4(0, 0, 0, 0);
      }
      return;
    }
    int k = row0, piece = piece0;
    for (int e0 = 0; e0 < total; e0 += 32) {
      const int64_t r = __shfl_sync(0xffffffffu, mine, min(k, kRowsPerWarp - 1));
      if (e0 + lane < total) {
        const unsigned char* src = r >= 0 ? pool + r * row_bytes : pool;
        tc::cp_async16(rows + (warp + kLatWarps * k) * arrive_ld + 16 * piece, src + 16 * piece, r >= 0);
      }
      for (piece += 32; piece >= pieces; piece -= pieces) ++k;
    }
    tc::cp_async_commit();
  };
  // The first tile's rows are on their way before q is stored, and the second's entries.
  if (begin <= end) fetch(arrival(0), first, &bars[0]);
  Entry ahead = lookup(s, begin + kLatTile);
  store_q(threadIdx.x);
  for (int base = threadIdx.x + blockDim.x * kBatch; base < q_total; base += blockDim.x * kBatch) {
    load_q(base);
    store_q(base);
  }
  const float scale_log2 = scale * 1.4426950408889634f;
  float acc[kNt][4];
#pragma unroll
  for (int t = 0; t < kNt; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0;
  // Rows g and g + 8: the running maxima (log2 units), and this warp's share of the sums (its
  // positions' weights; the warps' shares are added once, after the last tile).
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
  // Q (and rows zeroed by the first fetch) before the first tile; without kBulk the loop's first barrier.
  if constexpr (kBulk) __syncthreads();
  int buf = 0;
  uint32_t uses = 0;  // of each buffer before this tile's (kBulk: its barrier's phase parity)
  for (int64_t p0 = begin; p0 <= end; p0 += kLatTile, buf ^= 1, uses += buf == 0) {
    if (p0 + kLatTile <= end) {
      fetch(arrival(buf ^ 1), ahead, &bars[buf ^ 1]);
      ahead = lookup(s, p0 + 2 * kLatTile);
      if constexpr (!kBulk) tc::cp_async_wait<1>();
    } else if constexpr (!kBulk) {
      tc::cp_async_wait<0>();
    }
    if constexpr (kBulk)
      wg::bar_wait(&bars[buf], uses & 1);
    else
      __syncthreads();
    const tc::bf16* K = Ks + (kFp8 ? 0 : buf * kLatTile * ld);
    if constexpr (kFp8) {
      // The staged fp8 rows into the bf16 tile, 8 values a thread at a time: the latent's E4M3 values
      // times their tile's scale (exact in bf16), the rope key's bf16 values as they are. Rows past the
      // end arrived as zeros (scale 0 too) and stay zeros.
      constexpr int kR = kLatWarps * kDvw, kChunksC = kR / 8;  // the latent: dv values
      const int per_row = D / 8;
      const unsigned char* src = staging + buf * kLatTile * row_bytes;
      const int64_t scales_at = Fp8LatentRow{kR, D - kR}.scales_offset();
      for (int e = threadIdx.x; e < kLatTile * per_row; e += blockDim.x) {
        const int row = e / per_row, ch = e % per_row;
        const unsigned char* rp = src + row * row_bytes;
        uint4 wide;
        if (ch < kChunksC) {
          const uint2 b8 = *reinterpret_cast<const uint2*>(rp + 8 * ch);
          const float scale = reinterpret_cast<const float*>(rp + scales_at)[8 * ch / kFp8LatentTile];
          const uint32_t words[2] = {b8.x, b8.y};
          uint32_t out[4];
#pragma unroll
          for (int h = 0; h < 4; ++h) {
            const __nv_fp8x2_storage_t two = static_cast<__nv_fp8x2_storage_t>(words[h / 2] >> (16 * (h % 2)));
            const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(two, __NV_E4M3)));
            const __nv_bfloat162 b = __floats2bfloat162_rn(f.x * scale, f.y * scale);
            out[h] = *reinterpret_cast<const uint32_t*>(&b);
          }
          wide = make_uint4(out[0], out[1], out[2], out[3]);
        } else {
          wide = *reinterpret_cast<const uint4*>(rp + kR + 16 * (ch - kChunksC));
        }
        *reinterpret_cast<uint4*>(Ks + row * ld + 8 * ch) = wide;
      }
      __syncthreads();
    }
    // S for this warp's 8 positions (one 16×8 block), 64 of the latent row at a time in four chains of
    // products (summed at the end: the chains' latencies overlap), then what is left by 32 and 16.
    float chain[4][4] = {};
    const tc::bf16* Kw = K + warp * 8 * ld;
    const auto step32 = [&](int kk, float(&c0)[4], float(&c1)[4]) {
      uint32_t a0[4], a1[4], b[4];
      tc::load_a(a0, Qs + kk, ld);
      tc::load_a(a1, Qs + kk + 16, ld);
      tc::load_b_nk32(b, Kw + kk, ld);
      tc::mma(c0, a0, b[0], b[1]);
      tc::mma(c1, a1, b[2], b[3]);
    };
    int kk = 0;
    for (; kk + 64 <= D; kk += 64) {
      step32(kk, chain[0], chain[1]);
      step32(kk + 32, chain[2], chain[3]);
    }
    if (kk + 32 <= D) {
      step32(kk, chain[0], chain[1]);
      kk += 32;
    }
    if (kk < D) {
      uint32_t a0[4], b[2];
      tc::load_a(a0, Qs + kk, ld);
      tc::load_b_nk8(b, Kw + kk, ld);
      tc::mma(chain[2], a0, b[0], b[1]);
    }
    float sc[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) sc[e] = (chain[0][e] + chain[1][e]) + (chain[2][e] + chain[3][e]);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t pos = p0 + warp * 8 + 2 * c + (e & 1);
      sc[e] = pos <= end ? sc[e] * scale_log2 : -INFINITY;
      mx[e / 2] = fmaxf(mx[e / 2], sc[e]);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    }
    if (c == 0) red[warp * 16 + g] = mx[0], red[warp * 16 + g + 8] = mx[1];
    __syncthreads();
    float mn[2], alpha[2], sum[2] = {0, 0};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile = -INFINITY;
#pragma unroll
      for (int w = 0; w < kLatWarps; ++w) tile = fmaxf(tile, red[w * 16 + g + 8 * r]);
      mn[r] = fmaxf(m[r], tile);  // finite: a tile's first position is always in range
      alpha[r] = exp2f(m[r] - mn[r]);
    }
    {
      float p[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[e] = exp2f(sc[e] - mn[e / 2]);
        sum[e / 2] += p[e];
      }
      const int col = warp * 8 + 2 * c;
      *reinterpret_cast<__nv_bfloat162*>(Ps + g * kLdp + col) = __floats2bfloat162_rn(p[0], p[1]);
      *reinterpret_cast<__nv_bfloat162*>(Ps + (g + 8) * kLdp + col) = __floats2bfloat162_rn(p[2], p[3]);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
      sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
    }
    __syncthreads();  // P
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[r] = l[r] * alpha[r] + sum[r];
      m[r] = mn[r];
    }
#pragma unroll
    for (int t = 0; t < kNt; ++t) {
      acc[t][0] *= alpha[0], acc[t][1] *= alpha[0];
      acc[t][2] *= alpha[1], acc[t][3] *= alpha[1];
    }
    // O[:, this warp's columns] += P · V.
#pragma unroll
    for (int kk = 0; kk < kLatTile; kk += 16) {
      uint32_t a[4];
      tc::load_a(a, Ps + kk, kLdp);
#pragma unroll
      for (int t = 0; t < kNt; t += 2) {
        uint32_t b[4];  // with one n-tile a warp (dv 64), the second 8 columns are read and not used
        tc::load_b_kn(b, K + kk * ld + warp * kDvw + t * 8, ld);
        tc::mma(acc[t], a, b[0], b[1]);
        if constexpr (kNt > 1) tc::mma(acc[t + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with this tile, P and the maxima before they are written again
  }
  // The sums: the warps' shares added in warp order.
  if (c == 0) red[kLatWarps * 16 + warp * 16 + g] = l[0], red[kLatWarps * 16 + warp * 16 + g + 8] = l[1];
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = 0;
#pragma unroll
    for (int w = 0; w < kLatWarps; ++w) l[r] += red[kLatWarps * 16 + w * 16 + g + 8 * r];
  }
  const int64_t dv = kLatWarps * kDvw;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t h = h0 + g + 8 * r;
    if (h >= heads) continue;
    if (splits > 1) {
      const int64_t slot = (i * heads + h) * splits + z;
      if (warp == 0 && c == 0) part_ml[2 * slot] = m[r] * 0.6931471805599453f, part_ml[2 * slot + 1] = l[r];
#pragma unroll
      for (int t = 0; t < kNt; ++t) {
        const int64_t col = warp * kDvw + t * 8 + 2 * c;
        *reinterpret_cast<float2*>(part_acc + slot * dv + col) = make_float2(acc[t][2 * r], acc[t][2 * r + 1]);
      }
    } else {
      TO* o = out + i * os0 + h * os1;
      const float inv = 1.0f / l[r];
      // A lane's two columns in one store where the row allows (each store is waited out at the exit).
      const bool pairs = reinterpret_cast<uintptr_t>(o) % (2 * sizeof(TO)) == 0;
#pragma unroll
      for (int t = 0; t < kNt; ++t) {
        const int64_t col = warp * kDvw + t * 8 + 2 * c;
        if (pairs) {
          put2(o + col, acc[t][2 * r] * inv, acc[t][2 * r + 1] * inv);
        } else {
          put(o + col, acc[t][2 * r] * inv);
          put(o + col + 1, acc[t][2 * r + 1] * inv);
        }
      }
    }
  }
}

Dims make_dims(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, float scale,
               const Tensor* k_tail = nullptr) {
  Dims a{};
  a.T = q.size(1);
  a.S = k.size(1);
  a.Hq = q.size(2);
  a.Hk = k.size(2);
  a.D = q.size(3);
  a.Dv = v.size(3);
  a.q0 = q.stride(0), a.q1 = q.stride(1), a.q2 = q.stride(2);
  a.k0 = k.stride(0), a.k1 = k.stride(1), a.k2 = k.stride(2);
  a.kt0 = a.k0, a.kt1 = a.k1, a.kt2 = a.k2, a.kd = static_cast<int>(a.D);
  if (k_tail != nullptr) {
    a.kt0 = k_tail->stride(0), a.kt1 = k_tail->stride(1), a.kt2 = k_tail->stride(2);
    a.kd = static_cast<int>(k.size(3));
  }
  a.v0 = v.stride(0), a.v1 = v.stride(1), a.v2 = v.stride(2);
  a.o0 = out.stride(0), a.o1 = out.stride(1), a.o2 = out.stride(2);
  a.scale = scale;
  return a;
}

void check_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                     const Tensor* k_tail = nullptr) {
  for (const Tensor* t : std::initializer_list<const Tensor*>{&q, &k, &v, &out, k_tail}) {
    if (t == nullptr) continue;
    check_device(*t, t->dtype());
    CHECK(t->dtype() == DType::kF32 || t->dtype() == DType::kBF16) << "attention operand of " << dtype_name(t->dtype());
    CHECK(t->dim() == 4 && t->stride(3) == 1) << "attention takes [B, T, H, D] with the last dim contiguous";
  }
  if (k_tail != nullptr) {
    CHECK(k_tail->dtype() == k.dtype()) << "attention: keys in parts of one dtype";
    for (int d = 0; d < 3; ++d) CHECK_EQ(k_tail->size(d), k.size(d)) << "attention: the keys' parts";
  }
  CHECK_EQ(k.size(3) + (k_tail != nullptr ? k_tail->size(3) : 0), q.size(3));
  CHECK(q.size(2) % k.size(2) == 0);
  CHECK(k.size(1) >= q.size(1));
  CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2));
  CHECK(out.size(0) == q.size(0) && out.size(1) == q.size(1) && out.size(2) == q.size(2) && out.size(3) == v.size(3));
  CHECK_LE(q.size(3), 32 * kMaxDU) << "attention head dim above " << 32 * kMaxDU;
  CHECK_LE(v.size(3), 32 * kMaxVU) << "attention value dim above " << 32 * kMaxVU;
}

template <typename K>
void set_smem(K kernel, size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Runs f.template operator()<D, DV>() for the head sizes the tensor-core kernels are built for; false
// for others (they take the fp32 kernels).
template <typename F>
bool with_tc_dims(int64_t d, int64_t dv, F f) {
#define R1LAB_TC_CASE(D, DV)        \
  if (d == D && dv == DV) {         \
    f.template operator()<D, DV>(); \
    return true;                    \
  }
  R1LAB_TC_CASE(48, 32)
  R1LAB_TC_CASE(64, 64)
  R1LAB_TC_CASE(96, 64)
  R1LAB_TC_CASE(128, 128)
  R1LAB_TC_CASE(192, 128)
#undef R1LAB_TC_CASE
  return false;
}

// The tensor-core kernels write pairs as float2, and the fp32 ones read rows as float4: 16-byte aligned
// bases and strides in multiples of 4.
bool vec4_rows(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) {
    if (!t->defined()) continue;  // an output not given
    if (reinterpret_cast<uintptr_t>(t->raw()) % 16) return false;
    for (int d = 0; d < 3; ++d)
      if (t->stride(d) % 4) return false;
  }
  return true;
}

const tc::bf16* bf16_data(const Tensor& t) { return static_cast<const tc::bf16*>(t.raw()); }

// Whether the tensor-core kernels can read t's rows by cp.async as they are: bf16, 16-byte aligned.
bool tc_rows(const Tensor& t) {
  if (t.dtype() != DType::kBF16 || reinterpret_cast<uintptr_t>(t.raw()) % 16) return false;
  for (int d = 0; d < 3; ++d)
    if (t.stride(d) % 8) return false;
  return true;
}

// The split of keys in parts that the tensor-core kernels are built for at head dim d (MLA's nope | rope
// at the benchmark's and DeepSeek-V3's sizes); 0: none.
constexpr int tc_key_split(int64_t d) { return d == 96 ? 64 : d == 192 ? 128 : 0; }

// Whether the tensor-core kernels read the keys as they come: whole (any dtype: attention_operand rounds
// them), or in bf16 parts they can read by cp.async, split where they are built for (head dim d).
bool tc_key_parts(const Tensor& k, const Tensor* tail, int64_t d) {
  return tail == nullptr || (tc_rows(k) && tc_rows(*tail) && k.size(3) == tc_key_split(d));
}

// Runs f.template operator()<KD>() for keys whole (kd = D) or split as tc_key_parts allowed.
template <int D, typename F>
void with_key_split(int kd, F f) {
  if (kd == D) {
    f.template operator()<D>();
  } else if constexpr (tc_key_split(D) > 0) {
    f.template operator()<tc_key_split(D)>();
  }
}

}  // namespace

Tensor CudaBackend::attention_operand(const Tensor& t, DType dtype) {
  if (t.dtype() == dtype && (dtype == DType::kF32 || tc_rows(t))) return t;
  Tensor c = empty(t.shape(), dtype);
  if (t.dtype() == DType::kF32 && t.stride(1) == t.size(2) * t.stride(2)) {
    // Rows of one stride within a batch entry: one rounding pass (the products' conversion).
    to_bf16(t.f32(), t.size(0) * t.size(1) * t.size(2), t.size(3), t.stride(2), t.size(1) * t.size(2), t.stride(0),
            c.raw());
  } else {
    copy(t, c);
  }
  return c;
}

void CudaBackend::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, Tensor& out,
                                    Tensor& lse, const Tensor* k_tail) {
  check_attention(q, k, v, out, k_tail);
  check_device(lse, DType::kF32);
  CHECK(lse.is_contiguous() && lse.numel() == q.size(0) * q.size(2) * q.size(1));
  const Dims a = make_dims(q, k, v, out, scale, k_tail);
  const int64_t B = q.size(0);
  if (B == 0 || a.T == 0) return;
  // Causal pairs: T·S - T(T-1)/2 per head.
  const double pairs = static_cast<double>(B * a.Hq) * (a.T * a.S - a.T * (a.T - 1) / 2.0);
  Op op(this, "attention", 2.0 * pairs * (a.D + a.Dv),
        1.0 * (dtype_size(q.dtype()) * q.numel() + dtype_size(k.dtype()) * k.numel() +
               dtype_size(v.dtype()) * v.numel()) +
            4.0 * out.numel());
  // Tensor cores: bf16 operands (rounded once here if they come in f32), read by cp.async; out in its
  // own dtype (bf16: the f32 result rounded once). Keys in parts as they lie, where they are bf16 rows
  // the kernels can read (else joined first, below).
  if (opt_.gemm != Options::GemmPrecision::kF32 && vec4_rows({&out}) && tc_key_parts(k, k_tail, a.D) &&
      with_tc_dims(a.D, a.Dv, [&]<int D, int DV>() {
        const Tensor qb = attention_operand(q, DType::kBF16), vb = attention_operand(v, DType::kBF16);
        const Tensor kb = k_tail != nullptr ? k : attention_operand(k, DType::kBF16);
        const Dims ab = make_dims(qb, kb, vb, out, scale, k_tail);
        const tc::bf16* kt = bf16_data(k_tail != nullptr ? *k_tail : kb);
        constexpr size_t smem = tc::forward_smem<D, DV>();
        const dim3 grid(blocks(a.T, tc::kRowsT), static_cast<unsigned>(B * a.Hq));
        with_key_split<D>(ab.kd, [&]<int KD>() {
          const auto run = [&](auto* o) {
            using TO = std::remove_pointer_t<decltype(o)>;
            const auto [kernel, bytes] = [&] {
              if constexpr (tc::kWgAttention<D, DV>)
                if (hopper_) return std::make_pair(tc::forward_wg<D, DV, KD, TO>, tc::wg_forward_smem<D, DV>());
              return std::make_pair(tc::forward<D, DV, KD, TO>, smem);
            }();
            set_smem(kernel, bytes);
            kernel<<<grid, tc::kThreadsT, bytes, stream()>>>(bf16_data(qb), bf16_data(kb), kt, bf16_data(vb), o,
                                                             lse.f32(), ab);
          };
          if (out.dtype() == DType::kBF16)
            run(static_cast<tc::bf16*>(out.raw()));
          else
            run(out.f32());
        });
      })) {
    CUDA_CHECK(cudaGetLastError());
    return;
  }
  if (k_tail != nullptr) {  // keys the kernels read whole
    attention_forward(q, joined_keys(k, *k_tail), v, scale, out, lse);
    return;
  }
  if (out.dtype() != DType::kF32) {  // the fp32 kernels write f32: through an f32 copy, rounded once
    Tensor o32 = empty(out.shape(), DType::kF32);
    attention_forward(q, k, v, scale, o32, lse);
    copy(o32, out);
    return;
  }
  const Tensor qf = attention_operand(q, DType::kF32), kf = attention_operand(k, DType::kF32),
               vf = attention_operand(v, DType::kF32);
  const Dims af = make_dims(qf, kf, vf, out, scale);
  const size_t smem = sizeof(float) * (kTile * (a.D + 1) + kTile * (a.Dv + 1) + kWarps * kRows * a.D);
  set_smem(attention_forward_kernel, smem);
  attention_forward_kernel<<<dim3(blocks(a.T, kWarps * kRows), static_cast<unsigned>(B * a.Hq)), kWarps * 32, smem,
                             stream()>>>(qf.f32(), kf.f32(), vf.f32(), out.f32(), lse.f32(), af);
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& out, const Tensor& lse, float scale, Tensor& dq, Tensor& dk,
                                     Tensor& dv, bool accumulate, Tensor* dq_tail, Tensor* dk_tail,
                                     const Tensor* k_tail) {
  check_attention(q, k, v, out, k_tail);
  const bool dv16 = dv.dtype() == DType::kBF16;
  CHECK(!dv16 || !accumulate) << "attention_backward: a bf16 dv is overwritten, not added to";
  CHECK((dq_tail == nullptr && dk_tail == nullptr) || !accumulate)
      << "attention_backward: gradients in parts are overwritten, not added to";
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dout, &dq, &dk, &dv}) {
    const bool parts = (t == &dq && dq_tail != nullptr) || (t == &dk && dk_tail != nullptr);
    if ((t == &dv && dv16) || (parts && t->dtype() == DType::kBF16)) {
      check_device(*t, DType::kBF16);
      CHECK(t->dim() == 4 && t->stride(3) == 1);
      continue;
    }
    check_device(*t, DType::kF32);
    CHECK(t->dim() == 4 && t->stride(3) == 1);
  }
  if (dq_tail != nullptr) {
    check_device(*dq_tail, DType::kF32);
    check_parts(dq, *dq_tail, q, q.size(3), "dq");
  }
  if (dk_tail != nullptr) {
    check_device(*dk_tail, DType::kF32);
    check_parts(dk, *dk_tail, k, q.size(3), "dk");
  }
  const bool dk_whole = dk.dim() == 4 && dk.size(0) == k.size(0) && dk.size(1) == k.size(1) &&
                        dk.size(2) == k.size(2) && dk.size(3) == q.size(3);
  CHECK(dout.shape() == out.shape() && (dq_tail != nullptr || dq.shape() == q.shape()) &&
        (dk_tail != nullptr || dk_whole) && dv.shape() == v.shape());
  Dims a = make_dims(q, k, v, out, scale, k_tail);
  a.g0 = dout.stride(0), a.g1 = dout.stride(1), a.g2 = dout.stride(2);
  const int64_t B = q.size(0);
  if (B == 0 || a.T == 0) return;
  const double pairs = static_cast<double>(B * a.Hq) * (a.T * a.S - a.T * (a.T - 1) / 2.0);
  Op op(this, "attention_backward", 2.0 * pairs * (2 * a.D + 2 * a.Dv),
        2.0 * (dtype_size(q.dtype()) * q.numel() + dtype_size(k.dtype()) * k.numel() +
               dtype_size(v.dtype()) * v.numel()) +
            4.0 * (3 * out.numel() + q.numel() + 2 * k.numel() + v.numel()));
  const int64_t rows = B * a.Hq * a.T;
  Tensor delta = empty({rows}, DType::kF32);
  // The row sums delta; with gb, the bf16 copy of dout the tensor-core kernels read, made in the same pass.
  const auto row_sums = [&](Tensor* gb) {
    tc::bf16* g = gb != nullptr ? static_cast<tc::bf16*>(gb->raw()) : nullptr;
    const int64_t g0 = gb != nullptr ? gb->stride(0) : 0, g1 = gb != nullptr ? gb->stride(1) : 0,
                  g2 = gb != nullptr ? gb->stride(2) : 0;
    if (out.dtype() == DType::kBF16)
      attention_delta_kernel<<<blocks(rows, 8), 256, 0, stream()>>>(
          dout.f32(), static_cast<const tc::bf16*>(out.raw()), delta.f32(), a, rows, g, g0, g1, g2);
    else
      attention_delta_kernel<<<blocks(rows, 8), 256, 0, stream()>>>(dout.f32(), out.f32(), delta.f32(), a, rows, g,
                                                                    g0, g1, g2);
  };
  // dq and dk as the kernels write them: whole, or in parts.
  const auto grad_out = [](Tensor& x, Tensor* tail) {
    tc::GradOut o{x.raw(), x.stride(0), x.stride(1), x.stride(2), nullptr, 0, 0, 0, static_cast<int>(x.size(3)),
                  x.dtype() == DType::kBF16};
    if (tail != nullptr) {
      o.tail = tail->f32();
      o.t0 = tail->stride(0), o.t1 = tail->stride(1), o.t2 = tail->stride(2);
    }
    return o;
  };
  const Tensor none;
  const Tensor& dqt = dq_tail != nullptr ? *dq_tail : none;
  const Tensor& dkt = dk_tail != nullptr ? *dk_tail : none;
  // Gradients in parts: the kernels write pairs of columns, each pair wholly in one part.
  const bool parts_whole_chunks =
      (dq_tail == nullptr || dq.size(3) % 8 == 0) && (dk_tail == nullptr || dk.size(3) % 8 == 0);
  if (opt_.gemm != Options::GemmPrecision::kF32 && vec4_rows({&dq, &dk, &dv, &dqt, &dkt}) && parts_whole_chunks &&
      tc_key_parts(k, k_tail, a.D) && with_tc_dims(a.D, a.Dv, [&]<int D, int DV>() {
        Tensor gb = empty(dout.shape(), DType::kBF16);
        row_sums(&gb);
        const Tensor qb = attention_operand(q, DType::kBF16), vb = attention_operand(v, DType::kBF16);
        const Tensor kb = k_tail != nullptr ? k : attention_operand(k, DType::kBF16);
        const tc::bf16* kt = bf16_data(k_tail != nullptr ? *k_tail : kb);
        Dims ab = make_dims(qb, kb, vb, out, scale, k_tail);
        ab.g0 = gb.stride(0), ab.g1 = gb.stride(1), ab.g2 = gb.stride(2);
        constexpr size_t sq = tc::dq_smem<D, DV>(), skv = tc::dkdv_smem<D, DV>();
        with_key_split<D>(ab.kd, [&]<int KD>() {
          const auto dq_kernel = [&] {
            if constexpr (tc::kWgAttention<D, DV>)
              if (hopper_) return std::make_pair(tc::backward_dq_wg<D, DV, KD>, tc::wg_dq_smem<D, DV>());
            return std::make_pair(tc::backward_dq<D, DV, KD>, sq);
          }();
          set_smem(dq_kernel.first, dq_kernel.second);
          dq_kernel.first<<<dim3(blocks(a.T, tc::kRowsT), static_cast<unsigned>(B * a.Hq)), tc::kThreadsT,
                            dq_kernel.second, stream()>>>(bf16_data(qb), bf16_data(kb), kt, bf16_data(vb),
                                                          bf16_data(gb), lse.f32(), delta.f32(), grad_out(dq, dq_tail),
                                                          accumulate, ab);
          const auto dkdv = [&](auto* dvp) {
            using TV = std::remove_pointer_t<decltype(dvp)>;
            if constexpr (tc::kWgAttention<D, DV>)
              if (hopper_) {
                constexpr size_t sw = tc::wg_dkdv_smem<D, DV>();
                set_smem(tc::backward_dkdv_wg<D, DV, KD, TV>, sw);
                tc::backward_dkdv_wg<D, DV, KD, TV>
                    <<<dim3(blocks(a.S, tc::kRowsT), static_cast<unsigned>(B * a.Hk)), tc::kThreadsT, sw, stream()>>>(
                        bf16_data(qb), bf16_data(kb), kt, bf16_data(vb), bf16_data(gb), lse.f32(), delta.f32(),
                        grad_out(dk, dk_tail), dvp, dv.stride(0), dv.stride(1), dv.stride(2), accumulate, ab);
                return;
              }
            set_smem(tc::backward_dkdv<D, DV, KD, TV>, skv);
            tc::backward_dkdv<D, DV, KD, TV>
                <<<dim3(blocks(a.S, tc::kRowsT), static_cast<unsigned>(B * a.Hk)), tc::kThreadsT, skv, stream()>>>(
                    bf16_data(qb), bf16_data(kb), kt, bf16_data(vb), bf16_data(gb), lse.f32(), delta.f32(),
                    grad_out(dk, dk_tail), dvp, dv.stride(0), dv.stride(1), dv.stride(2), accumulate, ab);
          };
          if (dv16)
            dkdv(static_cast<tc::bf16*>(dv.raw()));
          else
            dkdv(dv.f32());
        });
      })) {
    CUDA_CHECK(cudaGetLastError());
    return;
  }
  if (k_tail != nullptr) {  // keys the kernels read whole
    attention_backward(dout, q, joined_keys(k, *k_tail), v, out, lse, scale, dq, dk, dv, accumulate, dq_tail, dk_tail);
    return;
  }
  if (dq_tail != nullptr || dk_tail != nullptr) {  // the f32 kernels write dq and dk whole
    attention_backward_in_parts(dout, q, k, v, out, lse, scale, dq, dk, dv, dq_tail, dk_tail);
    return;
  }
  if (dv16) {  // the f32 kernels: their f32 dv, rounded
    Tensor dv32 = empty(dv.shape(), DType::kF32);
    attention_backward(dout, q, k, v, out, lse, scale, dq, dk, dv32, false);
    copy(dv32, dv);
    return;
  }
  row_sums(nullptr);
  const Tensor qf = attention_operand(q, DType::kF32), kf = attention_operand(k, DType::kF32),
               vf = attention_operand(v, DType::kF32);
  Dims af = make_dims(qf, kf, vf, out, scale);
  af.g0 = a.g0, af.g1 = a.g1, af.g2 = a.g2;
  const size_t smem_q = sizeof(float) * (kTile * (a.D + 1) + kTile * (a.Dv + 1) + kWarps * kRows * (a.D + a.Dv));
  set_smem(attention_dq_kernel, smem_q);
  attention_dq_kernel<<<dim3(blocks(a.T, kWarps * kRows), static_cast<unsigned>(B * a.Hq)), kWarps * 32, smem_q,
                        stream()>>>(qf.f32(), kf.f32(), vf.f32(), dout.f32(), lse.f32(), delta.f32(), dq.f32(),
                                    dq.stride(0), dq.stride(1), dq.stride(2), accumulate, af);
  const size_t smem_k =
      sizeof(float) * (kWarps * kRows * (a.D + a.Dv) + kTile * (a.D + 1) + kTile * (a.Dv + 1) + 2 * kTile);
  set_smem(attention_dkdv_kernel, smem_k);
  attention_dkdv_kernel<<<dim3(blocks(a.S, kWarps * kRows), static_cast<unsigned>(B * a.Hk)), kWarps * 32, smem_k,
                          stream()>>>(qf.f32(), kf.f32(), vf.f32(), dout.f32(), lse.f32(), delta.f32(), dk.f32(),
                                      dk.stride(0), dk.stride(1), dk.stride(2), dv.f32(), dv.stride(0), dv.stride(1),
                                      dv.stride(2), accumulate, af);
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::paged_latent_attention(const Tensor& q, const Tensor& pool, int block_size,
                                         const Tensor& block_tables, const Tensor& seq_starts,
                                         const Tensor& context_lens, float scale, Tensor& out) {
  CHECK(q.dim() == 3 && out.dim() == 3 && q.stride(2) == 1 && out.stride(2) == 1);
  check_device(q, DType::kF32);
  check_device(out, out.dtype());
  CHECK(pool.device() == Device::kCuda &&
        (pool.dtype() == DType::kF32 || pool.dtype() == DType::kBF16 || pool.dtype() == DType::kU8))
      << "paged attention: an f32, bf16 or fp8 (U8) pool on the device";
  CHECK(out.dtype() == DType::kF32 || (out.dtype() == DType::kBF16 && pool.dtype() != DType::kF32))
      << "paged attention into " << dtype_name(out.dtype()) << " over a " << dtype_name(pool.dtype()) << " pool";
  check_device(block_tables, DType::kI32);
  check_device(seq_starts, DType::kI32);
  check_device(context_lens, DType::kI32);
  const int64_t n = q.size(0), heads = q.size(1), d = q.size(2), dv = out.size(2);
  const Rows P = rows_of(pool);
  const bool fp8 = pool.dtype() == DType::kU8;
  const Fp8LatentRow f8{dv, d - dv};
  if (fp8) {
    CHECK(Fp8LatentRow::fits(f8.r, f8.rd) && pool.is_contiguous() && P.cols == f8.bytes())
        << "fp8 latent rows of " << dv << " + " << d - dv << " values: a pool of " << f8.bytes() << "-byte rows, not "
        << shape_str(pool.shape());
  } else {
    CHECK_EQ(P.cols, d);
  }
  CHECK_LE(dv, d);
  CHECK_LE(d, 32 * kMaxLatentU) << "latent row above " << 32 * kMaxLatentU;
  CHECK(block_tables.dim() == 2 && block_tables.is_contiguous());
  const int64_t n_seq = context_lens.numel();
  CHECK_EQ(seq_starts.numel(), n_seq + 1);
  CHECK_EQ(block_tables.size(0), n_seq);
  if (n == 0) return;
  Op op(this, "paged_latent_attention", 0, 4.0 * (q.numel() + out.numel()));
  const int64_t longest = block_tables.size(1) * block_size;
  CHECK_LT(longest, int64_t{1} << 31) << "paged latent attention: block tables over 2^31 positions";
  // The context split over blocks when the query rows leave SMs idle (flash-decoding): at most
  // want_blocks in all, none shorter than min_len positions; each split leaves partial results that
  // paged_combine_kernel merges.
  int sms = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, ctx_->device));
  struct Split {
    int64_t count = 1, len = 0;
    Tensor ml, acc;
    float* ml_f() const { return count > 1 ? ml.f32() : nullptr; }
    float* acc_f() const { return count > 1 ? acc.f32() : nullptr; }
  };
  const auto split = [&](int64_t head_blocks, int64_t min_len, int64_t want_blocks) {
    Split sp;
    sp.count = std::max<int64_t>(
        1, std::min((longest + min_len - 1) / min_len, want_blocks / std::max<int64_t>(1, n * head_blocks)));
    if (sp.count > 1) {
      sp.ml = empty({n, heads, sp.count, 2}, DType::kF32);
      sp.acc = empty({n, heads, sp.count, dv}, DType::kF32);
    }
    sp.len = sp.count > 1 ? (longest + sp.count - 1) / sp.count : longest;
    return sp;
  };
  const auto combine = [&](const Split& sp) {
    CUDA_CHECK(cudaGetLastError());
    if (sp.count == 1) return;
    const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(heads));
    if (out.dtype() == DType::kBF16)
      paged_combine_kernel<<<grid, 128, 0, stream()>>>(sp.ml.f32(), sp.acc.f32(), sp.count, static_cast<int>(dv),
                                                       static_cast<tc::bf16*>(out.raw()), out.stride(0),
                                                       out.stride(1), heads);
    else
      paged_combine_kernel<<<grid, 128, 0, stream()>>>(sp.ml.f32(), sp.acc.f32(), sp.count, static_cast<int>(dv),
                                                       out.f32(), out.stride(0), out.stride(1), heads);
    CUDA_CHECK(cudaGetLastError());
  };
  if (pool.dtype() == DType::kBF16 || fp8) {
    CHECK(d % 16 == 0 && (dv == 64 || dv == 128 || dv == 256 || dv == 512))
        << (fp8 ? "fp8" : "bf16") << " latent rows need D % 16 == 0 and dv of 64, 128, 256 or 512; got D " << d
        << ", dv " << dv;
    CHECK(q.stride(0) % 4 == 0 && q.stride(1) % 4 == 0 && reinterpret_cast<uintptr_t>(q.raw()) % 16 == 0)
        << "bf16 latent attention reads q rows as float4";
    const int64_t row_bytes = fp8 ? f8.bytes() : 2 * P.ld;
    const auto launch = [&](auto* tag, auto fp8_tag) {
      using TO = std::remove_pointer_t<decltype(tag)>;
      constexpr bool kFp8 = decltype(fp8_tag)::value;
      // Rows known at compile time: DeepSeek-V3's (512 + rope 64) and the benchmark model's (256 + 32).
      const auto kernel = dv == 512 && d == 576   ? paged_latent_tc_kernel<64, 576, TO, kFp8>
                          : dv == 256 && d == 288 ? paged_latent_tc_kernel<32, 288, TO, kFp8>
                          : dv == 64              ? paged_latent_tc_kernel<8, 0, TO, kFp8>
                          : dv == 128             ? paged_latent_tc_kernel<16, 0, TO, kFp8>
                          : dv == 256             ? paged_latent_tc_kernel<32, 0, TO, kFp8>
                                                  : paged_latent_tc_kernel<64, 0, TO, kFp8>;
      const size_t smem = paged_tc_smem(d, kFp8, row_bytes);
      set_smem(kernel, smem);
      // Up to two blocks an SM: more splits cost more than they give once every SM is busy (their partial
      // sums go through memory; on an H100 at batch 256, 8 blocks an SM decoded at 69-73k tokens/s, 4 at
      // 78k, 2 at 78-80k).
      const int64_t head_blocks = blocks(heads, kLatHeads);
      const Split sp = split(head_blocks, kLatTile, 2 * static_cast<int64_t>(sms));
      kernel<<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(head_blocks), static_cast<unsigned>(sp.count)),
               kLatWarps * 32, smem, stream()>>>(
          q.f32(), q.stride(0), q.stride(1), static_cast<const unsigned char*>(pool.raw()), row_bytes, P.rows, block_size,
          block_tables.data<int32_t>(), block_tables.size(1), n_seq, seq_starts.data<int32_t>(),
          context_lens.data<int32_t>(), static_cast<TO*>(out.raw()), out.stride(0), out.stride(1), heads,
          static_cast<int>(d), scale, sp.len, sp.ml_f(), sp.acc_f());
      combine(sp);
    };
    const auto with_rows = [&](auto* tag) {
      if (fp8)
        launch(tag, std::true_type());
      else
        launch(tag, std::false_type());
    };
    if (out.dtype() == DType::kBF16)
      with_rows(static_cast<tc::bf16*>(nullptr));
    else
      with_rows(static_cast<float*>(nullptr));
    return;
  }
  const size_t smem = 2 * sizeof(float) * kPagedTile * d;
  const int units = static_cast<int>((d + 31) / 32);
  const auto kernel = units <= 4    ? paged_latent_kernel<4>
                      : units <= 9  ? paged_latent_kernel<9>
                      : units <= 12 ? paged_latent_kernel<12>
                      : units <= 18 ? paged_latent_kernel<18>
                                    : paged_latent_kernel<kMaxLatentU>;
  set_smem(kernel, smem);
  // Eight blocks an SM, splits of at least kPagedSplit positions (long enough to amortise the combine).
  constexpr int64_t kPagedSplit = 64;
  const int64_t head_blocks = blocks(heads, kWarps);
  const Split sp = split(head_blocks, kPagedSplit, 8 * static_cast<int64_t>(sms));
  kernel<<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(head_blocks), static_cast<unsigned>(sp.count)),
           kWarps * 32, smem, stream()>>>(
      q.f32(), q.stride(0), q.stride(1), P.f(), P.ld, P.rows, block_size, block_tables.data<int32_t>(),
      block_tables.size(1), n_seq, seq_starts.data<int32_t>(), context_lens.data<int32_t>(), out.f32(),
      out.stride(0), out.stride(1), heads, static_cast<int>(d), static_cast<int>(dv), scale, sp.len, sp.ml_f(),
      sp.acc_f());
  combine(sp);
}

}  // namespace r1lab::core::cuda
