// Token sampling on the device (the CPU reference is core/cpu/sample.cc): one block per sampled token,
// no sort. A cut that keeps a prefix of the ranking by (-logit, id) is a threshold on the logit's
// order-preserving 32-bit key plus a count of the tokens tied at it, which are kept in vocabulary order:
// top-k finds the k-th largest key and top-p the smallest key whose kept mass reaches top_p, each by a
// 32-step bitwise search over the keys; min-p is a threshold on p directly. The pick is one prefix sum
// over vocabulary-order chunks. All reductions run in a fixed order: repeated runs are bitwise equal.
// Rows of up to 32768 logits are read once into shared memory and every pass runs over them there;
// longer rows are read from memory in each pass.
#include <climits>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "core/check.h"
#include "core/cuda/cuda_backend.h"

namespace r1lab::core::cuda {
namespace {

constexpr int kSampleThreads = 1024;
// Rows up to this many logits are held in shared memory (with their padding, 132 KiB of it).
constexpr int64_t kSharedRow = 32768;

// Order-preserving key of a float (a < b  <=>  key(a) < key(b)); -0 is read as +0, so they tie as floats do.
__device__ __forceinline__ uint32_t key_of(float x) {
  const uint32_t u = __float_as_uint(x == 0.0f ? 0.0f : x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float float_of(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct MaxAt {  // the larger value, then the lower index
  float v;
  int64_t at;
};
struct MaxAtOp {
  __device__ MaxAt operator()(const MaxAt& a, const MaxAt& b) const {
    if (b.at < 0) return a;
    if (a.at < 0 || b.v > a.v || (b.v == a.v && b.at < a.at)) return b;
    return a;
  }
};
struct KeyMinOp {
  __device__ uint32_t operator()(uint32_t a, uint32_t b) const { return a < b ? a : b; }
};
__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
struct MassCount {  // Σ p and a count
  float mass;
  int64_t n;
};
struct MassCountOp {
  __device__ MassCount operator()(const MassCount& a, const MassCount& b) const { return {a.mass + b.mass, a.n + b.n}; }
};

// kShared: the row is read once into shared memory, where every pass reads it, one padding float after
// each 32 (so that neither a warp's strided reads nor its threads' chunks meet in a bank); otherwise
// each pass reads it from memory.
template <bool kShared>
__global__ void __launch_bounds__(kSampleThreads)
    sample_kernel(const float* logits, int64_t rows, int64_t ld, int64_t v, const float* spec, int32_t* tokens,
                  float* logprobs) {
  using MaxReduce = cub::BlockReduce<MaxAt, kSampleThreads>;
  using MassReduce = cub::BlockReduce<MassCount, kSampleThreads>;
  using FloatReduce = cub::BlockReduce<float, kSampleThreads>;
  using KeyReduce = cub::BlockReduce<uint32_t, kSampleThreads>;
  using IntScan = cub::BlockScan<int64_t, kSampleThreads>;
  using FloatScan = cub::BlockScan<float, kSampleThreads>;
  __shared__ union {
    typename MaxReduce::TempStorage max;
    typename MassReduce::TempStorage mass;
    typename FloatReduce::TempStorage f;
    typename KeyReduce::TempStorage key;
    typename IntScan::TempStorage iscan;
    typename FloatScan::TempStorage fscan;
  } tmp;
  __shared__ MaxAt best_all;
  __shared__ MassCount mc_all;
  __shared__ float f_all;
  __shared__ uint32_t key_all;
  __shared__ unsigned long long pick_all;
  __shared__ long long last_all;
  const int tid = threadIdx.x;
  // Reductions broadcast through shared memory; the syncs keep the temp storage free for the next one.
  auto mass_count = [&](MassCount x) {
    x = MassReduce(tmp.mass).Reduce(x, MassCountOp());
    if (tid == 0) mc_all = x;
    __syncthreads();
    const MassCount r = mc_all;
    __syncthreads();
    return r;
  };

  const float* q = spec + static_cast<int64_t>(blockIdx.x) * kSampleSpecColumns;
  const int64_t row = static_cast<int64_t>(q[kSpecRow]);
  if (row < 0 || row >= rows) {  // the host checks; a bad row must still not read outside logits
    if (tid == 0) tokens[blockIdx.x] = -1, logprobs[blockIdx.x] = NAN;
    return;
  }
  const float* l = logits + row * ld;
  const float temperature = q[kSpecTemperature], top_p = q[kSpecTopP], min_p = q[kSpecMinP];
  const int64_t top_k = static_cast<int64_t>(q[kSpecTopK]);

  // This thread's chunk of the row in vocabulary order, [lo, hi); the pick scans the chunks in order.
  const int64_t chunk = (v + kSampleThreads - 1) / kSampleThreads;
  const int64_t lo = imin(v, tid * chunk), hi = imin(v, lo + chunk);
  extern __shared__ float held[];
  const auto padded = [](int64_t j) { return j + (j >> 5); };
  if constexpr (kShared) {
    int64_t j0 = 0;
    if (ld % 4 == 0 && (reinterpret_cast<uintptr_t>(l) & 15) == 0) {
      j0 = v & ~int64_t{3};
      constexpr int kLoads = kSharedRow / (4 * kSampleThreads);  // all in flight at once
      float4 f[kLoads];
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int64_t j = 4 * (tid + int64_t{u} * kSampleThreads);
        if (j < j0) f[u] = *reinterpret_cast<const float4*>(l + j);
      }
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int64_t j = 4 * (tid + int64_t{u} * kSampleThreads);
        float* h = held + padded(j);  // j .. j + 3 lie within one run of 32
        if (j < j0) h[0] = f[u].x, h[1] = f[u].y, h[2] = f[u].z, h[3] = f[u].w;
      }
    }
    for (int64_t j = j0 + tid; j < v; j += kSampleThreads) held[padded(j)] = l[j];
    __syncthreads();
  }
  const auto logit = [&](int64_t j) {
    if constexpr (kShared) {
      return held[padded(j)];
    } else {
      return l[j];
    }
  };
  // f(j, logit) over this thread's share of the row: for reductions (any fixed order will do)...
  auto each = [&](auto&& f) {
    for (int64_t j = tid; j < v; j += kSampleThreads) f(j, logit(j));
  };
  // ... and over its chunk in vocabulary order, for the pick.
  auto each_in_order = [&](auto&& f) {
    for (int64_t j = lo; j < hi; ++j) f(j, logit(j));
  };

  // The maximum (first index) and the log-sum-exp of the unmodified row.
  MaxAt best{-INFINITY, -1};
  each([&](int64_t j, float x) { best = MaxAtOp()(best, MaxAt{x, j}); });
  best = MaxReduce(tmp.max).Reduce(best, MaxAtOp());
  if (tid == 0) best_all = best;
  __syncthreads();
  const float mx = best_all.v;
  float se = 0;
  each([&](int64_t, float x) { se += expf(x - mx); });
  se = FloatReduce(tmp.f).Sum(se);
  if (tid == 0) f_all = se;
  __syncthreads();
  const float lse = mx + logf(f_all);
  __syncthreads();
  int64_t pick = best_all.at;

  if (temperature > 0) {
    const float inv_t = 1.0f / temperature;
    auto p_of = [&](float x) { return expf((x - mx) * inv_t); };  // p_max = 1
    // Kept: key > cut, or key == cut among the first `ties` such tokens in vocabulary order.
    uint32_t cut = key_of(-INFINITY);
    int64_t ties = LLONG_MAX, kept = v;
    if (top_k > 0 && top_k < v) {
      // The k-th largest key: the largest t with #(key >= t) >= k.
      uint32_t t = 0;
      for (int b = 31; b >= 0; --b) {
        const uint32_t cand = t | (1u << b);
        int64_t n = 0;
        each([&](int64_t, float x) { n += key_of(x) >= cand; });
        if (mass_count({0.0f, n}).n >= top_k) t = cand;
      }
      int64_t gt = 0;
      each([&](int64_t, float x) { gt += key_of(x) > t; });
      cut = t;
      ties = top_k - mass_count({0.0f, gt}).n;
      kept = top_k;
    }
    if (min_p > 0) {
      // p >= min_p is a threshold on the key (p is monotone in the logit), ties all in or all out.
      uint32_t lowest = UINT_MAX;
      int64_t n = 0;
      each([&](int64_t, float x) {
        if (p_of(x) >= min_p) lowest = umin(lowest, key_of(x)), ++n;
      });
      const int64_t n_all = mass_count({0.0f, n}).n;
      lowest = KeyReduce(tmp.key).Reduce(lowest, KeyMinOp());
      if (tid == 0) key_all = lowest;
      __syncthreads();
      if (n_all < kept) {
        cut = key_all;
        ties = LLONG_MAX;
        kept = n_all;
      }
      __syncthreads();
    }
    if (top_p < 1) {
      // The kept mass, then the largest key t whose kept mass at or above it reaches top_p of it.
      MassCount part{0.0f, 0};
      each([&](int64_t, float x) {
        const uint32_t k = key_of(x);
        if (k > cut) part.mass += p_of(x);
        part.n += k == cut;
      });
      const MassCount above = mass_count(part);
      const float p_cut = p_of(float_of(cut));
      const float mass = above.mass + static_cast<float>(imin(ties, above.n)) * p_cut;
      const float target = top_p * mass;
      uint32_t t = 0;
      for (int b = 31; b >= 0; --b) {
        const uint32_t cand = t | (1u << b);
        if (cand <= cut) {
          t = cand;
          continue;
        }
        float m = 0;
        each([&](int64_t, float x) {
          if (key_of(x) >= cand) m += p_of(x);
        });
        if (mass_count({m, 0}).mass >= target) t = cand;  // uniform across the block
      }
      MassCount at{0.0f, 0};
      each([&](int64_t, float x) {
        const uint32_t k = key_of(x);
        if (k > t) at.mass += p_of(x);
        at.n += k == t;
      });
      at = mass_count(at);
      const int64_t avail = t == cut ? imin(ties, at.n) : at.n;
      const float p_t = p_of(float_of(t));
      int64_t need = p_t > 0 ? static_cast<int64_t>(ceilf((target - at.mass) / p_t)) : avail;
      need = imax(1, imin(need, avail));
      cut = t;
      ties = need;
    }

    // The pick: chunks of the vocabulary in order, one per thread; tied tokens ranked by a scan first.
    int64_t tie_base = 0;
    if (ties != LLONG_MAX) {
      int64_t eq = 0;
      each_in_order([&](int64_t, float x) { eq += key_of(x) == cut; });
      IntScan(tmp.iscan).ExclusiveSum(eq, tie_base);
      __syncthreads();
    }
    auto weight = [&](float x, int64_t& tie_rank) {
      const uint32_t k = key_of(x);
      if (k < cut) return 0.0f;
      if (k == cut && tie_rank++ >= ties) return 0.0f;
      return p_of(x);
    };
    float own = 0;
    int64_t last = -1, rank = tie_base;
    each_in_order([&](int64_t j, float x) {
      const float w = weight(x, rank);
      own += w;
      if (w > 0) last = j;
    });
    float before = 0, total = 0;
    FloatScan(tmp.fscan).ExclusiveSum(own, before, total);
    if (tid == 0) {
      pick_all = ULLONG_MAX;
      last_all = -1;
    }
    __syncthreads();
    const float target = q[kSpecUniform] * total;
    if (before <= target && target - before < own) {
      const float local = target - before;
      float acc = 0;
      int64_t claimed = -1;
      rank = tie_base;
      each_in_order([&](int64_t j, float x) {
        if (claimed >= 0) return;
        acc += weight(x, rank);
        if (acc > local) claimed = j;
      });
      // Rounding may let two chunks claim it.
      if (claimed >= 0) atomicMin(&pick_all, static_cast<unsigned long long>(claimed));
    }
    if (last >= 0) atomicMax(&last_all, static_cast<long long>(last));
    __syncthreads();
    if (pick_all != ULLONG_MAX) {
      pick = static_cast<int64_t>(pick_all);
    } else if (last_all >= 0) {
      pick = last_all;
    }
  }
  if (tid == 0) {
    tokens[blockIdx.x] = static_cast<int32_t>(pick);
    logprobs[blockIdx.x] = l[pick] - lse;
  }
}

}  // namespace

void CudaBackend::sample_tokens(const Tensor& logits, const Tensor& spec, Tensor& tokens, Tensor& logprobs) {
  const Rows L = rows_of(logits);
  check_device(spec, DType::kF32);
  check_device(tokens, DType::kI32);
  check_device(logprobs, DType::kF32);
  CHECK(spec.is_contiguous() && spec.dim() == 2 && spec.size(1) == kSampleSpecColumns);
  const int64_t n = spec.size(0);
  CHECK(tokens.numel() == n && logprobs.numel() == n && tokens.is_contiguous() && logprobs.is_contiguous());
  if (n == 0) return;
  Op op(this, "sample_tokens", 0, 4.0 * n * L.cols);
  const unsigned blocks = static_cast<unsigned>(n);
  if (L.cols <= kSharedRow) {
    const size_t bytes = sizeof(float) * static_cast<size_t>(L.cols + L.cols / 32 + 1);
    CUDA_CHECK(cudaFuncSetAttribute(sample_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(bytes)));
    sample_kernel<true><<<blocks, kSampleThreads, bytes, stream()>>>(L.f(), L.rows, L.ld, L.cols, spec.f32(),
                                                                     tokens.data<int32_t>(), logprobs.f32());
  } else {
    sample_kernel<false><<<blocks, kSampleThreads, 0, stream()>>>(L.f(), L.rows, L.ld, L.cols, spec.f32(),
                                                                  tokens.data<int32_t>(), logprobs.f32());
  }
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace r1lab::core::cuda
