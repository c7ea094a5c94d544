// RMSNorm, the SiLU gate and rotary embeddings of the CUDA backend, forward and backward. Loads and
// stores in the tensor's dtype (f32 or bf16), math in f32; weight gradients are reduced over rows in a
// fixed order (no atomics), so results are bitwise repeatable.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <type_traits>

#include "core/cuda/cuda_backend.h"
#include "core/cuda/silu.cuh"
#include "core/cuda/vec.cuh"
#include "core/latent_rows.h"

namespace r1lab::core::cuda {
namespace {

template <typename T>
__device__ __forceinline__ float load(const T* p) { return static_cast<float>(*p); }
template <>
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <typename T>
__device__ __forceinline__ void store(T* p, float v) { *p = v; }
template <>
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

constexpr int kThreads = 256;
// The forward norms' blocks (a row each: rmsnorm_forward, add_rmsnorm_forward, moe_combine_add_rmsnorm,
// store_latents, all one partition of a row, so their sums agree bit for bit). A decode step's rows are
// few and its norms wait on memory round trips: more threads a row keep more loads in flight. On an
// H100, a batch-256 decode step's add_rmsnorm (16 a step, 8 with the routed combine) took 8.0 us at 128
// threads, 6.4 at 256, 5.0 at 512 and 4.5 at 1024, where store_latents went from 5.9 to 8.6 (ncu,
// kernels alone): 512.
constexpr int kNormThreads = 512;

// f(std::integral_constant<int, kKeep>) for rows of d elements: the fewest registers a thread that hold
// its share of the row (kNormThreads threads), or 0 (read twice) past 8 each.
template <typename F>
void with_keep(int64_t d, F&& f) {
  constexpr int kT = kNormThreads;
  if (d <= kT)
    f(std::integral_constant<int, 1>());
  else if (d <= 2 * kT)
    f(std::integral_constant<int, 2>());
  else if (d <= 4 * kT)
    f(std::integral_constant<int, 4>());
  else if (d <= 8 * kT)
    f(std::integral_constant<int, 8>());
  else
    f(std::integral_constant<int, 0>());
}

// Many rows (training's, prefill's; at least kManyNormRows) take blocks of kNormThreads / kVirt
// threads, each doing the work of kVirt threads of the kNormThreads (the same partition of a row, so
// the same bits as the few rows of a decode step): more rows in flight an SM, fewer barriers a row.
// For the benchmark model's 8192 rows on an H100 (rows of 1024 and 256): rmsnorm 0.44 -> 0.32 ms a step
// (17 norms) at 128 threads a block; add_rmsnorm 0.41 -> 0.39 at 256, 0.44 at 128 (it holds more).
constexpr int64_t kManyNormRows = 2048;
constexpr int kNormVirt = 4, kAddNormVirt = 2;

// f(keep, virt) (integral constants): with_keep's kKeep, and kVirt for many rows that keep theirs in
// registers, else 1. The launch takes kNormThreads / virt threads a block.
template <int kVirt, typename F>
void with_norm_blocks(int64_t rows, int64_t d, F&& f) {
  with_keep(d, [&](auto keep) {
    if constexpr (decltype(keep)::value > 0) {
      if (rows >= kManyNormRows) {
        f(keep, std::integral_constant<int, kVirt>());
        return;
      }
    }
    f(keep, std::integral_constant<int, 1>());
  });
}

// Sum over the block (up to 1024 threads); the result is valid in every thread. With kVirt > 1 the
// block stands for kVirt times as many threads: thread q·blockDim.x + t of that block holds s[q] of
// thread t here, and the sum is the one that block would make (its warps' trees, then the tree over its
// warps), bit for bit.
template <int kVirt = 1>
__device__ float block_sum(const float (&s)[kVirt]) {
  __shared__ float partial[32];
  __shared__ float total;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int q = 0; q < kVirt; ++q) {
    float v = s[q];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) partial[q * warps + warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    float v = lane < kVirt * warps ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}
__device__ float block_sum(float v) {
  const float s[1] = {v};
  return block_sum<1>(s);
}

// The elements of a row that a thread keeps in registers between the sum of squares and the scaling
// (kKeep > 0): virtual thread q's (see block_sum) in [q]; element i = q·blockDim.x + threadIdx.x +
// u·kNormThreads, the same partition of a row for any kVirt.
template <int kKeep, int kVirt>
struct KeptRow {
  float v[kVirt][kKeep], wv[kVirt][kKeep], ss[kVirt];
  // f(q, u, i) for each kept element i < d.
  template <typename F>
  __device__ __forceinline__ static void each(int d, F&& f) {
#pragma unroll
    for (int q = 0; q < kVirt; ++q)
#pragma unroll
      for (int u = 0; u < kKeep; ++u) {
        const int i = q * blockDim.x + threadIdx.x + u * kNormThreads;
        if (i < d) f(q, u, i);
      }
  }
  // v = value(i) and its weight; each virtual thread's sum of squares, in element order.
  template <typename F>
  __device__ __forceinline__ void take(int d, const float* w, F&& value) {
#pragma unroll
    for (int q = 0; q < kVirt; ++q) ss[q] = 0;
    each(d, [&](int q, int u, int i) {
      v[q][u] = value(i);
      wv[q][u] = w[i];
      ss[q] += v[q][u] * v[q][u];
    });
  }
  // The end of the row's norm: rstd, then y = w · (v · rstd).
  template <typename TY>
  __device__ __forceinline__ void put_normed(float eps, int d, float* rstd, TY* yr) const {
    const float r = rsqrtf(block_sum<kVirt>(ss) / d + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    each(d, [&](int q, int u, int i) { store(yr + i, wv[q][u] * (v[q][u] * r)); });
  }
};

// One block per row: rstd = 1/sqrt(mean(x²) + eps); y = x · rstd · w (y in its own dtype: bf16 where
// only bf16 products read it).
// kKeep > 0: a thread keeps its kKeep elements of the row (d ≤ kKeep · kNormThreads) in registers
// between the sum and the scaling (one read of the row, the weights' loads issued before the sum's
// barriers); kKeep = 0 reads the row twice. Both sum each thread's elements in the same order: the same
// bits. kVirt > 1 (kKeep > 0): blocks of kNormThreads / kVirt threads, each doing the work of kVirt
// threads of the kNormThreads (see block_sum): the same bits again, with more rows in flight an SM (many
// rows: training, prefill). xo (optional): x rounded to bf16 there, row stride ldo.
template <typename T, typename TY, int kKeep, int kVirt = 1>
__global__ void rmsnorm_forward_kernel(const T* x, int64_t ldx, const float* w, float eps, TY* y, int64_t ldy,
                                       float* rstd, int d, __nv_bfloat16* xo, int64_t ldo) {
  const T* xr = x + blockIdx.x * ldx;
  if constexpr (kKeep > 0) {
    KeptRow<kKeep, kVirt> row;
    row.take(d, w, [&](int i) { return load(xr + i); });
    if (xo != nullptr)
      row.each(d, [&](int q, int u, int i) { xo[blockIdx.x * ldo + i] = __float2bfloat16(row.v[q][u]); });
    row.put_normed(eps, d, rstd, y + blockIdx.x * ldy);
  } else {
    static_assert(kVirt == 1, "rows read twice run one thread a thread");
    float ss = 0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      const float v = load(xr + i);
      if (xo != nullptr) xo[blockIdx.x * ldo + i] = __float2bfloat16(v);
      ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss) / d + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    TY* yr = y + blockIdx.x * ldy;
    for (int i = threadIdx.x; i < d; i += blockDim.x) store(yr + i, w[i] * (load(xr + i) * r));
  }
}

// The routed experts' rows that add_rmsnorm_forward_kernel adds into h first, as moe_combine does
// (h[m] += Σ_k w[m, k] · ys[row_of[m·K + k]], k in order), or none (k = 0).
template <typename TS>
struct Routed {
  const TS* ys = nullptr;
  int64_t ldy = 0;
  const float* w = nullptr;
  const int32_t* row_of = nullptr;
  int64_t k = 0;
  __device__ __forceinline__ float added(float acc, int64_t m, int c) const {
    for (int64_t j = 0; j < k; ++j) acc += w[m * k + j] * load(ys + row_of[m * k + j] * ldy + c);
    return acc;
  }
};

// The same with the residual add first, h += x (f32), as add and rmsnorm_forward_kernel compute them:
// each thread sums the squares of the same elements in the same order, so the results are the same bits.
// With routed rows, h first takes them as moe_combine would (moe_combine_add_rmsnorm): the same bits too.
// ho (optional): the new h rounded to bf16 there, row stride ldo.
template <typename TY, int kKeep, typename TS = float, int kVirt = 1>
__global__ void add_rmsnorm_forward_kernel(const float* x, int64_t ldx, float* h, int64_t ldh, const float* w,
                                           float eps, TY* y, int64_t ldy, float* rstd, int d, Routed<TS> routed = {},
                                           __nv_bfloat16* ho = nullptr, int64_t ldo = 0) {
  const float* xr = x + blockIdx.x * ldx;
  float* hr = h + blockIdx.x * ldh;
  if constexpr (kKeep > 0) {
    KeptRow<kKeep, kVirt> row;
    row.take(d, w, [&](int i) { return routed.added(hr[i], blockIdx.x, i) + xr[i]; });
    row.each(d, [&](int q, int u, int i) {
      hr[i] = row.v[q][u];
      if (ho != nullptr) ho[blockIdx.x * ldo + i] = __float2bfloat16(row.v[q][u]);
    });
    row.put_normed(eps, d, rstd, y + blockIdx.x * ldy);
  } else {
    static_assert(kVirt == 1, "rows read twice run one thread a thread");
    float ss = 0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      const float v = routed.added(hr[i], blockIdx.x, i) + xr[i];
      hr[i] = v;
      if (ho != nullptr) ho[blockIdx.x * ldo + i] = __float2bfloat16(v);
      ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss) / d + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    TY* yr = y + blockIdx.x * ldy;
    for (int i = threadIdx.x; i < d; i += blockDim.x) store(yr + i, w[i] * (hr[i] * r));
  }
}

// One block per row: n = x·rstd;  dx += rstd · (dy·w - n · mean(dy·w·n)) (x in dy's dtype or bf16).
template <typename T, typename TX>
__global__ void rmsnorm_backward_dx_kernel(const T* dy, int64_t ldg, const TX* x, int64_t ldx, const float* w,
                                           const float* rstd, T* dx, int64_t ldd, int d) {
  const T* g = dy + blockIdx.x * ldg;
  const TX* xr = x + blockIdx.x * ldx;
  T* o = dx + blockIdx.x * ldd;
  const float r = rstd[blockIdx.x];
  float dot = 0;
  for (int i = threadIdx.x; i < d; i += blockDim.x) dot += load(g + i) * w[i] * load(xr + i) * r;
  const float mean = block_sum(dot) / d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float n = load(xr + i) * r;
    store(o + i, load(o + i) + r * (load(g + i) * w[i] - n * mean));
  }
}

// partial[s, i] = Σ_{rows r of split s} dy[r, i] · x[r, i] · rstd[r]  (grid: column blocks × splits).
template <typename T, typename TX>
__global__ void rmsnorm_dw_partial_kernel(const T* dy, int64_t ldg, const TX* x, int64_t ldx, const float* rstd,
                                          int64_t rows, int d, int64_t rows_per_split, float* partial) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= d) return;
  const int64_t r0 = blockIdx.y * rows_per_split, r1 = min(rows, r0 + rows_per_split);
  float acc = 0;
  for (int64_t r = r0; r < r1; ++r) acc += load(dy + r * ldg + i) * load(x + r * ldx + i) * rstd[r];
  partial[blockIdx.y * static_cast<int64_t>(d) + i] = acc;
}

// dw[i] += Σ_s partial[s, i], in split order.
__global__ void column_sum_kernel(const float* partial, int splits, int d, float* dw) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= d) return;
  float acc = 0;
  for (int s = 0; s < splits; ++s) acc += partial[static_cast<int64_t>(s) * d + i];
  dw[i] += acc;
}

// Both passes of rmsnorm backward in one, for rows of d = 128·kV4 elements (4 a lane, kV4 times):
// a warp takes a row at a time, dx as rmsnorm_backward_dx_kernel makes it, and adds its rows' dw terms
// into its own row of shared sums (each lane its own elements); the block's warps then sum theirs in
// warp order into partial[block] (for column_sum_kernel). dy and x are read once instead of twice.
// w and the sums live in shared memory, so that two blocks fit an SM. dxr (optional): the new dx
// rounded to bf16 there too, row stride ldr.
constexpr int kNormRows = 32;  // rows a block
template <typename T, typename TX, int kV4>
__global__ void __launch_bounds__(kThreads, 2)
    rmsnorm_backward_fused_kernel(const T* dy, int64_t ldg, const TX* x, int64_t ldx, const float* w,
                                  const float* rstd, T* dx, int64_t ldd, int64_t rows, float* partial,
                                  __nv_bfloat16* dxr, int64_t ldr) {
  constexpr int d = 128 * kV4, kWarps = kThreads / 32;
  __shared__ __align__(16) float sums[kWarps][d];
  __shared__ __align__(16) float ws[d];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < d; i += kThreads) ws[i] = w[i];
#pragma unroll
  for (int v = 0; v < kV4; ++v)
#pragma unroll
    for (int e = 0; e < 4; ++e) sums[warp][v * 128 + lane * 4 + e] = 0.0f;
  __syncthreads();
  const int64_t r0 = blockIdx.x * static_cast<int64_t>(kNormRows), r1 = min(rows, r0 + kNormRows);
  for (int64_t r = r0 + warp; r < r1; r += kWarps) {
    // dx's old values load with dy and x, before the row's sum: one round trip to memory a row.
    float g[kV4][4], xv[kV4][4], old[kV4][4];
    const float rs = rstd[r];
#pragma unroll
    for (int v = 0; v < kV4; ++v) {
      loadv<4>(dy + r * ldg + v * 128 + lane * 4, g[v]);
      loadv<4>(x + r * ldx + v * 128 + lane * 4, xv[v]);
      loadv<4>(dx + r * ldd + v * 128 + lane * 4, old[v]);
    }
    float dot = 0;
#pragma unroll
    for (int v = 0; v < kV4; ++v) {
      float wv[4];
      loadv<4>(ws + v * 128 + lane * 4, wv);
#pragma unroll
      for (int e = 0; e < 4; ++e) dot += g[v][e] * wv[e] * xv[v][e] * rs;
    }
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    const float mean = dot / d;
#pragma unroll
    for (int v = 0; v < kV4; ++v) {
      T* o = dx + r * ldd + v * 128 + lane * 4;
      float* acc = &sums[warp][v * 128 + lane * 4];
      float* out = old[v];
      float wv[4], sum[4];
      loadv<4>(ws + v * 128 + lane * 4, wv);
      loadv<4>(acc, sum);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float n = xv[v][e] * rs;
        out[e] = out[e] + rs * (g[v][e] * wv[e] - n * mean);
        sum[e] += g[v][e] * xv[v][e] * rs;
      }
      storev<4>(o, out);
      storev<4>(acc, sum);
      if (dxr != nullptr) storev<4>(dxr + r * ldr + v * 128 + lane * 4, out);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < d; i += kThreads) {
    float t = 0;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) t += sums[k][i];
    partial[blockIdx.x * static_cast<int64_t>(d) + i] = t;
  }
}

// h = silu(g) · u over gu = [g | u] (h in its own dtype, as y above), kV elements a thread.
template <typename T, typename TH, int kV>
__global__ void silu_mul_forward_kernel(const T* gu, int64_t ldgu, TH* h, int64_t ldh, int64_t rows, int inter) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int per = inter / kV;
  if (i >= rows * per) return;
  const int64_t r = i / per, c = (i % per) * kV;
  float g[kV], u[kV], out[kV];
  loadv<kV>(gu + r * ldgu + c, g);
  loadv<kV>(gu + r * ldgu + inter + c, u);
#pragma unroll
  for (int e = 0; e < kV; ++e) out[e] = silu_gate(g[e], u[e]);
  storev<kV>(h + r * ldh + c, out);
}

// silu_gate_backward, each operand in its own dtype, kV elements a thread; h (optional) silu_gate too,
// as silu_mul_forward_kernel writes it.
template <typename TH, typename T, typename TD, int kV>
__global__ void silu_mul_backward_kernel(const TH* dh, int64_t lddh, const T* gu, int64_t ldgu, TD* dgu,
                                         int64_t lddgu, int64_t rows, int inter, T* h, int64_t ldh) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int per = inter / kV;
  if (i >= rows * per) return;
  const int64_t r = i / per, c = (i % per) * kV;
  float g[kV], u[kV], d[kV], dg[kV], du[kV];
  loadv<kV>(gu + r * ldgu + c, g);
  loadv<kV>(gu + r * ldgu + inter + c, u);
  loadv<kV>(dh + r * lddh + c, d);
#pragma unroll
  for (int e = 0; e < kV; ++e) silu_gate_backward(d[e], g[e], u[e], &dg[e], &du[e]);
  storev<kV>(dgu + r * lddgu + c, dg);
  storev<kV>(dgu + r * lddgu + inter + c, du);
  if (h != nullptr) {
    float out[kV];
#pragma unroll
    for (int e = 0; e < kV; ++e) out[e] = silu_gate(g[e], u[e]);
    storev<kV>(h + r * ldh + c, out);
  }
}

// (a, b) -> (a c - b s, a s + b c), with the fused multiply-adds spelled out so that every kernel that
// rotates gives the same bits.
__device__ __forceinline__ void rotate(float a, float b, float c, float s, float* pa, float* pb) {
  *pa = fmaf(a, c, -(b * s));
  *pb = fmaf(a, s, b * c);
}

// (a, b) -> (a cos - b sin, a sin + b cos), angle of pair i at the token's position; -angle if inverse.
__global__ void rope_kernel(float* x, int64_t s0, int64_t s1, int64_t m, int64_t heads, int half,
                            const int32_t* pos, const float* cos_t, const float* sin_t, int64_t n_pos,
                            bool interleaved, bool inverse) {
  const uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x;  // the launch checks that pairs fit in 32 bits
  if (idx >= m * heads * half) return;
  const uint32_t hh = static_cast<uint32_t>(heads) * half, t = idx / hh, j = idx - t * hh, h = j / half;
  const int i = static_cast<int>(j - h * half);
  const int32_t p = pos[t];
  if (p < 0 || p >= n_pos) return;
  float* v = x + t * s0 + h * s1;
  float* pa = interleaved ? v + 2 * i : v + i;
  float* pb = interleaved ? v + 2 * i + 1 : v + i + half;
  const float c = cos_t[static_cast<int64_t>(p) * half + i];
  const float s = inverse ? -sin_t[static_cast<int64_t>(p) * half + i] : sin_t[static_cast<int64_t>(p) * half + i];
  rotate(*pa, *pb, c, s, pa, pb);
}

// x = rope(src) with rope_kernel's arithmetic (a position outside the table copies the pair as it is),
// x in its own dtype (bf16: the f32 results rounded). kV pairs a thread (pairs kV·g .. kV·g + kV - 1 of a
// row): with kV = 4 the pairs, the table's cos and sin and the results go 16 bytes an access (8 for bf16
// results; the launch checks that half is a multiple of 4 and the alignment). The same arithmetic a
// pair, so the same bits either way.
template <int kV, typename TX>
__global__ void rope_from_kernel(const float* src, int64_t ss0, int64_t ss1, TX* x, int64_t s0, int64_t s1, int64_t m,
                                 int64_t heads, int half, const int32_t* pos, const float* cos_t, const float* sin_t,
                                 int64_t n_pos, bool interleaved, bool inverse) {
  const uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x;  // the launch checks that groups fit in 32 bits
  const uint32_t groups = static_cast<uint32_t>(half) / kV, hg = static_cast<uint32_t>(heads) * groups;
  if (idx >= m * hg) return;
  const uint32_t t = idx / hg, j = idx - t * hg, h = j / groups;
  const int i0 = static_cast<int>(j - h * groups) * kV;
  const float* u = src + t * ss0 + h * ss1;
  TX* v = x + t * s0 + h * s1;
  float ra[kV], rb[kV];
  if (interleaved) {  // pairs (a, b) side by side: two accesses hold the kV pairs
    float f[2 * kV];
    loadv<kV>(u + 2 * i0, f);
    loadv<kV>(u + 2 * i0 + kV, f + kV);
#pragma unroll
    for (int e = 0; e < kV; ++e) ra[e] = f[2 * e], rb[e] = f[2 * e + 1];
  } else {
    loadv<kV>(u + i0, ra);
    loadv<kV>(u + i0 + half, rb);
  }
  const int32_t p = pos[t];
  if (p >= 0 && p < n_pos) {
    float c[kV], sn[kV];
    loadv<kV>(cos_t + static_cast<int64_t>(p) * half + i0, c);
    loadv<kV>(sin_t + static_cast<int64_t>(p) * half + i0, sn);
#pragma unroll
    for (int e = 0; e < kV; ++e) rotate(ra[e], rb[e], c[e], inverse ? -sn[e] : sn[e], &ra[e], &rb[e]);
  }
  if (interleaved) {
    float f[2 * kV];
#pragma unroll
    for (int e = 0; e < kV; ++e) f[2 * e] = ra[e], f[2 * e + 1] = rb[e];
    storev<kV>(v + 2 * i0, f);
    storev<kV>(v + 2 * i0 + kV, f + kV);
  } else {
    storev<kV>(v + i0, ra);
    storev<kV>(v + i0 + half, rb);
  }
}

// pool[slots[i]] = [rmsnorm(ckv[i, :r]) · w | rope(ckv[i, r:])] with the arithmetic of
// rmsnorm_forward_kernel, rope_from_kernel and the scatter after them (the same bits). One block a row.
// With q (mla_step_inputs), the block also rotates its row's query rope parts into q_rot, as
// rope_from_kernel does, and rounds their nope parts into q_nope.
struct StepQueries {
  const float* q = nullptr;  // [N, heads, nope + rope], row and head strides
  int64_t q0, q1;
  float* rot;  // [N, heads, rope]
  int64_t r0, r1;
  __nv_bfloat16* nope_out;  // [N, heads, nope]
  int64_t n0, n1;
  int heads, nope;
};
// An fp8 latent row (core/latent_rows.h) from its f32 values vals [r + rd] (shared memory, written and
// synchronised by the block before), as quantize_fp8_latent_row makes it: a warp a tile of 64 values,
// its scale the smallest power of two that fits their largest magnitude, each value rounded to E4M3
// (nearest even, saturated); the rope key rounded to bf16; zeros to the row's end.
__device__ void put_fp8_latent_row(const float* vals, const Fp8LatentRow& f, uint8_t* out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t t = warp; t < f.tiles(); t += warps) {
    const float a = vals[t * kFp8LatentTile + lane], b = vals[t * kFp8LatentTile + 32 + lane];
    float amax = fmaxf(fabsf(a), fabsf(b));
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const int k = fp8_scale_exponent(amax);
    const float inv = exp2_int(-k);
    out[t * kFp8LatentTile + lane] = __nv_cvt_float_to_fp8(a * inv, __NV_SATFINITE, __NV_E4M3);
    out[t * kFp8LatentTile + 32 + lane] = __nv_cvt_float_to_fp8(b * inv, __NV_SATFINITE, __NV_E4M3);
    if (lane == 0) reinterpret_cast<float*>(out + f.scales_offset())[t] = exp2_int(k);
  }
  __nv_bfloat16* pe = reinterpret_cast<__nv_bfloat16*>(out + f.rope_offset());
  for (int64_t i = threadIdx.x; i < f.rd; i += blockDim.x) pe[i] = __float2bfloat16(vals[f.r + i]);
  for (int64_t i = f.scales_offset() + 4 * f.tiles() + threadIdx.x; i < f.bytes(); i += blockDim.x) out[i] = 0;
}

// The widest fp8 latent row a block stages in shared memory (r + rd f32 values).
constexpr int kFp8RowValues = 1024;

// pool[rows[i]] = src[i] as an fp8 latent row: block i.
__global__ void scatter_fp8_kernel(const float* src, int64_t lds, const int32_t* rows, uint8_t* pool, int64_t ldp,
                                   int64_t pool_rows, Fp8LatentRow f) {
  __shared__ float vals[kFp8RowValues];
  const int64_t row = rows[blockIdx.x];
  if (row < 0 || row >= pool_rows) return;  // the whole block alike
  for (int64_t i = threadIdx.x; i < f.r + f.rd; i += blockDim.x) vals[i] = src[blockIdx.x * lds + i];
  __syncthreads();
  put_fp8_latent_row(vals, f, pool + row * ldp);
}

// TP: a pool row's element type: float or bf16 values, or uint8_t for fp8 rows.
// Reads come before writes: the compiler cannot tell the writes' memory from the reads', so a read
// placed after a write waits for it to land. So a thread first reads its first kBatch latent values and
// weights and its share of the rope key, then the queries in batches of kBatch items a kind (each
// batch's reads, then its writes), and writes the latent row last: a decode step's row is about two
// trips to memory rather than one a loop iteration.
template <typename TP>
__global__ void store_latents_kernel(const float* ckv, int64_t ldc, int r, int rd, const float* w, float eps,
                                     const int32_t* pos, const float* cos_t, const float* sin_t, int64_t n_pos,
                                     bool interleaved, const int32_t* slots, TP* pool, int64_t ldp,
                                     int64_t pool_rows, StepQueries sq) {
  constexpr int kBatch = 4;
  const int tid = threadIdx.x, threads = blockDim.x, half = rd / 2;
  const int32_t p = pos[blockIdx.x];
  const int64_t slot = slots[blockIdx.x];
  const float* x = ckv + blockIdx.x * ldc;
  const bool rotated = p >= 0 && p < n_pos;
  const auto pair = [&](int i, int* ia, int* ib) {  // the rope pair i's two elements
    *ia = interleaved ? 2 * i : i;
    *ib = interleaved ? 2 * i + 1 : i + half;
  };
  float xv[kBatch], wv[kBatch];  // x[i], w[i] for i = tid + u · threads
#pragma unroll
  for (int u = 0; u < kBatch; ++u) {
    const int i = tid + u * threads;
    if (i < r) xv[u] = x[i], wv[u] = w[i];
  }
  float ka = 0, kb = 0, kc = 1, ks = 0;  // the rope key's pair tid (tid < half) and its cos and sin
  if (tid < half) {
    int ia, ib;
    pair(tid, &ia, &ib);
    ka = x[r + ia], kb = x[r + ib];
    if (rotated) kc = cos_t[static_cast<int64_t>(p) * half + tid], ks = sin_t[static_cast<int64_t>(p) * half + tid];
  }
  if (sq.q) {
    // Items: the rope pairs (head, i) of q into q_rot, and the nope values (head, i) into q_nope.
    const float* qr = sq.q + blockIdx.x * sq.q0;
    const int n_rot = sq.heads * half, n_nope = sq.heads * sq.nope;
    for (int b0 = 0; b0 < max(n_rot, n_nope); b0 += kBatch * threads) {
      float qa[kBatch], qb[kBatch], qc[kBatch], qs[kBatch], nv[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int idx = b0 + tid + u * threads;
        if (idx < n_rot) {
          const int h = idx / half, i = idx % half;
          int ia, ib;
          pair(i, &ia, &ib);
          qa[u] = qr[h * sq.q1 + sq.nope + ia], qb[u] = qr[h * sq.q1 + sq.nope + ib];
          if (rotated)
            qc[u] = cos_t[static_cast<int64_t>(p) * half + i], qs[u] = sin_t[static_cast<int64_t>(p) * half + i];
        }
        if (idx < n_nope) nv[u] = qr[idx / sq.nope * sq.q1 + idx % sq.nope];
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int idx = b0 + tid + u * threads;
        if (idx < n_rot) {
          const int h = idx / half;
          int ia, ib;
          pair(idx % half, &ia, &ib);
          float* v = sq.rot + blockIdx.x * sq.r0 + h * sq.r1;
          if (rotated) {
            rotate(qa[u], qb[u], qc[u], qs[u], v + ia, v + ib);
          } else {
            v[ia] = qa[u];
            v[ib] = qb[u];
          }
        }
        if (idx < n_nope)
          sq.nope_out[blockIdx.x * sq.n0 + idx / sq.nope * sq.n1 + idx % sq.nope] = __float2bfloat16(nv[u]);
      }
    }
  }
  // The norm: each thread sums its elements in order (as rmsnorm_forward_kernel does: the same bits);
  // a latent longer than kBatch · threads reads the rest here.
  float ss = 0;
#pragma unroll
  for (int u = 0; u < kBatch; ++u)
    if (tid + u * threads < r) ss += xv[u] * xv[u];
  for (int i = tid + kBatch * threads; i < r; i += threads) ss += x[i] * x[i];
  const float rs = rsqrtf(block_sum(ss) / r + eps);
  if (slot < 0 || slot >= pool_rows) return;
  // fp8 rows: the values go through shared memory, then into the row's format.
  constexpr bool kFp8 = std::is_same_v<TP, uint8_t>;
  [[maybe_unused]] float* staged = nullptr;
  if constexpr (kFp8) {
    __shared__ float vals[kFp8RowValues];
    staged = vals;
  }
  TP* out = pool + slot * ldp;
  const auto put = [&](int i, float v) {
    if constexpr (kFp8) {
      staged[i] = v;
    } else {
      store(out + i, v);
    }
  };
#pragma unroll
  for (int u = 0; u < kBatch; ++u) {
    const int i = tid + u * threads;
    if (i < r) put(i, wv[u] * (xv[u] * rs));
  }
  for (int i = tid + kBatch * threads; i < r; i += threads) put(i, w[i] * (x[i] * rs));
  for (int i = tid; i < half; i += threads) {  // tid < half: the pair read above; past threads, read here
    int ia, ib;
    pair(i, &ia, &ib);
    float a = ka, b = kb;
    if (i != tid) {
      a = x[r + ia], b = x[r + ib];
      if (rotated) kc = cos_t[static_cast<int64_t>(p) * half + i], ks = sin_t[static_cast<int64_t>(p) * half + i];
    }
    if (rotated) rotate(a, b, kc, ks, &a, &b);
    put(r + ia, a);
    put(r + ib, b);
  }
  if constexpr (kFp8) {
    __syncthreads();
    put_fp8_latent_row(staged, Fp8LatentRow{r, rd}, reinterpret_cast<uint8_t*>(out));
  }
}

template <typename F>
void dispatch(DType dtype, F f) {
  if (dtype == DType::kF32) {
    f(static_cast<float*>(nullptr));
  } else if (dtype == DType::kBF16) {
    f(static_cast<__nv_bfloat16*>(nullptr));
  } else {
    CHECK(false) << "unsupported activation dtype " << dtype_name(dtype);
  }
}

// f(in tag, out tag) for an op whose output may be rounded to bf16 while its input is f32.
template <typename F>
void dispatch2(DType in, DType out, F f) {
  dispatch(in, [&](auto* ti) { dispatch(out, [&](auto* to) { f(ti, to); }); });
}

// An op's optional extra output (a copy of an input or a result, in `dtype`): its rows, checked to be
// shaped as `like`; null p where there is none.
Rows optional_rows(const Tensor* t, DType dtype, const Rows& like, const char* what) {
  Rows r{nullptr, like.rows, like.cols, 0};
  if (t == nullptr) return r;
  check_device(*t, dtype);
  r = rows_of(*t);
  CHECK(r.rows == like.rows && r.cols == like.cols) << what << " " << shape_str(t->shape());
  return r;
}

}  // namespace

void CudaBackend::rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd,
                                  Tensor* x_rounded) {
  const Rows X = rows_of(x), Y = rows_of(y);
  CHECK(x_rounded == nullptr || x.dtype() == DType::kF32) << "rmsnorm_forward: a bf16 copy of an f32 x";
  const Rows XO = optional_rows(x_rounded, DType::kBF16, X, "rmsnorm_forward: x_rounded");
  check_device(y, y.dtype());
  check_device(w, DType::kF32);
  check_device(rstd, DType::kF32);
  CHECK(x.dtype() == y.dtype() || y.dtype() == DType::kBF16)
      << "rmsnorm of " << dtype_name(x.dtype()) << " into " << dtype_name(y.dtype());
  CHECK_EQ(w.numel(), X.cols);
  CHECK_EQ(rstd.numel(), X.rows);
  CHECK(X.rows == Y.rows && X.cols == Y.cols);
  if (X.rows == 0) return;
  Op op(this, "rmsnorm", 4.0 * X.rows * X.cols,
        1.0 * X.rows * X.cols * (dtype_size(x.dtype()) + dtype_size(y.dtype()) + (XO.p ? 2 : 0)));
  dispatch2(x.dtype(), y.dtype(), [&](auto* ti, auto* to) {
    using T = std::remove_pointer_t<decltype(ti)>;
    using TY = std::remove_pointer_t<decltype(to)>;
    with_norm_blocks<kNormVirt>(X.rows, X.cols, [&](auto keep, auto virt) {
      rmsnorm_forward_kernel<T, TY, decltype(keep)::value, decltype(virt)::value>
          <<<static_cast<unsigned>(X.rows), kNormThreads / virt, 0, stream()>>>(
              static_cast<const T*>(X.p), X.ld, w.f32(), eps, static_cast<TY*>(Y.p), Y.ld, rstd.f32(),
              static_cast<int>(X.cols), static_cast<__nv_bfloat16*>(XO.p), XO.ld);
    });
  });
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::add_rmsnorm_forward(const Tensor& x, Tensor& h, const Tensor& w, float eps, Tensor& y,
                                      Tensor& rstd, Tensor* h_rounded) {
  const Rows X = rows_of(x), H = rows_of(h), Y = rows_of(y);
  const Rows HO = optional_rows(h_rounded, DType::kBF16, H, "add_rmsnorm_forward: h_rounded");
  check_device(x, DType::kF32);
  check_device(h, DType::kF32);
  check_device(y, y.dtype());
  check_device(w, DType::kF32);
  check_device(rstd, DType::kF32);
  CHECK(X.rows == H.rows && X.cols == H.cols && Y.rows == H.rows && Y.cols == H.cols)
      << shape_str(x.shape()) << ", " << shape_str(h.shape()) << ", " << shape_str(y.shape());
  CHECK_EQ(w.numel(), H.cols);
  CHECK_EQ(rstd.numel(), H.rows);
  if (H.rows == 0) return;
  Op op(this, "add_rmsnorm", 5.0 * H.rows * H.cols,
        1.0 * H.rows * H.cols * (12 + dtype_size(y.dtype()) + (HO.p ? 2 : 0)));
  dispatch(y.dtype(), [&](auto* to) {
    using TY = std::remove_pointer_t<decltype(to)>;
    with_norm_blocks<kAddNormVirt>(H.rows, H.cols, [&](auto keep, auto virt) {
      add_rmsnorm_forward_kernel<TY, decltype(keep)::value, float, decltype(virt)::value>
          <<<static_cast<unsigned>(H.rows), kNormThreads / virt, 0, stream()>>>(
              X.f(), X.ld, H.f(), H.ld, w.f32(), eps, static_cast<TY*>(Y.p), Y.ld, rstd.f32(),
              static_cast<int>(H.cols), Routed<float>{}, static_cast<__nv_bfloat16*>(HO.p), HO.ld);
    });
  });
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx,
                                   Tensor& dw, Tensor* dx_rounded) {
  const Rows G = rows_of(dy), X = rows_of(x), D = rows_of(dx);
  check_device(dy, dy.dtype());
  check_device(dx, dy.dtype());
  CHECK(x.dtype() == dy.dtype() || x.dtype() == DType::kBF16)
      << "rmsnorm_backward: x of " << dtype_name(x.dtype()) << " for dy of " << dtype_name(dy.dtype());
  check_device(x, x.dtype());
  check_device(w, DType::kF32);
  check_device(dw, DType::kF32);
  check_device(rstd, DType::kF32);
  CHECK(G.rows == X.rows && D.rows == X.rows && G.cols == X.cols && D.cols == X.cols);
  const int64_t rows = X.rows;
  const int d = static_cast<int>(X.cols);
  CHECK(dx_rounded == nullptr || dx.dtype() == DType::kF32) << "rmsnorm_backward: a bf16 copy of an f32 dx";
  const Rows R = optional_rows(dx_rounded, DType::kBF16, X, "rmsnorm_backward: dx_rounded");
  if (rows == 0) return;
  Op op(this, "rmsnorm_backward", 10.0 * rows * d,
        1.0 * rows * d * (3.0 * dtype_size(dy.dtype()) + dtype_size(x.dtype())) + 2.0 * (R.p ? rows * d : 0));
  const size_t es = dtype_size(dy.dtype());
  if (d % 128 == 0 && d <= 1024 && rows_by4(G.p, d, G.ld, es) && rows_by4(X.p, d, X.ld, dtype_size(x.dtype())) &&
      rows_by4(D.p, d, D.ld, es) && (R.p == nullptr || rows_by4(R.p, d, R.ld, 2))) {
    const int64_t nb = (rows + kNormRows - 1) / kNormRows;
    Tensor partial = uncleared({nb, d}, DType::kF32);
    dispatch2(dy.dtype(), x.dtype(), [&](auto* tag, auto* xtag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using TX = std::remove_pointer_t<decltype(xtag)>;
      const auto launch = [&](auto v4) {
        rmsnorm_backward_fused_kernel<T, TX, decltype(v4)::value><<<static_cast<unsigned>(nb), kThreads, 0, stream()>>>(
            static_cast<const T*>(G.p), G.ld, static_cast<const TX*>(X.p), X.ld, w.f32(), rstd.f32(),
            static_cast<T*>(D.p), D.ld, rows, partial.f32(), static_cast<__nv_bfloat16*>(R.p), R.ld);
      };
      switch (d / 128) {
        case 1: launch(std::integral_constant<int, 1>()); break;
        case 2: launch(std::integral_constant<int, 2>()); break;
        case 3: launch(std::integral_constant<int, 3>()); break;
        case 4: launch(std::integral_constant<int, 4>()); break;
        case 5: launch(std::integral_constant<int, 5>()); break;
        case 6: launch(std::integral_constant<int, 6>()); break;
        case 7: launch(std::integral_constant<int, 7>()); break;
        default: launch(std::integral_constant<int, 8>()); break;
      }
    });
    column_sum_kernel<<<blocks(d, kThreads), kThreads, 0, stream()>>>(partial.f32(), static_cast<int>(nb), d,
                                                                       dw.f32());
    CUDA_CHECK(cudaGetLastError());
    return;
  }
  const int64_t splits = std::min<int64_t>(std::max<int64_t>(1, rows / 64), 128);
  const int64_t per_split = (rows + splits - 1) / splits;
  Tensor partial = zeros({splits, d}, DType::kF32);
  dispatch2(dy.dtype(), x.dtype(), [&](auto* tag, auto* xtag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using TX = std::remove_pointer_t<decltype(xtag)>;
    rmsnorm_backward_dx_kernel<T, TX><<<static_cast<unsigned>(rows), kThreads, 0, stream()>>>(
        static_cast<const T*>(G.p), G.ld, static_cast<const TX*>(X.p), X.ld, w.f32(), rstd.f32(),
        static_cast<T*>(D.p), D.ld, d);
    rmsnorm_dw_partial_kernel<T, TX>
        <<<dim3(blocks(d, kThreads), static_cast<unsigned>(splits)), kThreads, 0, stream()>>>(
            static_cast<const T*>(G.p), G.ld, static_cast<const TX*>(X.p), X.ld, rstd.f32(), rows, d, per_split,
            partial.f32());
  });
  column_sum_kernel<<<blocks(d, kThreads), kThreads, 0, stream()>>>(partial.f32(), static_cast<int>(splits), d,
                                                                     dw.f32());
  CUDA_CHECK(cudaGetLastError());
  if (dx_rounded != nullptr) copy(dx, *dx_rounded);
}

void CudaBackend::silu_mul_forward(const Tensor& gu, Tensor& h) {
  const Rows GU = rows_of(gu), H = rows_of(h);
  check_device(h, h.dtype());
  CHECK(gu.dtype() == h.dtype() || h.dtype() == DType::kBF16)
      << "silu_mul of " << dtype_name(gu.dtype()) << " into " << dtype_name(h.dtype());
  CHECK_EQ(GU.cols, 2 * H.cols);
  CHECK_EQ(GU.rows, H.rows);
  const int64_t n = H.rows * H.cols;
  if (n == 0) return;
  Op op(this, "silu_mul", 5.0 * n, 1.0 * n * (2 * dtype_size(gu.dtype()) + dtype_size(h.dtype())));
  dispatch2(gu.dtype(), h.dtype(), [&](auto* ti, auto* to) {
    using T = std::remove_pointer_t<decltype(ti)>;
    using TH = std::remove_pointer_t<decltype(to)>;
    const bool by4 = rows_by4(GU.p, H.cols, GU.ld, sizeof(T)) && rows_by4(H.p, H.cols, H.ld, sizeof(TH));
    if (by4)
      silu_mul_forward_kernel<T, TH, 4><<<blocks(n / 4, kThreads), kThreads, 0, stream()>>>(
          static_cast<const T*>(GU.p), GU.ld, static_cast<TH*>(H.p), H.ld, H.rows, static_cast<int>(H.cols));
    else
      silu_mul_forward_kernel<T, TH, 1><<<blocks(n, kThreads), kThreads, 0, stream()>>>(
          static_cast<const T*>(GU.p), GU.ld, static_cast<TH*>(H.p), H.ld, H.rows, static_cast<int>(H.cols));
  });
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::silu_mul_backward(const Tensor& dh, const Tensor& gu, Tensor& dgu, Tensor* h) {
  const Rows DH = rows_of(dh), GU = rows_of(gu), DG = rows_of(dgu);
  const Rows HO = optional_rows(h, gu.dtype(), DH, "silu_mul_backward: h");
  check_device(dh, dh.dtype());
  check_device(gu, gu.dtype());
  check_device(dgu, dgu.dtype());
  CHECK(dgu.dtype() == DType::kF32 || dgu.dtype() == DType::kBF16)
      << "silu_mul_backward into " << dtype_name(dgu.dtype());
  CHECK(dh.dtype() == gu.dtype() || (dh.dtype() == DType::kF32 && gu.dtype() == DType::kBF16))
      << "silu_mul_backward: dh " << dtype_name(dh.dtype()) << " with gu " << dtype_name(gu.dtype());
  CHECK_EQ(GU.cols, 2 * DH.cols);
  CHECK_EQ(DG.cols, 2 * DH.cols);
  CHECK(GU.rows == DH.rows && DG.rows == DH.rows);
  const int64_t n = DH.rows * DH.cols;
  if (n == 0) return;
  Op op(this, "silu_mul_backward", (h ? 16.0 : 12.0) * n,
        1.0 * n * (dtype_size(dh.dtype()) + (h ? 3 : 2) * dtype_size(gu.dtype()) + 2 * dtype_size(dgu.dtype())));
  dispatch(dh.dtype(), [&](auto* th) {
    dispatch2(gu.dtype(), dgu.dtype(), [&](auto* ti, auto* to) {
      using TH = std::remove_pointer_t<decltype(th)>;
      using T = std::remove_pointer_t<decltype(ti)>;
      using TD = std::remove_pointer_t<decltype(to)>;
      const bool by4 = rows_by4(DH.p, DH.cols, DH.ld, sizeof(TH)) && rows_by4(GU.p, DH.cols, GU.ld, sizeof(T)) &&
                       rows_by4(DG.p, DH.cols, DG.ld, sizeof(TD)) &&
                       (HO.p == nullptr || rows_by4(HO.p, DH.cols, HO.ld, sizeof(T)));
      if (by4)
        silu_mul_backward_kernel<TH, T, TD, 4><<<blocks(n / 4, kThreads), kThreads, 0, stream()>>>(
            static_cast<const TH*>(DH.p), DH.ld, static_cast<const T*>(GU.p), GU.ld, static_cast<TD*>(DG.p), DG.ld,
            DH.rows, static_cast<int>(DH.cols), static_cast<T*>(HO.p), HO.ld);
      else
        silu_mul_backward_kernel<TH, T, TD, 1><<<blocks(n, kThreads), kThreads, 0, stream()>>>(
            static_cast<const TH*>(DH.p), DH.ld, static_cast<const T*>(GU.p), GU.ld, static_cast<TD*>(DG.p), DG.ld,
            DH.rows, static_cast<int>(DH.cols), static_cast<T*>(HO.p), HO.ld);
    });
  });
  CUDA_CHECK(cudaGetLastError());
}

namespace {

// rope's operands checked: x [M, H, D] f32 (D even, the last dimension contiguous), positions [M] I32,
// a table of D / 2 columns. Returns the pairs to rotate, M·H·D/2.
int64_t check_rope(const Tensor& x, const Tensor& positions, const RopeTable& table) {
  CHECK_EQ(x.dim(), 3) << "rope takes [M, H, D]";
  CHECK_EQ(x.stride(2), 1);
  check_device(x, DType::kF32);
  check_device(positions, DType::kI32);
  check_device(table.cos, DType::kF32);
  const int64_t m = x.size(0), d = x.size(2);
  CHECK_EQ(d % 2, 0);
  CHECK_EQ(table.cos.size(1), d / 2);
  CHECK_EQ(positions.numel(), m);
  const int64_t pairs = m * x.size(1) * (d / 2);
  CHECK_LE(pairs, int64_t{1} << 31) << "rope over " << pairs << " pairs (the kernels index them in 32 bits)";
  return pairs;
}

}  // namespace

void CudaBackend::rope_from(const Tensor& src, Tensor& x, const Tensor& positions, const RopeTable& table,
                            bool interleaved, bool inverse) {
  const bool x16 = x.dtype() == DType::kBF16;
  const int64_t n = check_rope(src, positions, table);
  if (x16) {
    check_device(x, DType::kBF16);
    CHECK(x.dim() == 3 && x.stride(2) == 1) << "rope_from into " << shape_str(x.shape());
  } else {
    check_rope(x, positions, table);
  }
  CHECK(src.shape() == x.shape()) << shape_str(src.shape()) << " vs " << shape_str(x.shape());
  const int64_t m = x.size(0), h = x.size(1), half = x.size(2) / 2;
  if (n == 0) return;
  Op op(this, "rope", 6.0 * n, (x16 ? 16.0 : 24.0) * n);
  // Four pairs a thread where the rows, the table and the results allow 16-byte (bf16: 8-byte) accesses.
  const auto by4 = [](const Tensor& t, size_t elem) {
    return t.stride(0) % 4 == 0 && t.stride(1) % 4 == 0 && reinterpret_cast<uintptr_t>(t.raw()) % (4 * elem) == 0;
  };
  const bool four = half % 4 == 0 && by4(src, 4) && by4(x, x16 ? 2 : 4) &&
                    reinterpret_cast<uintptr_t>(table.cos.raw()) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(table.sin.raw()) % 16 == 0;
  const auto launch = [&](auto* xp) {
    const auto kernel = [&](auto v) {
      constexpr int kV = decltype(v)::value;
      rope_from_kernel<kV><<<blocks(n / kV, kThreads), kThreads, 0, stream()>>>(
          src.f32(), src.stride(0), src.stride(1), xp, x.stride(0), x.stride(1), m, h, static_cast<int>(half),
          positions.data<int32_t>(), table.cos.f32(), table.sin.f32(), table.cos.size(0), interleaved, inverse);
    };
    if (four)
      kernel(std::integral_constant<int, 4>{});
    else
      kernel(std::integral_constant<int, 1>{});
  };
  if (x16)
    launch(static_cast<__nv_bfloat16*>(x.raw()));
  else
    launch(x.f32());
  CUDA_CHECK(cudaGetLastError());
}

namespace {

// store_latents' operands: ckv [N, r + rope] f32 rows, w [r], positions and slots [N], pool rows as wide.
void check_store_latents(const Tensor& ckv, const Tensor& w, const Tensor& positions, const RopeTable& table,
                         const Tensor& slots, const Tensor& pool) {
  check_device(ckv, DType::kF32);
  check_device(w, DType::kF32);
  check_device(positions, DType::kI32);
  check_device(slots, DType::kI32);
  check_device(table.cos, DType::kF32);
  check_device(pool, pool.dtype());
  const Rows C = rows_of(ckv), P = rows_of(pool);
  const int64_t n = C.rows, r = w.numel(), rd = C.cols - r;
  CHECK(r > 0 && rd >= 0 && rd % 2 == 0) << "latent of " << r << " and a rope key of " << rd;
  if (pool.dtype() == DType::kU8) {
    const Fp8LatentRow f{r, rd};
    CHECK(Fp8LatentRow::fits(r, rd) && r + rd <= kFp8RowValues)
        << "fp8 latent rows of a latent of " << r << " and a rope key of " << rd;
    CHECK(pool.is_contiguous() && P.cols == f.bytes()) << "fp8 latent pool rows of " << f.bytes() << " bytes";
  } else {
    CHECK_EQ(P.cols, C.cols) << "pool rows of the latent row's width";
  }
  CHECK(positions.numel() == n && slots.numel() == n);
  CHECK(rd == 0 || table.cos.size(1) == rd / 2);
}

// f(tag) with a null pointer of the pool's element type: float, bf16, or uint8_t for fp8 rows.
template <typename F>
void dispatch_pool(DType dtype, F f) {
  if (dtype == DType::kU8) {
    f(static_cast<uint8_t*>(nullptr));
  } else {
    dispatch(dtype, f);
  }
}

}  // namespace

void CudaBackend::store_latents(const Tensor& ckv, const Tensor& w, float eps, const Tensor& positions,
                                const RopeTable& table, bool interleaved, const Tensor& slots, Tensor& pool) {
  const Rows C = rows_of(ckv), P = rows_of(pool);
  check_store_latents(ckv, w, positions, table, slots, pool);
  const int64_t n = C.rows, r = w.numel(), rd = C.cols - r;
  if (n == 0) return;
  Op op(this, "store_latents", 6.0 * n * C.cols, 4.0 * n * C.cols + 1.0 * n * P.cols * dtype_size(pool.dtype()));
  dispatch_pool(pool.dtype(), [&](auto* tag) {
    using TP = std::remove_pointer_t<decltype(tag)>;
    store_latents_kernel<TP><<<static_cast<unsigned>(n), kNormThreads, 0, stream()>>>(
        C.f(), C.ld, static_cast<int>(r), static_cast<int>(rd), w.f32(), eps, positions.data<int32_t>(),
        table.cos.f32(), table.sin.f32(), table.cos.size(0), interleaved, slots.data<int32_t>(),
        static_cast<TP*>(P.p), P.ld, P.rows, StepQueries{});
  });
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::mla_step_inputs(const Tensor& ckv, const Tensor& w, float eps, const Tensor& positions,
                                  const RopeTable& table, bool interleaved, const Tensor& slots, Tensor& pool,
                                  const Tensor& q, Tensor& q_rot, Tensor& q_nope) {
  const Rows C = rows_of(ckv), P = rows_of(pool);
  const int64_t n = C.rows, r = w.numel(), rd = C.cols - r;
  if (q_nope.dtype() != DType::kBF16 || n == 0) {
    Backend::mla_step_inputs(ckv, w, eps, positions, table, interleaved, slots, pool, q, q_rot, q_nope);
    return;
  }
  check_store_latents(ckv, w, positions, table, slots, pool);
  check_device(q, DType::kF32);
  check_device(q_rot, DType::kF32);
  check_device(q_nope, DType::kBF16);
  CHECK(q.dim() == 3 && q_rot.dim() == 3 && q_nope.dim() == 3);
  const int64_t heads = q.size(1), nope = q_nope.size(2);
  CHECK(q.size(0) == n && q_rot.size(0) == n && q_nope.size(0) == n && q_rot.size(1) == heads &&
        q_nope.size(1) == heads && q_rot.size(2) == rd && q.size(2) == nope + rd)
      << "queries " << shape_str(q.shape()) << " into " << shape_str(q_rot.shape()) << " and "
      << shape_str(q_nope.shape()) << " with a rope key of " << rd;
  CHECK(q.stride(2) == 1 && q_rot.stride(2) == 1 && q_nope.stride(2) == 1) << "rows with contiguous last dimensions";
  Op op(this, "mla_step_inputs", 6.0 * n * (C.cols + heads * rd),
        4.0 * n * C.cols + 1.0 * n * P.cols * dtype_size(pool.dtype()) + 6.0 * n * heads * (nope + 2 * rd));
  const StepQueries sq{q.f32(),   q.stride(0),     q.stride(1), q_rot.f32(), q_rot.stride(0),
                       q_rot.stride(1), static_cast<__nv_bfloat16*>(q_nope.raw()), q_nope.stride(0), q_nope.stride(1),
                       static_cast<int>(heads), static_cast<int>(nope)};
  dispatch_pool(pool.dtype(), [&](auto* tag) {
    using TP = std::remove_pointer_t<decltype(tag)>;
    store_latents_kernel<TP><<<static_cast<unsigned>(n), kNormThreads, 0, stream()>>>(
        C.f(), C.ld, static_cast<int>(r), static_cast<int>(rd), w.f32(), eps, positions.data<int32_t>(),
        table.cos.f32(), table.sin.f32(), table.cos.size(0), interleaved, slots.data<int32_t>(),
        static_cast<TP*>(P.p), P.ld, P.rows, sq);
  });
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::scatter_fp8_latents(const Tensor& src, int64_t r, const Tensor& rows, Tensor& pool) {
  const Rows S = rows_of(src);
  check_device(src, DType::kF32);
  check_device(rows, DType::kI32);
  check_device(pool, DType::kU8);
  const Fp8LatentRow f{r, S.cols - r};
  CHECK(Fp8LatentRow::fits(f.r, f.rd) && S.cols <= kFp8RowValues)
      << "fp8 latent rows of a latent of " << f.r << " and a rope key of " << f.rd;
  CHECK(pool.dim() == 2 && pool.is_contiguous() && pool.size(1) == f.bytes())
      << "fp8 latent pool " << shape_str(pool.shape()) << " for rows of " << f.bytes() << " bytes";
  CHECK_EQ(rows.numel(), S.rows);
  if (S.rows == 0) return;
  Op op(this, "scatter_fp8_latents", 0, (4.0 * S.cols + f.bytes()) * S.rows);
  scatter_fp8_kernel<<<static_cast<unsigned>(S.rows), kThreads, 0, stream()>>>(
      S.f(), S.ld, rows.data<int32_t>(), pool.data<uint8_t>(), f.bytes(), pool.size(0), f);
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::moe_combine_add_rmsnorm(const Tensor& ys, const Tensor& weights, const Tensor& row_of,
                                          const Tensor& x, Tensor& h, const Tensor& w, float eps, Tensor& y,
                                          Tensor& rstd, Tensor* h_rounded) {
  const Rows X = rows_of(x), H = rows_of(h), Y = rows_of(y), S = rows_of(ys);
  const Rows HO = optional_rows(h_rounded, DType::kBF16, H, "moe_combine_add_rmsnorm: h_rounded");
  check_device(x, DType::kF32);
  check_device(h, DType::kF32);
  check_device(y, y.dtype());
  check_device(w, DType::kF32);
  check_device(rstd, DType::kF32);
  check_device(weights, DType::kF32);
  check_device(row_of, DType::kI32);
  CHECK(ys.dtype() == DType::kF32 || ys.dtype() == DType::kBF16) << "moe_combine of " << dtype_name(ys.dtype());
  CHECK(X.rows == H.rows && X.cols == H.cols && Y.rows == H.rows && Y.cols == H.cols && S.cols == H.cols)
      << shape_str(x.shape()) << ", " << shape_str(h.shape()) << ", " << shape_str(y.shape()) << ", "
      << shape_str(ys.shape());
  CHECK(weights.dim() == 2 && weights.is_contiguous() && weights.size(0) == H.rows && row_of.is_contiguous() &&
        row_of.numel() == weights.numel())
      << "routing " << shape_str(weights.shape()) << " and " << shape_str(row_of.shape()) << " for " << H.rows
      << " rows";
  CHECK_EQ(w.numel(), H.cols);
  CHECK_EQ(rstd.numel(), H.rows);
  if (H.rows == 0) return;
  const int64_t k = weights.size(1);
  Op op(this, "moe_combine_add_rmsnorm", (5.0 + 2 * k) * H.rows * H.cols,
        1.0 * H.rows * H.cols * (12 + dtype_size(y.dtype()) + k * dtype_size(ys.dtype()) + (HO.p ? 2 : 0)));
  dispatch(y.dtype(), [&](auto* to) {
    using TY = std::remove_pointer_t<decltype(to)>;
    dispatch(ys.dtype(), [&](auto* ts) {
      using TS = std::remove_pointer_t<decltype(ts)>;
      const Routed<TS> routed{static_cast<const TS*>(S.p), S.ld, weights.f32(), row_of.data<int32_t>(), k};
      with_norm_blocks<kAddNormVirt>(H.rows, H.cols, [&](auto keep, auto virt) {
        add_rmsnorm_forward_kernel<TY, decltype(keep)::value, TS, decltype(virt)::value>
            <<<static_cast<unsigned>(H.rows), kNormThreads / virt, 0, stream()>>>(
                X.f(), X.ld, H.f(), H.ld, w.f32(), eps, static_cast<TY*>(Y.p), Y.ld, rstd.f32(),
                static_cast<int>(H.cols), routed, static_cast<__nv_bfloat16*>(HO.p), HO.ld);
      });
    });
  });
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::rope(Tensor& x, const Tensor& positions, const RopeTable& table, bool interleaved, bool inverse) {
  const int64_t n = check_rope(x, positions, table);
  const int64_t m = x.size(0), h = x.size(1), half = x.size(2) / 2;
  if (n == 0) return;
  Op op(this, "rope", 6.0 * n, 16.0 * n);
  rope_kernel<<<blocks(n, kThreads), kThreads, 0, stream()>>>(x.f32(), x.stride(0), x.stride(1), m, h,
                                                               static_cast<int>(half), positions.data<int32_t>(),
                                                               table.cos.f32(), table.sin.f32(), table.cos.size(0),
                                                               interleaved, inverse);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace r1lab::core::cuda
