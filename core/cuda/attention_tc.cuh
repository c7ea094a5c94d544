// Tensor-core flash attention (bf16 products, fp32 accumulation and softmax), forward and backward, in
// the FlashAttention-2 manner: included by attention.cu, which owns Dims and picks these kernels when
// reduced-precision products are enabled.
//
// A block is 4 warps; a warp owns 16 rows (queries in forward and dq, keys in dk/dv) of a 64-row tile.
// The operands are bf16 (the launcher rounds f32 tensors into bf16 copies first, once). Tiles of the
// other side (64 keys, or queries) stream through two shared-memory stages by cp.async: the next tile
// loads while the block computes on this one. Products are mma.sync m16n8k16 steps with operands read by ldmatrix; the
// scores stay in registers: the accumulator layout of one product is the operand layout of the next, so
// masks, softmax and rescaling run on registers and P (or dS) never goes through shared memory. No
// atomics: dq has its own kernel, so results are bitwise repeatable. The mma and ldmatrix primitives
// (and the fragment layout) are in mma.cuh.
#include <cuda_bf16.h>

#include <type_traits>

#include "core/cuda/mma.cuh"

namespace tc {

constexpr int kRowsT = 64;  // rows of a tile
constexpr int kThreadsT = 128;
constexpr float kLog2e = 1.4426950408889634f;

template <int D, int DV>
struct Layout {
  static constexpr int LQ = D + 8, LV = DV + 8;  // +8 bf16: ldmatrix rows fall in distinct banks
  static constexpr int NQ = D > 128 ? 32 : 64;   // queries per tile in dk/dv (registers bound it)
  // Blocks per SM, which caps registers at 255 (2) or 168 (3). The backward kernels hold more per
  // thread: at D = 96, 2 blocks drop their spills and take backward from 4.99 to 4.59 ms a step on the
  // benchmark model (H100), where the forward is faster at 3 (1.31 against 1.44 ms).
  static constexpr int kMinBlocks = D > 128 ? 2 : 3;
  static constexpr int kMinBlocksBackward = D > 64 ? 2 : 3;
};

// Rows [r0, r0 + R) of a bf16 matrix (row stride ld, 16-byte aligned rows) into the tile [R][L] in
// shared memory by cp.async: this thread's share, in the group the caller commits. Rows ≥ n are zero.
template <int W, int L, int R = kRowsT>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* src, int64_t ld, int64_t r0, int64_t n) {
  static_assert(W % 8 == 0, "rows of whole 16-byte chunks");
  constexpr int kChunks = R * W / 8, kPer = (kChunks + kThreadsT - 1) / kThreadsT;
  const bf16* first = src + r0 * ld;
  const int64_t left = n - r0;
  const int rows = left <= 0 ? 0 : left >= R ? R : static_cast<int>(left);  // of the tile, in the matrix
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int i = threadIdx.x + u * kThreadsT;
    if (kChunks % kThreadsT != 0 && i >= kChunks) continue;
    const int r = i / (W / 8), c = (i % (W / 8)) * 8;
    const bool valid = r < rows;
    cp_async16(dst + r * L + c, valid ? first + r * ld + c : src, valid);
  }
}

// A key tile (as load_tile) in two parts: each row's first KD columns from head (row stride ld), the
// other D - KD from tail (row stride ldt); KD = D: all from head.
template <int D, int KD, int L>
__device__ __forceinline__ void load_key_tile(bf16* dst, const bf16* head, int64_t ld, const bf16* tail, int64_t ldt,
                                              int64_t r0, int64_t n) {
  load_tile<KD, L>(dst, head, ld, r0, n);
  if constexpr (KD < D) load_tile<D - KD, L>(dst + KD, tail, ldt, r0, n);
}

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The A operand for k-slice kk of a 16-row accumulator c: columns 16kk .. 16kk+15.
__device__ __forceinline__ void acc_to_a(uint32_t* a, const float (*c)[4], int kk) {
  a[0] = pack(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// c[16 rows of the warp][8·N] (+)= A[16][K] · Bᵀ where B is stored [8·N][K]: both in shared memory.
template <int K, int N>
__device__ __forceinline__ void product_nk(float (*c)[4], const bf16* a, int lda, const bf16* b, int ldb) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t fa[4];
    load_a(fa, a + kk * 16, lda);
#pragma unroll
    for (int np = 0; np < N / 2; ++np) {
      uint32_t fb[4];
      load_b_nk(fb, b + np * 16 * ldb + kk * 16, ldb);
      mma(c[2 * np], fa, fb[0], fb[1]);
      mma(c[2 * np + 1], fa, fb[2], fb[3]);
    }
  }
}

// c[16][8·N] += P · B where P is the register accumulator p[16][16·KS] and B is stored [16·KS][8·N].
template <int KS, int N>
__device__ __forceinline__ void product_kn(float (*c)[4], const float (*p)[4], const bf16* b, int ldb) {
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t fa[4];
    acc_to_a(fa, p, kk);
#pragma unroll
    for (int np = 0; np < N / 2; ++np) {
      uint32_t fb[4];
      load_b_kn(fb, b + kk * 16 * ldb + np * 16, ldb);
      mma(c[2 * np], fa, fb[0], fb[1]);
      mma(c[2 * np + 1], fa, fb[2], fb[3]);
    }
  }
}

// 2^x by the special-function unit alone (subnormal results flush to zero; exp2f adds a range fix-up
// around it): the probabilities, which go on into bf16 products.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <int N>
__device__ __forceinline__ void zero(float (*c)[4]) {
#pragma unroll
  for (int j = 0; j < N; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.0f;
}

// Two neighbouring values of an output row: f32 (added to what is there with accumulate), or bf16
// (overwritten, the f32 values rounded once).
__device__ __forceinline__ void put_pair(float* p, float2 v, bool accumulate) {
  if (accumulate) {
    const float2 o = *reinterpret_cast<const float2*>(p);
    v.x += o.x;
    v.y += o.y;
  }
  *reinterpret_cast<float2*>(p) = v;
}
__device__ __forceinline__ void put_pair(bf16* p, float2 v, bool) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v.x, v.y);
}

// dst[rows r0 + g, r0 + g + 8][8·N] (row stride ld) (+)= scale · c, as put_pair writes; rows ≥ n are
// skipped.
template <int N, typename T>
__device__ __forceinline__ void put_rows(const float (*c)[4], float scale, bool accumulate, T* dst, int64_t ld,
                                         int64_t r0, int64_t n) {
  const int lane = threadIdx.x % 32, g = lane / 4, cc = 2 * (lane % 4);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t r = r0 + g + 8 * half;
    if (r >= n) continue;
    T* row = dst + r * ld + cc;
#pragma unroll
    for (int j = 0; j < N; ++j)
      put_pair(row + 8 * j, make_float2(scale * c[j][2 * half], scale * c[j][2 * half + 1]), accumulate);
  }
}

// Where a backward kernel writes dq or dk: each row's first `head` columns at p (bf16 where bf16, then
// overwritten; else f32), the rest at tail (f32): a gradient whose parts go two ways (MLA: the nope
// columns into a bf16 product operand, the rope columns on through the inverse rope). head = D: all at p.
struct GradOut {
  void* p;
  int64_t s0, s1, s2;  // p's strides: batch, row, head
  float* tail;
  int64_t t0, t1, t2;  // tail's
  int head;
  bool bf16;
};

// put_rows into a GradOut, head h of batch entry b.
template <int N>
__device__ __forceinline__ void put_rows(const float (*c)[4], float scale, bool accumulate, const GradOut& o,
                                         int64_t b, int64_t h, int64_t r0, int64_t n) {
  const int lane = threadIdx.x % 32, g = lane / 4, cc = 2 * (lane % 4);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t r = r0 + g + 8 * half;
    if (r >= n) continue;
    const int64_t at = b * o.s0 + r * o.s1 + h * o.s2, tail_at = b * o.t0 + r * o.t1 + h * o.t2 - o.head;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int col = 8 * j + cc;
      const float2 v = make_float2(scale * c[j][2 * half], scale * c[j][2 * half + 1]);
      if (col >= o.head)
        put_pair(o.tail + tail_at + col, v, accumulate);
      else if (o.bf16)
        put_pair(static_cast<bf16*>(o.p) + at + col, v, false);
      else
        put_pair(static_cast<float*>(o.p) + at + col, v, accumulate);
    }
  }
}

// The two products every backward tile starts with, for the warp's 16 rows: s = A·Bᵀ (K = D) and
// dp = G·Vᵀ (K = DV), N 8-column blocks each. In dq: A = Q, B = K, G = dO, V = V; in dk/dv the roles swap
// (A = K, B = Q, G = V, V = dO), which gives Sᵀ and dPᵀ.
template <int D, int DV, int N>
__device__ __forceinline__ void scores_and_dp(float (*s)[4], float (*dp)[4], const bf16* a, const bf16* b,
                                              const bf16* g, const bf16* v) {
  using Ly = Layout<D, DV>;
  zero<N>(s);
  zero<N>(dp);
  product_nk<D, N>(s, a, Ly::LQ, b, Ly::LQ);
  product_nk<DV, N>(dp, g, Ly::LV, v, Ly::LV);
}

// Heavy tiles first: in forward and dq the last query tile sees the most keys.
__device__ __forceinline__ int64_t reversed_tile() { return static_cast<int64_t>(gridDim.x - 1 - blockIdx.x); }

// Where the keys, key tails and values of batch b's kv head kh lie, and how many key tiles the query
// tile at t0 sees in forward and dq (causally: up to its last query's position).
struct KeyValueSource {
  const bf16 *k, *kt, *v;
  int64_t k1, kt1, v1, S;
  int tiles;
  __device__ KeyValueSource(const bf16* keys_all, const bf16* key_tails, const bf16* values_all,
                            const r1lab::core::cuda::AttnDims& a, int64_t b, int64_t kh, int64_t t0)
      : k(keys_all + b * a.k0 + kh * a.k2),
        kt(key_tails + b * a.kt0 + kh * a.kt2),
        v(values_all + b * a.v0 + kh * a.v2),
        k1(a.k1),
        kt1(a.kt1),
        v1(a.v1),
        S(a.S),
        tiles(static_cast<int>(min(a.S - 1, a.S - a.T + min(a.T - 1, t0 + kRowsT - 1)) / kRowsT) + 1) {}
};

// Those key and value tiles streamed through two shared-memory stages at kv: issue(it) starts tile it's
// loads (an empty group past the last keeps cp.async's group count uniform); keys(it) and values(it) are
// where tile it lies once it is in.
template <int D, int DV, int KD>
struct KeyValueStream : KeyValueSource {
  using Ly = Layout<D, DV>;
  static constexpr int kStage = kRowsT * (Ly::LQ + Ly::LV);  // a key tile, then its value tile
  bf16* kv;
  __device__ KeyValueStream(bf16* kv_smem, const bf16* keys_all, const bf16* key_tails, const bf16* values_all,
                            const r1lab::core::cuda::AttnDims& a, int64_t b, int64_t kh, int64_t t0)
      : KeyValueSource(keys_all, key_tails, values_all, a, b, kh, t0), kv(kv_smem) {}
  __device__ void issue(int it) const {
    if (it < tiles) {
      bf16* st = kv + (it % 2) * kStage;
      load_key_tile<D, KD, Ly::LQ>(st, k, k1, kt, kt1, static_cast<int64_t>(it) * kRowsT, S);
      load_tile<DV, Ly::LV>(st + kRowsT * Ly::LQ, v, v1, static_cast<int64_t>(it) * kRowsT, S);
    }
    cp_async_commit();
  }
  // f(keys, values, s0) for every tile in order (its first key s0), each tile in shared memory for
  // every warp while the next one loads; the caller has issued tile 0.
  template <typename F>
  __device__ void for_each_tile(F&& f) const {
    for (int it = 0; it < tiles; ++it) {
      issue(it + 1);
      cp_async_wait<1>();
      __syncthreads();  // tile it is in for every warp
      const bf16* keys = kv + (it % 2) * kStage;
      f(keys, keys + kRowsT * Ly::LQ, static_cast<int64_t>(it) * kRowsT);
      __syncthreads();  // every warp is done with this stage before issue() loads it again
    }
  }
};

// A pair of outputs at p: f32, or bf16 rounded once.
__device__ __forceinline__ void put_pair(float* p, float x, float y) {
  *reinterpret_cast<float2*>(p) = make_float2(x, y);
}
__device__ __forceinline__ void put_pair(bf16* p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}

// One key tile's step of the online softmax for the warp's 16 queries (rows tr) of the block's tile at
// t0: the tile's scores s (the 64 keys from s0) become 2^(s·sl2 − m) under the rows' new running maxima m
// (log2 domain; masked where a query lies past its end or the key after it, unless the tile lies wholly
// inside the causal triangle), and the running sums l (per lane; summed over the row at the end) and
// outputs o are rescaled to them.
template <int DV>
__device__ __forceinline__ void softmax_step(float (*s)[4], float (&m)[2], float (&l)[2], float (*o)[4],
                                             const int64_t (&tr)[2], int64_t t0, int64_t s0, float sl2,
                                             const r1lab::core::cuda::AttnDims& a) {
  const int cc = 2 * (threadIdx.x % 4);
  const int64_t off = a.S - a.T;
  // Scores in the log2 domain, masked; the row max over the 4 lanes that share a row.
  float mx[2] = {-INFINITY, -INFINITY};
  const auto scores = [&](auto masked) {
#pragma unroll
    for (int j = 0; j < kRowsT / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] *= sl2;
        if constexpr (decltype(masked)::value) {
          const int64_t t = tr[e / 2], col = s0 + 8 * j + cc + e % 2;
          if (!(t < a.T && col <= off + t)) s[j][e] = -INFINITY;
        }
        mx[e / 2] = fmaxf(mx[e / 2], s[j][e]);
      }
    }
  };
  if (t0 + kRowsT <= a.T && s0 + kRowsT <= a.S && s0 + kRowsT - 1 <= off + t0)
    scores(std::false_type{});
  else
    scores(std::true_type{});
  float alpha[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float mn = fmaxf(m[r], mx[r]);
    alpha[r] = mn == -INFINITY ? 1.0f : fast_exp2(m[r] - mn);
    m[r] = mn;
  }
  float sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int j = 0; j < kRowsT / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float mr = m[e / 2];
      s[j][e] = mr == -INFINITY ? 0.0f : fast_exp2(s[j][e] - mr);
      sum[e / 2] += s[j][e];
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + sum[r];
#pragma unroll
  for (int j = 0; j < DV / 8; ++j) {
    o[j][0] *= alpha[0], o[j][1] *= alpha[0];
    o[j][2] *= alpha[1], o[j][3] *= alpha[1];
  }
}

// The warp's 16 rows of out (o over the row sums) and lse, head h of batch entry b.
template <int DV, typename TO>
__device__ __forceinline__ void put_forward(float (*o)[4], const float (&m)[2], float (&l)[2], const int64_t (&tr)[2],
                                            TO* out, float* lse, int64_t b, int64_t h,
                                            const r1lab::core::cuda::AttnDims& a) {
  const int cc = 2 * (threadIdx.x % 4);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const float inv = l[r] > 0 ? 1.0f / l[r] : 0.0f;
#pragma unroll
    for (int j = 0; j < DV / 8; ++j) o[j][2 * r] *= inv, o[j][2 * r + 1] *= inv;
    const int64_t t = tr[r];
    if (t < a.T) {
      TO* row = out + b * a.o0 + t * a.o1 + h * a.o2 + cc;
#pragma unroll
      for (int j = 0; j < DV / 8; ++j) put_pair(row + 8 * j, o[j][2 * r], o[j][2 * r + 1]);
      if (cc == 0) lse[(b * a.Hq + h) * a.T + t] = m[r] / kLog2e + logf(l[r]);
    }
  }
}

// ---- forward. grid (ceil(T / 64), B·Hq). out in f32, or in bf16 where only bf16 products read it.
template <int D, int DV, int KD, typename TO = float>
__global__ void __launch_bounds__(kThreadsT, Layout<D, DV>::kMinBlocks)
    forward(const bf16* q, const bf16* k, const bf16* kt, const bf16* v, TO* out, float* lse,
            r1lab::core::cuda::AttnDims a) {
  using Ly = Layout<D, DV>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* Qs = reinterpret_cast<bf16*>(smem);
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4;
  const int64_t b = blockIdx.y / a.Hq, h = blockIdx.y % a.Hq, kh = h / (a.Hq / a.Hk);
  const int64_t t0 = reversed_tile() * kRowsT;
  const KeyValueStream<D, DV, KD> kvs(Qs + kRowsT * Ly::LQ, k, kt, v, a, b, kh, t0);
  load_tile<D, Ly::LQ>(Qs, q + b * a.q0 + h * a.q2 + t0 * a.q1, a.q1, 0, a.T - t0);  // with the first tile
  kvs.issue(0);
  const int64_t tr[2] = {t0 + 16 * warp + g, t0 + 16 * warp + g + 8};
  const float sl2 = a.scale * kLog2e;
  float o[DV / 8][4];
  zero<DV / 8>(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  kvs.for_each_tile([&](const bf16* Ks, const bf16* Vs, int64_t s0) {
    float s[kRowsT / 8][4];
    zero<kRowsT / 8>(s);
    product_nk<D, kRowsT / 8>(s, Qs + 16 * warp * Ly::LQ, Ly::LQ, Ks, Ly::LQ);
    softmax_step<DV>(s, m, l, o, tr, t0, s0, sl2, a);
    product_kn<kRowsT / 16, DV / 8>(o, s, Vs, Ly::LV);
  });
  put_forward<DV>(o, m, l, tr, out, lse, b, h, a);
}

// A dq block's rows tr (of head h in batch b): their lse L in the log2 domain and their delta Dl, zeros
// past the end.
__device__ __forceinline__ void row_stats(const float* lse, const float* delta, const int64_t (&tr)[2], int64_t b,
                                          int64_t h, const r1lab::core::cuda::AttnDims& a, float (&L)[2],
                                          float (&Dl)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    L[r] = tr[r] < a.T ? lse[(b * a.Hq + h) * a.T + tr[r]] * kLog2e : 0.0f;
    Dl[r] = tr[r] < a.T ? delta[(b * a.Hq + h) * a.T + tr[r]] : 0.0f;
  }
}

// P of a dq tile in place of its scores s (the warp's 16 queries, rows tr, by the 64 keys from s0), with
// the rows' lse L (log2 domain): p = 2^(s·sl2 − L); 0 where a query lies past its end or the key after it.
// A tile wholly inside the causal triangle (every query valid, every key at or before the first query's
// position) takes no masks.
__device__ __forceinline__ void p_q(float (*s)[4], const float (&L)[2], const int64_t (&tr)[2], int64_t t0, int64_t s0,
                                    float sl2, const r1lab::core::cuda::AttnDims& a) {
  const int cc = 2 * (threadIdx.x % 4);
  const int64_t off = a.S - a.T;
  const auto body = [&](auto masked) {
#pragma unroll
    for (int j = 0; j < kRowsT / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float p = fast_exp2(s[j][e] * sl2 - L[e / 2]);
        if constexpr (decltype(masked)::value) {
          const int64_t t = tr[e / 2], col = s0 + 8 * j + cc + e % 2;
          if (!(t < a.T && col <= off + t)) p = 0.0f;
        }
        s[j][e] = p;
      }
    }
  };
  if (t0 + kRowsT <= a.T && s0 + kRowsT <= a.S && s0 + kRowsT - 1 <= off + t0)
    body(std::false_type{});
  else
    body(std::true_type{});
}

// dS / scale in place of a dq tile's P (p_q): ds = p·(dp − D), with the rows' delta Dl.
__device__ __forceinline__ void ds_q(float (*s)[4], const float (*dp)[4], const float (&Dl)[2]) {
#pragma unroll
  for (int j = 0; j < kRowsT / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] *= dp[j][e] - Dl[e / 2];
}

// ---- dq. grid (ceil(T / 64), B·Hq).
template <int D, int DV, int KD>
__global__ void __launch_bounds__(kThreadsT, Layout<D, DV>::kMinBlocksBackward)
    backward_dq(const bf16* q, const bf16* k, const bf16* kt, const bf16* v, const bf16* dout, const float* lse,
                const float* delta, GradOut dq, bool accumulate, r1lab::core::cuda::AttnDims a) {
  using Ly = Layout<D, DV>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* Qs = reinterpret_cast<bf16*>(smem);
  bf16* Gs = Qs + kRowsT * Ly::LQ;
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4;
  const int64_t b = blockIdx.y / a.Hq, h = blockIdx.y % a.Hq, kh = h / (a.Hq / a.Hk);
  const int64_t t0 = reversed_tile() * kRowsT;
  const KeyValueStream<D, DV, KD> kvs(Gs + kRowsT * Ly::LV, k, kt, v, a, b, kh, t0);
  // The block's queries and their output gradients, with the first key tile.
  load_tile<D, Ly::LQ>(Qs, q + b * a.q0 + h * a.q2 + t0 * a.q1, a.q1, 0, a.T - t0);
  load_tile<DV, Ly::LV>(Gs, dout + b * a.g0 + h * a.g2 + t0 * a.g1, a.g1, 0, a.T - t0);
  kvs.issue(0);
  const int64_t tr[2] = {t0 + 16 * warp + g, t0 + 16 * warp + g + 8};
  const float sl2 = a.scale * kLog2e;
  float L[2], Dl[2];
  row_stats(lse, delta, tr, b, h, a, L, Dl);
  float acc[D / 8][4];
  zero<D / 8>(acc);
  kvs.for_each_tile([&](const bf16* Ks, const bf16* Vs, int64_t s0) {
    float s[kRowsT / 8][4], dp[kRowsT / 8][4];
    scores_and_dp<D, DV, kRowsT / 8>(s, dp, Qs + 16 * warp * Ly::LQ, Ks, Gs + 16 * warp * Ly::LV, Vs);
    p_q(s, L, tr, t0, s0, sl2, a);
    ds_q(s, dp, Dl);
    product_kn<kRowsT / 16, D / 8>(acc, s, Ks, Ly::LQ);
  });
  put_rows<D / 8>(acc, a.scale, accumulate, dq, b, h, t0 + 16 * warp, a.T);
}

// P of a dk/dv tile in place of its Sᵀ (the warp's 16 keys, rows sr, by NQ queries from t0), with each
// query's lse Lt (log2 domain): p = 2^(s·sl2 − L); 0 where a query or key lies past its end or the key
// after the query. A tile wholly inside the causal triangle (every query and key valid, the block's last
// key at or before the tile's first query) takes no masks.
template <int NQ>
__device__ __forceinline__ void p_t(float (*st)[4], const float* Lt, const int64_t (&sr)[2], int64_t s_first,
                                    int64_t t0, float sl2, const r1lab::core::cuda::AttnDims& a) {
  const int cc = 2 * (threadIdx.x % 4);
  const int64_t off = a.S - a.T;
  const auto body = [&](auto masked) {
#pragma unroll
    for (int j = 0; j < NQ / 8; ++j) {
      const float2 l = *reinterpret_cast<const float2*>(Lt + 8 * j + cc);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float p = fast_exp2(st[j][e] * sl2 - (e % 2 ? l.y : l.x));
        if constexpr (decltype(masked)::value) {
          const int64_t s = sr[e / 2], t = t0 + 8 * j + cc + e % 2;
          if (!(t < a.T && s < a.S && s <= off + t)) p = 0.0f;
        }
        st[j][e] = p;
      }
    }
  };
  if (t0 + NQ <= a.T && s_first + kRowsT <= a.S && s_first + kRowsT - 1 <= off + t0)
    body(std::false_type{});
  else
    body(std::true_type{});
}

// dSᵀ / scale in place of a dk/dv tile's dPᵀ, from its P (p_t): ds = p·(dp − D), with each query's delta Dt.
template <int NQ>
__device__ __forceinline__ void ds_t(float (*dpt)[4], const float (*st)[4], const float* Dt) {
  const int cc = 2 * (threadIdx.x % 4);
#pragma unroll
  for (int j = 0; j < NQ / 8; ++j) {
    const float2 d = *reinterpret_cast<const float2*>(Dt + 8 * j + cc);
#pragma unroll
    for (int e = 0; e < 4; ++e) dpt[j][e] = st[j][e] * (dpt[j][e] - (e % 2 ? d.y : d.x));
  }
}

// The query tiles a dk/dv block (keys from s_first, kv head kh) sees, in order: tile i is query head
// kh·group + i / per_head, queries from t_begin + (i % per_head)·NQ. issue(i, load) starts tile i's Q and
// dO rows (load(stage, head, first query), by cp.async) and its lse and delta into registers; put(i), a
// tile later, puts those in shared memory at LD ([stage][L (log2 domain) | D][NQ]: lse into the log2
// domain there, since a multiply at the load would wait for it).
template <int NQ>
struct QueryTiles {
  const float *lse, *delta;
  float* LD;
  int64_t b, T, Hq, t_begin, nh, nt0;  // (nh, nt0): the next tile to issue
  int tiles;
  float nl = 0.0f, nd = 0.0f;
  __device__ QueryTiles(const float* lse_all, const float* delta_all, float* ld_smem,
                        const r1lab::core::cuda::AttnDims& a, int64_t batch, int64_t kh, int64_t s_first)
      : lse(lse_all), delta(delta_all), LD(ld_smem), b(batch), T(a.T), Hq(a.Hq) {
    const int64_t group = a.Hq / a.Hk, off = a.S - a.T;
    t_begin = (s_first > off ? s_first - off : 0) / NQ * NQ;
    tiles = static_cast<int>(group) * static_cast<int>((a.T - t_begin + NQ - 1) / NQ);
    nh = kh * group;
    nt0 = t_begin;
  }
  template <typename Load>
  __device__ void issue(int i, Load&& load) {
    if (i < tiles) {
      load(i % 2, nh, nt0);
      if (threadIdx.x < NQ) {
        const int64_t t = nt0 + threadIdx.x;
        nl = t < T ? lse[(b * Hq + nh) * T + t] : 0.0f;
        nd = t < T ? delta[(b * Hq + nh) * T + t] : 0.0f;
      }
      nt0 += NQ;
      if (nt0 >= T) nt0 = t_begin, ++nh;
    }
    cp_async_commit();  // an empty group past the end keeps the count uniform
  }
  __device__ void put(int i) {
    if (i < tiles && threadIdx.x < NQ) {
      LD[(i % 2) * 2 * NQ + threadIdx.x] = nl * kLog2e;
      LD[(i % 2) * 2 * NQ + NQ + threadIdx.x] = nd;
    }
  }
  __device__ const float* lse_of(int i) const { return LD + (i % 2) * 2 * NQ; }  // then delta, NQ on
  __device__ int64_t next_first(int64_t t0) const { return t0 + NQ < T ? t0 + NQ : t_begin; }
};

// ---- dk, dv. grid (ceil(S / 64), B·Hk); every query head of the kv head in turn, NQ queries a tile.
// TV: dv's type (f32, or bf16 overwritten).
template <int D, int DV, int KD, typename TV>
__global__ void __launch_bounds__(kThreadsT, Layout<D, DV>::kMinBlocksBackward)
    backward_dkdv(const bf16* q, const bf16* k, const bf16* kt, const bf16* v, const bf16* dout, const float* lse,
                  const float* delta, GradOut dk, TV* dv, int64_t dv0, int64_t dv1, int64_t dv2, bool accumulate,
                  r1lab::core::cuda::AttnDims a) {
  using Ly = Layout<D, DV>;
  constexpr int NQ = Ly::NQ;
  constexpr int kStage = NQ * (Ly::LQ + Ly::LV);  // a stage: a query tile, then its output gradients
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* Ks = reinterpret_cast<bf16*>(smem);
  bf16* Vs = Ks + kRowsT * Ly::LQ;
  bf16* QG = Vs + kRowsT * Ly::LV;
  float* LD = reinterpret_cast<float*>(QG + 2 * kStage);  // [stage][L (log2 domain) | D][NQ]
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4;
  const int64_t b = blockIdx.y / a.Hk, kh = blockIdx.y % a.Hk;
  const int64_t s_first = static_cast<int64_t>(blockIdx.x) * kRowsT;
  QueryTiles<NQ> qt(lse, delta, LD, a, b, kh, s_first);
  const auto load = [&](int stage, int64_t h, int64_t t) {
    bf16* st = QG + stage * kStage;
    load_tile<D, Ly::LQ, NQ>(st, q + b * a.q0 + h * a.q2, a.q1, t, a.T);
    load_tile<DV, Ly::LV, NQ>(st + NQ * Ly::LQ, dout + b * a.g0 + h * a.g2, a.g1, t, a.T);
  };
  // The block's keys and values, with the first query tile.
  load_key_tile<D, KD, Ly::LQ>(Ks, k + b * a.k0 + kh * a.k2, a.k1, kt + b * a.kt0 + kh * a.kt2, a.kt1, s_first, a.S);
  load_tile<DV, Ly::LV>(Vs, v + b * a.v0 + kh * a.v2, a.v1, s_first, a.S);
  qt.issue(0, load);
  qt.put(0);
  const int64_t sr[2] = {s_first + 16 * warp + g, s_first + 16 * warp + g + 8};
  const float sl2 = a.scale * kLog2e;
  float gk[D / 8][4], gv[DV / 8][4];
  zero<D / 8>(gk);
  zero<DV / 8>(gv);
  int64_t t0 = qt.t_begin;  // tile i's first query
  for (int i = 0; i < qt.tiles; ++i, t0 = qt.next_first(t0)) {
    qt.issue(i + 1, load);
    cp_async_wait<1>();
    __syncthreads();  // tile i is in for every warp
    const bf16* Qs = QG + (i % 2) * kStage;
    const bf16* Gs = Qs + NQ * Ly::LQ;
    const float* Lt = qt.lse_of(i);
    const float* Dt = Lt + NQ;
    float st[NQ / 8][4], dpt[NQ / 8][4];  // Sᵀ and dPᵀ: [16 keys of the warp][NQ queries]
    scores_and_dp<D, DV, NQ / 8>(st, dpt, Ks + 16 * warp * Ly::LQ, Qs, Vs + 16 * warp * Ly::LV, Gs);
    p_t<NQ>(st, Lt, sr, s_first, t0, sl2, a);
    ds_t<NQ>(dpt, st, Dt);
    product_kn<NQ / 16, DV / 8>(gv, st, Gs, Ly::LV);
    product_kn<NQ / 16, D / 8>(gk, dpt, Qs, Ly::LQ);
    qt.put(i + 1);    // the other stage's lse and delta: its last readers were done before this tile began
    __syncthreads();  // every warp is done with this stage before issue() loads it again
  }
  put_rows<D / 8>(gk, a.scale, accumulate, dk, b, kh, s_first + 16 * warp, a.S);
  put_rows<DV / 8>(gv, 1.0f, accumulate, dv + b * dv0 + kh * dv2, dv1, s_first + 16 * warp, a.S);
}

template <int D, int DV>
constexpr size_t forward_smem() {
  using Ly = Layout<D, DV>;
  return 2 * kRowsT * (Ly::LQ + 2 * (Ly::LQ + Ly::LV));
}
template <int D, int DV>
constexpr size_t dq_smem() {
  using Ly = Layout<D, DV>;
  return 2 * kRowsT * (Ly::LQ + Ly::LV + 2 * (Ly::LQ + Ly::LV));
}
template <int D, int DV>
constexpr size_t dkdv_smem() {
  using Ly = Layout<D, DV>;
  return 2 * (kRowsT + 2 * Ly::NQ) * (Ly::LQ + Ly::LV) + 4 * 2 * 2 * Ly::NQ;
}

}  // namespace tc
