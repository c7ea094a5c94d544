// The tensor-core attention, forward and backward, on Hopper's warpgroup products (wgmma.cuh, sm_90a):
// included by attention.cu after attention_tc.cuh, whose tiles, masks, softmax step and outputs these
// kernels share; the backend takes them where its products are the warpgroup ones (CudaBackend::hopper_)
// and the head sizes are built here (kWgAttention).
//
// A block is one warpgroup (4 warps): the 64 rows it owns (keys in dk/dv, queries in forward and dq) and
// each 64-row tile of the other side lie in shared memory in the 128-byte swizzled layout, in panels of 64
// columns (8192 bytes each), filled by cp.async in two stages as in attention_tc.cuh. The first products
// of a tile (S, and dP in backward) read both operands from shared memory; the products after them take
// P or dS from registers (an accumulator rounded to bf16 is the A operand of the next product) and the
// other operand from the same shared tiles read the other way round: a 64-row tile with 128-byte rows is
// both a k-contiguous [rows][columns] operand and an n-contiguous [k = rows][n = columns] one. Compared
// with mma.sync, no operand goes through registers by ldmatrix, and the products run asynchronously. The
// same f32 sums in a fixed order: bitwise repeatable, though not the mma.sync kernels' bits.
#include "core/cuda/wgmma.cuh"

namespace tc {

// The head sizes with warpgroup kernels (dk/dv's accumulators at D = 96 fill the registers).
template <int D, int DV>
constexpr bool kWgAttention = (D == 64 || D == 96) && DV == 64;

constexpr int kPanel = kRowsT * 128;  // bytes of a 64-row, 64-column panel
constexpr int panels(int w) { return (w + 63) / 64; }

// Rows [r0, r0 + 64) of a bf16 matrix (row stride ld, 16-byte aligned rows), W columns of them, into
// columns [c0, c0 + W) of a swizzled tile by cp.async: this thread's share, in the group the caller
// commits. Rows ≥ n are zero.
template <int W>
__device__ __forceinline__ void load_swizzled(unsigned char* tile, int c0, const bf16* src, int64_t ld, int64_t r0,
                                              int64_t n) {
  static_assert(W % 8 == 0, "rows of whole 16-byte chunks");
  constexpr int kCols = W / 8, kChunks = kRowsT * kCols, kPer = (kChunks + kThreadsT - 1) / kThreadsT;
  const bf16* first = src + r0 * ld;
  const int64_t left = n - r0;
  const int rows = left <= 0 ? 0 : left >= kRowsT ? kRowsT : static_cast<int>(left);
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int i = threadIdx.x + u * kThreadsT;
    if (kChunks % kThreadsT != 0 && i >= kChunks) continue;
    const int r = i / kCols, c = c0 + (i % kCols) * 8;
    const bool valid = r < rows;
    cp_async16(tile + (c >> 6) * kPanel + r * 128 + ((((c >> 3) & 7) ^ (r & 7)) << 4),
               valid ? first + r * ld + (c - c0) : src, valid);
  }
}

// Descriptors of a swizzled tile at k step kk (a multiple of 16): read k-contiguous ([64 rows][k =
// columns]), or n-contiguous ([k = rows][n = columns]).
__device__ __forceinline__ uint64_t desc_k(const unsigned char* tile, int kk) {
  return wg::desc(tile + (kk >> 6) * kPanel + (kk & 63) * 2, 16, 1024);
}
__device__ __forceinline__ uint64_t desc_n(const unsigned char* tile, int kk) {
  return wg::desc(tile + kk * 128, kPanel, 1024);
}

template <int N>
__device__ __forceinline__ float (&flat(float (&c)[N][4]))[N * 4] {
  return reinterpret_cast<float(&)[N * 4]>(c);
}

// c[64 × 64] = A · Bᵀ over k < K, both swizzled tiles read k-contiguous (queued after the caller's
// wg::fence; the caller commits).
template <int K>
__device__ __forceinline__ void product_ss(float (&c)[8][4], const unsigned char* a, const unsigned char* b) {
#pragma unroll
  for (int kk = 0; kk < K; kk += 16) wg::mma_m64n64k16<0, 0>(flat(c), desc_k(a, kk), desc_k(b, kk), kk > 0);
}

// The A operands of an accumulator p[64 × 64] rounded to bf16: its four k steps of 16.
__device__ __forceinline__ void to_a(uint32_t (&fa)[4][4], const float (*p)[4]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) acc_to_a(fa[kk], p, kk);
}

// Keeps A operands live (their registers unused for anything else) up to here: a product still running
// reads them.
__device__ __forceinline__ void pin_a(uint32_t (&fa)[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(fa[i][j])::"memory");
}

// c[64 × N] += P · B where P is [64 × 64] in A operands (to_a) and B the swizzled tile [64 k][N] read
// n-contiguous (queued after the caller's wg::fence; the caller commits).
template <int N>
__device__ __forceinline__ void product_rs(float (&c)[N / 8][4], const uint32_t (&fa)[4][4], const unsigned char* b) {
  static_assert(N == 64 || N == 96, "the products built");
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
    if constexpr (N == 64)
      wg::mma_rs_m64n64k16<1>(flat(c), fa[kk], desc_n(b, 16 * kk));
    else
      wg::mma_rs_m64n96k16<1>(flat(c), fa[kk], desc_n(b, 16 * kk));
}

// Waits for the stage before the one issued last and makes it visible to every warp's products.
__device__ __forceinline__ void stage_arrived() {
  cp_async_wait<1>();
  wg::fence_shared();
  __syncthreads();
}

// The key and value tiles that the query tile at t0 sees in forward and dq, as KeyValueStream streams
// them but swizzled: a stage is a key tile (panels(D)) and then its value tile.
template <int D, int DV, int KD>
struct SwizzledKeyValues : KeyValueSource {
  static constexpr int kKBytes = panels(D) * kPanel, kStage = kKBytes + panels(DV) * kPanel;
  unsigned char* kv;
  __device__ SwizzledKeyValues(unsigned char* kv_smem, const bf16* keys_all, const bf16* key_tails,
                               const bf16* values_all, const r1lab::core::cuda::AttnDims& a, int64_t b, int64_t kh,
                               int64_t t0)
      : KeyValueSource(keys_all, key_tails, values_all, a, b, kh, t0), kv(kv_smem) {}
  // Starts tile it's loads (an empty group past the last keeps cp.async's group count uniform).
  __device__ void issue(int it) const {
    if (it < tiles) {
      unsigned char* st = kv + (it % 2) * kStage;
      const int64_t s0 = static_cast<int64_t>(it) * kRowsT;
      load_swizzled<KD>(st, 0, k, k1, s0, S);
      if constexpr (KD < D) load_swizzled<D - KD>(st, KD, kt, kt1, s0, S);
      load_swizzled<DV>(st + kKBytes, 0, v, v1, s0, S);
    }
    cp_async_commit();
  }
  __device__ const unsigned char* keys(int it) const { return kv + (it % 2) * kStage; }
  __device__ const unsigned char* values(int it) const { return keys(it) + kKBytes; }
};

// ---- forward, as forward (grid (ceil(T / 64), B·Hq), heavy tiles first).
template <int D, int DV, int KD, typename TO>
__global__ void __launch_bounds__(kThreadsT, 3) forward_wg(const bf16* q, const bf16* k, const bf16* kt, const bf16* v,
                                                           TO* out, float* lse, r1lab::core::cuda::AttnDims a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  unsigned char* Qs = wg::smem_base();
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4;
  const int64_t b = blockIdx.y / a.Hq, h = blockIdx.y % a.Hq, kh = h / (a.Hq / a.Hk);
  const int64_t t0 = reversed_tile() * kRowsT;
  const SwizzledKeyValues<D, DV, KD> kvs(Qs + panels(D) * kPanel, k, kt, v, a, b, kh, t0);
  load_swizzled<D>(Qs, 0, q + b * a.q0 + h * a.q2, a.q1, t0, a.T);  // with the first tile
  kvs.issue(0);
  const int64_t tr[2] = {t0 + 16 * warp + g, t0 + 16 * warp + g + 8};
  const float sl2 = a.scale * kLog2e;
  float o[DV / 8][4];
  zero<DV / 8>(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  for (int it = 0; it < kvs.tiles; ++it) {
    kvs.issue(it + 1);
    stage_arrived();  // tile it
    float s[kRowsT / 8][4];
    wg::fence();
    product_ss<D>(s, Qs, kvs.keys(it));
    wg::commit();
    wg::wait<0>();
    wg::pin(flat(s));
    softmax_step<DV>(s, m, l, o, tr, t0, static_cast<int64_t>(it) * kRowsT, sl2, a);
    uint32_t fa[4][4];
    to_a(fa, s);
    wg::pin(flat(o));
    wg::fence();
    product_rs<DV>(o, fa, kvs.values(it));
    wg::commit();
    wg::wait<0>();
    wg::pin(flat(o));
    __syncthreads();  // every warp is done with this stage before issue() loads it again
  }
  put_forward<DV>(o, m, l, tr, out, lse, b, h, a);
#else
  __trap();  // launched only where hopper_products_built() said the build has them
#endif
}

// ---- dk, dv, as backward_dkdv (grid (ceil(S / 64), B·Hk), 64 queries a tile, the same order).
template <int D, int DV, int KD, typename TV>
__global__ void __launch_bounds__(kThreadsT, 2)
    backward_dkdv_wg(const bf16* q, const bf16* k, const bf16* kt, const bf16* v, const bf16* dout, const float* lse,
                     const float* delta, GradOut dk, TV* dv, int64_t dv0, int64_t dv1, int64_t dv2, bool accumulate,
                     r1lab::core::cuda::AttnDims a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int NQ = kRowsT;
  constexpr int kQBytes = panels(D) * kPanel, kGBytes = panels(DV) * kPanel, kStage = kQBytes + kGBytes;
  unsigned char* Ks = wg::smem_base();
  unsigned char* Vs = Ks + kQBytes;
  unsigned char* QG = Vs + kGBytes;
  float* LD = reinterpret_cast<float*>(QG + 2 * kStage);  // [stage][L (log2 domain) | D][NQ]
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4;
  const int64_t b = blockIdx.y / a.Hk, kh = blockIdx.y % a.Hk;
  const int64_t s_first = static_cast<int64_t>(blockIdx.x) * kRowsT;
  QueryTiles<NQ> qt(lse, delta, LD, a, b, kh, s_first);  // backward_dkdv's order
  const auto load = [&](int stage, int64_t h, int64_t t) {
    unsigned char* st = QG + stage * kStage;
    load_swizzled<D>(st, 0, q + b * a.q0 + h * a.q2, a.q1, t, a.T);
    load_swizzled<DV>(st + kQBytes, 0, dout + b * a.g0 + h * a.g2, a.g1, t, a.T);
  };
  load_swizzled<KD>(Ks, 0, k + b * a.k0 + kh * a.k2, a.k1, s_first, a.S);
  if constexpr (KD < D) load_swizzled<D - KD>(Ks, KD, kt + b * a.kt0 + kh * a.kt2, a.kt1, s_first, a.S);
  load_swizzled<DV>(Vs, 0, v + b * a.v0 + kh * a.v2, a.v1, s_first, a.S);
  qt.issue(0, load);
  qt.put(0);
  const int64_t sr[2] = {s_first + 16 * warp + g, s_first + 16 * warp + g + 8};
  const float sl2 = a.scale * kLog2e;
  float gk[D / 8][4], gv[DV / 8][4];
  zero<D / 8>(gk);
  zero<DV / 8>(gv);
  int64_t t0 = qt.t_begin;
  for (int i = 0; i < qt.tiles; ++i, t0 = qt.next_first(t0)) {
    qt.issue(i + 1, load);
    stage_arrived();  // tile i
    const unsigned char* Qs = QG + (i % 2) * kStage;
    const unsigned char* Gs = Qs + kQBytes;
    const float* Lt = qt.lse_of(i);
    float st[NQ / 8][4], dpt[NQ / 8][4];  // Sᵀ and dPᵀ: [64 keys][NQ queries]
    // Each step's arithmetic runs while the tensor cores work on the product before it: P while dPᵀ is
    // made, dS while dV's product runs.
    wg::fence();
    product_ss<D>(st, Ks, Qs);
    wg::commit();
    product_ss<DV>(dpt, Vs, Gs);
    wg::commit();
    wg::wait<1>();
    wg::pin(flat(st));
    p_t<NQ>(st, Lt, sr, s_first, t0, sl2, a);
    uint32_t pa[4][4], da[4][4];
    to_a(pa, st);
    wg::pin(flat(gv));
    wg::fence();
    product_rs<DV>(gv, pa, Gs);
    wg::commit();
    wg::wait<1>();
    wg::pin(flat(dpt));
    ds_t<NQ>(dpt, st, Lt + NQ);
    to_a(da, dpt);
    wg::pin(flat(gk));
    wg::fence();
    product_rs<D>(gk, da, Qs);
    wg::commit();
    wg::wait<0>();
    wg::pin(flat(gv));
    wg::pin(flat(gk));
    pin_a(pa);  // the products read them until here
    pin_a(da);
    qt.put(i + 1);    // the other stage's lse and delta: its last readers were done before this tile began
    __syncthreads();  // every warp is done with this stage before issue() loads it again
  }
  put_rows<D / 8>(gk, a.scale, accumulate, dk, b, kh, s_first + 16 * warp, a.S);
  put_rows<DV / 8>(gv, 1.0f, accumulate, dv + b * dv0 + kh * dv2, dv1, s_first + 16 * warp, a.S);
#else
  __trap();  // launched only where hopper_products_built() said the build has them
#endif
}

// ---- dq, as backward_dq (grid (ceil(T / 64), B·Hq), heavy tiles first), 3 blocks an SM: the block's
// queries and their output gradients stay; the key and value tiles they see stream through two stages.
template <int D, int DV, int KD>
__global__ void __launch_bounds__(kThreadsT, 3)
    backward_dq_wg(const bf16* q, const bf16* k, const bf16* kt, const bf16* v, const bf16* dout, const float* lse,
                   const float* delta, GradOut dq, bool accumulate, r1lab::core::cuda::AttnDims a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  unsigned char* Qs = wg::smem_base();
  unsigned char* Gs = Qs + panels(D) * kPanel;
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4;
  const int64_t b = blockIdx.y / a.Hq, h = blockIdx.y % a.Hq, kh = h / (a.Hq / a.Hk);
  const int64_t t0 = reversed_tile() * kRowsT;
  const SwizzledKeyValues<D, DV, KD> kvs(Gs + panels(DV) * kPanel, k, kt, v, a, b, kh, t0);
  // The block's queries and their output gradients, with the first key tile.
  load_swizzled<D>(Qs, 0, q + b * a.q0 + h * a.q2, a.q1, t0, a.T);
  load_swizzled<DV>(Gs, 0, dout + b * a.g0 + h * a.g2, a.g1, t0, a.T);
  kvs.issue(0);
  const int64_t tr[2] = {t0 + 16 * warp + g, t0 + 16 * warp + g + 8};
  const float sl2 = a.scale * kLog2e;
  float L[2], Dl[2];
  row_stats(lse, delta, tr, b, h, a, L, Dl);
  float acc[D / 8][4];
  zero<D / 8>(acc);
  for (int it = 0; it < kvs.tiles; ++it) {
    kvs.issue(it + 1);
    stage_arrived();  // tile it
    const unsigned char* Ks = kvs.keys(it);
    const unsigned char* Vs = kvs.values(it);
    float s[kRowsT / 8][4], dp[kRowsT / 8][4];  // S and dP: [64 queries][64 keys]
    // P's exponentials run while dP is made.
    wg::fence();
    product_ss<D>(s, Qs, Ks);
    wg::commit();
    product_ss<DV>(dp, Gs, Vs);
    wg::commit();
    wg::wait<1>();
    wg::pin(flat(s));
    p_q(s, L, tr, t0, static_cast<int64_t>(it) * kRowsT, sl2, a);
    wg::wait<0>();
    wg::pin(flat(dp));
    ds_q(s, dp, Dl);
    uint32_t fa[4][4];
    to_a(fa, s);
    wg::pin(flat(acc));
    wg::fence();
    product_rs<D>(acc, fa, Ks);
    wg::commit();
    wg::wait<0>();
    wg::pin(flat(acc));
    __syncthreads();  // every warp is done with this stage before issue() loads it again
  }
  put_rows<D / 8>(acc, a.scale, accumulate, dq, b, h, t0 + 16 * warp, a.T);
#else
  __trap();  // launched only where hopper_products_built() said the build has them
#endif
}

// Dynamic shared memory (with room to align to 1024 bytes): backward, the block's two tiles of its own rows
// and two stages of the other side's (dk/dv: with their lse and delta); forward, the queries and two
// stages of keys and values.
template <int D, int DV>
constexpr size_t wg_dkdv_smem() {
  return 1024 + 3 * (panels(D) + panels(DV)) * kPanel + 4 * 2 * 2 * kRowsT;
}
template <int D, int DV>
constexpr size_t wg_dq_smem() {  // 3 blocks an SM at D = 96
  return 1024 + 3 * (panels(D) + panels(DV)) * kPanel;
}
template <int D, int DV>
constexpr size_t wg_forward_smem() {
  return 1024 + (panels(D) + 2 * (panels(D) + panels(DV))) * kPanel;
}

}  // namespace tc
