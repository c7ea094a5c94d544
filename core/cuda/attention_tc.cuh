// Tensor-core (bf16 WMMA, fp32 accumulation) flash attention, forward and backward: included by
// attention.cu, which owns Dims and picks these kernels when reduced-precision products are enabled.
//
// A block is 4 warps; a warp owns 16 rows (queries, or keys in dk/dv) of a 64-row tile, and every tile
// of 64 keys (or queries) is staged in shared memory as bf16. Products are 16×16×16 WMMA steps; the
// softmax, masks and rescaling run in fp32 on the score tiles in shared memory; the output accumulator
// of the forward pass lives in shared memory so that each row can be rescaled by its new maximum.
#include <mma.h>

#include <cuda_bf16.h>

namespace tc {

using namespace nvcuda;
using bf16 = __nv_bfloat16;
constexpr int kRowsT = 64;  // rows of a tile
constexpr int kThreadsT = 128;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragBr = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
using FragBc = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

template <int D, int DV>
struct Layout {
  static constexpr int LQ = D + 8, LV = DV + 8, LS = kRowsT + 4, LP = kRowsT + 8, LO = (D > DV ? D : DV) + 4;
};

// rows [r0, r0 + 64) of a strided f32 matrix (row stride ld) -> bf16 tile [64][L]; rows ≥ n are zero.
// Every thread first issues all its 16-byte loads, then converts: the loads are in flight together
// (one at a time, a tile load is bound by memory latency). Needs 16-byte aligned rows (checked by the
// caller).
template <int W, int L>
__device__ __forceinline__ void load_tile(bf16* dst, const float* src, int64_t ld, int64_t r0, int64_t n) {
  static_assert(W % 4 == 0, "row width must be a multiple of 4");
  constexpr int kVec = kRowsT * W / 4, kPer = (kVec + kThreadsT - 1) / kThreadsT;
  float4 buf[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int i = threadIdx.x + u * kThreadsT;
    const int r = i / (W / 4), c = (i % (W / 4)) * 4;
    buf[u] = i < kVec && r0 + r < n ? *reinterpret_cast<const float4*>(src + (r0 + r) * ld + c)
                                    : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int i = threadIdx.x + u * kThreadsT;
    if (i >= kVec) continue;
    const int r = i / (W / 4), c = (i % (W / 4)) * 4;
    __nv_bfloat162* d = reinterpret_cast<__nv_bfloat162*>(dst + r * L + c);
    d[0] = __floats2bfloat162_rn(buf[u].x, buf[u].y);
    d[1] = __floats2bfloat162_rn(buf[u].z, buf[u].w);
  }
}

// S[16 rows of warp][64] = A[16][K] · B[64][K]ᵀ  (A rows at a, B rows at b, both bf16 row-major).
template <int K, int LA, int LB, int LSS>
__device__ void scores(const bf16* a, const bf16* b, float* s) {
#pragma unroll
  for (int j = 0; j < kRowsT / 16; ++j) {
    FragC acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      FragA fa;
      FragBc fb;
      wmma::load_matrix_sync(fa, a + kk * 16, LA);
      wmma::load_matrix_sync(fb, b + j * 16 * LB + kk * 16, LB);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(s + j * 16, acc, LSS, wmma::mem_row_major);
  }
}

// ---- forward. grid (ceil(T / 64), B·Hq).
template <int D, int DV>
__global__ void __launch_bounds__(kThreadsT) forward(const float* q, const float* k, const float* v, float* out,
                                                     float* lse, r1lab::core::cuda::AttnDims a) {
  using Ly = Layout<D, DV>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* Qs = reinterpret_cast<bf16*>(smem);
  bf16* Ks = Qs + kRowsT * Ly::LQ;
  bf16* Vs = Ks + kRowsT * Ly::LQ;
  float* Ss = reinterpret_cast<float*>(Vs + kRowsT * Ly::LV);
  bf16* Ps = reinterpret_cast<bf16*>(Ss + kRowsT * Ly::LS);
  float* Os = reinterpret_cast<float*>(Ps + kRowsT * Ly::LP);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y / a.Hq, h = blockIdx.y % a.Hq, kh = h / (a.Hq / a.Hk);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kRowsT, off = a.S - a.T;
  load_tile<D, Ly::LQ>(Qs, q + b * a.q0 + h * a.q2 + t0 * a.q1, a.q1, 0, a.T - t0);
  for (int i = threadIdx.x; i < kRowsT * Ly::LO; i += blockDim.x) Os[i] = 0;
  // Lane pair (2r, 2r+1) of warp w owns row 16w + r; each lane half of the 64 columns.
  const int r = 16 * warp + lane / 2, half = lane % 2;
  const int64_t t = t0 + r;
  float m = -INFINITY, l = 0;
  const int64_t last = min(a.S - 1, off + min(a.T - 1, t0 + kRowsT - 1));
  for (int64_t s0 = 0; s0 <= last; s0 += kRowsT) {
    __syncthreads();
    load_tile<D, Ly::LQ>(Ks, k + b * a.k0 + kh * a.k2, a.k1, s0, a.S);
    load_tile<DV, Ly::LV>(Vs, v + b * a.v0 + kh * a.v2, a.v1, s0, a.S);
    __syncthreads();
    scores<D, Ly::LQ, Ly::LQ, Ly::LS>(Qs + 16 * warp * Ly::LQ, Ks, Ss + 16 * warp * Ly::LS);
    __syncwarp();
    float* srow = Ss + r * Ly::LS + 32 * half;
    float mx = -INFINITY;
    for (int c = 0; c < 32; ++c) {
      const int64_t s = s0 + 32 * half + c;
      const bool vis = t < a.T && s <= off + t;
      srow[c] = vis ? srow[c] * a.scale : -INFINITY;
      mx = fmaxf(mx, srow[c]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float mn = fmaxf(m, mx);
    const float alpha = mn == -INFINITY ? 1.0f : expf(m - mn);
    float sum = 0;
    bf16* prow = Ps + r * Ly::LP + 32 * half;
    for (int c = 0; c < 32; ++c) {
      const float p = mn == -INFINITY ? 0.0f : expf(srow[c] - mn);
      sum += p;
      prow[c] = __float2bfloat16(p);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * alpha + sum;
    m = mn;
    float* orow = Os + r * Ly::LO;
    for (int c = half; c < DV; c += 2) orow[c] *= alpha;
    __syncwarp();
#pragma unroll
    for (int j = 0; j < DV / 16; ++j) {
      FragC acc;
      wmma::load_matrix_sync(acc, Os + 16 * warp * Ly::LO + 16 * j, Ly::LO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kRowsT / 16; ++kk) {
        FragA fa;
        FragBr fb;
        wmma::load_matrix_sync(fa, Ps + 16 * warp * Ly::LP + 16 * kk, Ly::LP);
        wmma::load_matrix_sync(fb, Vs + 16 * kk * Ly::LV + 16 * j, Ly::LV);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(Os + 16 * warp * Ly::LO + 16 * j, acc, Ly::LO, wmma::mem_row_major);
    }
    __syncwarp();
  }
  if (t >= a.T) return;
  const float inv = l > 0 ? 1.0f / l : 0.0f;
  float* o = out + b * a.o0 + t * a.o1 + h * a.o2;
  for (int c = half; c < DV; c += 2) o[c] = Os[r * Ly::LO + c] * inv;
  if (half == 0) lse[(b * a.Hq + h) * a.T + t] = m + logf(l);
}

// dst[16 rows][W] (f32, row stride ld) += the accumulators frags (staged through st, ld LO).
template <int W, int LO>
__device__ void add_out(const FragC* frags, float* st, float* dst, int64_t ld, int64_t rows_left) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < W / 16; ++j) wmma::store_matrix_sync(st + 16 * j, frags[j], LO, wmma::mem_row_major);
  __syncwarp();
  for (int i = lane; i < 16 * W; i += 32) {
    const int r = i / W, c = i % W;
    if (r < rows_left) dst[r * ld + c] += st[r * LO + c];
  }
}

// ---- dq. grid (ceil(T / 64), B·Hq).
template <int D, int DV>
__global__ void __launch_bounds__(kThreadsT) backward_dq(const float* q, const float* k, const float* v,
                                                         const float* dout, const float* lse, const float* delta,
                                                         float* dq, int64_t dq0, int64_t dq1, int64_t dq2,
                                                         r1lab::core::cuda::AttnDims a) {
  using Ly = Layout<D, DV>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* Qs = reinterpret_cast<bf16*>(smem);
  bf16* Gs = Qs + kRowsT * Ly::LQ;
  bf16* Ks = Gs + kRowsT * Ly::LV;
  bf16* Vs = Ks + kRowsT * Ly::LQ;
  float* Ss = reinterpret_cast<float*>(Vs + kRowsT * Ly::LV);
  float* Ds = Ss + kRowsT * Ly::LS;
  bf16* dSs = reinterpret_cast<bf16*>(Ds + kRowsT * Ly::LS);
  float* St = reinterpret_cast<float*>(dSs + kRowsT * Ly::LP);  // [64][LO] staging
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y / a.Hq, h = blockIdx.y % a.Hq, kh = h / (a.Hq / a.Hk);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kRowsT, off = a.S - a.T;
  load_tile<D, Ly::LQ>(Qs, q + b * a.q0 + h * a.q2 + t0 * a.q1, a.q1, 0, a.T - t0);
  load_tile<DV, Ly::LV>(Gs, dout + b * a.g0 + h * a.g2 + t0 * a.g1, a.g1, 0, a.T - t0);
  const int r = 16 * warp + lane / 2, half = lane % 2;
  const int64_t t = t0 + r;
  const float L = t < a.T ? lse[(b * a.Hq + h) * a.T + t] : 0.0f;
  const float Dl = t < a.T ? delta[(b * a.Hq + h) * a.T + t] : 0.0f;
  FragC acc[D / 16];
#pragma unroll
  for (int j = 0; j < D / 16; ++j) wmma::fill_fragment(acc[j], 0.0f);
  const int64_t last = min(a.S - 1, off + min(a.T - 1, t0 + kRowsT - 1));
  for (int64_t s0 = 0; s0 <= last; s0 += kRowsT) {
    __syncthreads();
    load_tile<D, Ly::LQ>(Ks, k + b * a.k0 + kh * a.k2, a.k1, s0, a.S);
    load_tile<DV, Ly::LV>(Vs, v + b * a.v0 + kh * a.v2, a.v1, s0, a.S);
    __syncthreads();
    scores<D, Ly::LQ, Ly::LQ, Ly::LS>(Qs + 16 * warp * Ly::LQ, Ks, Ss + 16 * warp * Ly::LS);
    scores<DV, Ly::LV, Ly::LV, Ly::LS>(Gs + 16 * warp * Ly::LV, Vs, Ds + 16 * warp * Ly::LS);
    __syncwarp();
    for (int c = 32 * half; c < 32 * half + 32; ++c) {
      const int64_t s = s0 + c;
      const bool vis = t < a.T && s <= off + t;
      const float p = vis ? expf(Ss[r * Ly::LS + c] * a.scale - L) : 0.0f;
      dSs[r * Ly::LP + c] = __float2bfloat16(p * (Ds[r * Ly::LS + c] - Dl) * a.scale);
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < D / 16; ++j) {
#pragma unroll
      for (int kk = 0; kk < kRowsT / 16; ++kk) {
        FragA fa;
        FragBr fb;
        wmma::load_matrix_sync(fa, dSs + 16 * warp * Ly::LP + 16 * kk, Ly::LP);
        wmma::load_matrix_sync(fb, Ks + 16 * kk * Ly::LQ + 16 * j, Ly::LQ);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
  }
  add_out<D, Ly::LO>(acc, St + 16 * warp * Ly::LO, dq + b * dq0 + h * dq2 + (t0 + 16 * warp) * dq1, dq1,
                     a.T - t0 - 16 * warp);
}

// ---- dk, dv. grid (ceil(S / 64), B·Hk); every query head of the kv head in turn.
template <int D, int DV>
__global__ void __launch_bounds__(kThreadsT) backward_dkdv(const float* q, const float* k, const float* v,
                                                           const float* dout, const float* lse, const float* delta,
                                                           float* dk, int64_t dk0, int64_t dk1, int64_t dk2,
                                                           float* dv, int64_t dv0, int64_t dv1, int64_t dv2,
                                                           r1lab::core::cuda::AttnDims a) {
  using Ly = Layout<D, DV>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* Ks = reinterpret_cast<bf16*>(smem);
  bf16* Vs = Ks + kRowsT * Ly::LQ;
  bf16* Qs = Vs + kRowsT * Ly::LV;
  bf16* Gs = Qs + kRowsT * Ly::LQ;
  float* Ss = reinterpret_cast<float*>(Gs + kRowsT * Ly::LV);  // Sᵀ [keys][queries]
  float* Ds = Ss + kRowsT * Ly::LS;                             // dPᵀ
  bf16* Ps = reinterpret_cast<bf16*>(Ds + kRowsT * Ly::LS);     // Pᵀ
  bf16* dSs = Ps + kRowsT * Ly::LP;                             // dSᵀ
  float* Lt = reinterpret_cast<float*>(dSs + kRowsT * Ly::LP);  // [64]
  float* Dt = Lt + kRowsT;                                      // [64]
  float* St = Dt + kRowsT;                                      // [64][LO] staging
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y / a.Hk, kh = blockIdx.y % a.Hk, group = a.Hq / a.Hk;
  const int64_t s_first = static_cast<int64_t>(blockIdx.x) * kRowsT, off = a.S - a.T;
  load_tile<D, Ly::LQ>(Ks, k + b * a.k0 + kh * a.k2, a.k1, s_first, a.S);
  load_tile<DV, Ly::LV>(Vs, v + b * a.v0 + kh * a.v2, a.v1, s_first, a.S);
  const int r = 16 * warp + lane / 2, half = lane % 2;
  const int64_t s = s_first + r;
  FragC gk[D / 16], gv[DV / 16];
#pragma unroll
  for (int j = 0; j < D / 16; ++j) wmma::fill_fragment(gk[j], 0.0f);
#pragma unroll
  for (int j = 0; j < DV / 16; ++j) wmma::fill_fragment(gv[j], 0.0f);
  const int64_t t_begin = (s_first > off ? s_first - off : 0) / kRowsT * kRowsT;
  for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
    for (int64_t t0 = t_begin; t0 < a.T; t0 += kRowsT) {
      __syncthreads();
      load_tile<D, Ly::LQ>(Qs, q + b * a.q0 + h * a.q2, a.q1, t0, a.T);
      load_tile<DV, Ly::LV>(Gs, dout + b * a.g0 + h * a.g2, a.g1, t0, a.T);
      if (threadIdx.x < kRowsT) {
        const int64_t t = t0 + threadIdx.x;
        Lt[threadIdx.x] = t < a.T ? lse[(b * a.Hq + h) * a.T + t] : 0.0f;
        Dt[threadIdx.x] = t < a.T ? delta[(b * a.Hq + h) * a.T + t] : 0.0f;
      }
      __syncthreads();
      scores<D, Ly::LQ, Ly::LQ, Ly::LS>(Ks + 16 * warp * Ly::LQ, Qs, Ss + 16 * warp * Ly::LS);
      scores<DV, Ly::LV, Ly::LV, Ly::LS>(Vs + 16 * warp * Ly::LV, Gs, Ds + 16 * warp * Ly::LS);
      __syncwarp();
      for (int c = 32 * half; c < 32 * half + 32; ++c) {
        const int64_t t = t0 + c;
        const bool vis = t < a.T && s < a.S && s <= off + t;
        const float p = vis ? expf(Ss[r * Ly::LS + c] * a.scale - Lt[c]) : 0.0f;
        Ps[r * Ly::LP + c] = __float2bfloat16(p);
        dSs[r * Ly::LP + c] = __float2bfloat16(p * (Ds[r * Ly::LS + c] - Dt[c]) * a.scale);
      }
      __syncwarp();
#pragma unroll
      for (int kk = 0; kk < kRowsT / 16; ++kk) {
        FragA fp, fds;
        wmma::load_matrix_sync(fp, Ps + 16 * warp * Ly::LP + 16 * kk, Ly::LP);
        wmma::load_matrix_sync(fds, dSs + 16 * warp * Ly::LP + 16 * kk, Ly::LP);
#pragma unroll
        for (int j = 0; j < DV / 16; ++j) {
          FragBr fb;
          wmma::load_matrix_sync(fb, Gs + 16 * kk * Ly::LV + 16 * j, Ly::LV);
          wmma::mma_sync(gv[j], fp, fb, gv[j]);
        }
#pragma unroll
        for (int j = 0; j < D / 16; ++j) {
          FragBr fb;
          wmma::load_matrix_sync(fb, Qs + 16 * kk * Ly::LQ + 16 * j, Ly::LQ);
          wmma::mma_sync(gk[j], fds, fb, gk[j]);
        }
      }
    }
  }
  const int64_t rows_left = a.S - s_first - 16 * warp;
  add_out<D, Ly::LO>(gk, St + 16 * warp * Ly::LO, dk + b * dk0 + kh * dk2 + (s_first + 16 * warp) * dk1, dk1,
                     rows_left);
  __syncwarp();
  add_out<DV, Ly::LO>(gv, St + 16 * warp * Ly::LO, dv + b * dv0 + kh * dv2 + (s_first + 16 * warp) * dv1, dv1,
                      rows_left);
}

template <int D, int DV>
constexpr size_t forward_smem() {
  using Ly = Layout<D, DV>;
  return kRowsT * (2 * (2 * Ly::LQ + Ly::LV + Ly::LP) + 4 * (Ly::LS + Ly::LO));
}
template <int D, int DV>
constexpr size_t dq_smem() {
  using Ly = Layout<D, DV>;
  return kRowsT * (2 * (2 * Ly::LQ + 2 * Ly::LV + Ly::LP) + 4 * (2 * Ly::LS + Ly::LO));
}
template <int D, int DV>
constexpr size_t dkdv_smem() {
  using Ly = Layout<D, DV>;
  return kRowsT * (2 * (2 * Ly::LQ + 2 * Ly::LV + 2 * Ly::LP) + 4 * (2 * Ly::LS + Ly::LO + 2));
}

}  // namespace tc
