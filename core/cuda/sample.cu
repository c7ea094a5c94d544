// Token sampling on the device (the CPU reference is core/cpu/sample.cc): one block per sampled token,
// no sort. A cut that keeps a prefix of the ranking by (-logit, id) is a threshold on the logit's
// order-preserving 32-bit key plus a count of the tokens tied at it, which are kept in vocabulary order:
// top-k finds the k-th largest key and top-p the smallest key whose kept mass reaches top_p, each by a
// 32-step bitwise search over the keys; min-p is a threshold on p directly. The pick is one prefix sum
// over vocabulary-order chunks. All reductions run in a fixed order: repeated runs are bitwise equal.
// Rows of up to 32768 logits are read once into shared memory and every pass runs over them there;
// longer rows are read from memory in each pass. Rows whose spec asks for no cut (greedy, or a
// temperature alone: what R1-Zero's rollouts sample with) take a lighter path in the same kernel: the
// row in registers, read once, a max, a sum and a prefix sum over it and no 32-step searches.
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

// Whether spec row q cuts the ranking (top-k, min-p or top-p at a temperature above 0): the same tests
// as sample_kernel's below.
__device__ __forceinline__ bool wants_cut(const float* q, int64_t v) {
  const int64_t top_k = static_cast<int64_t>(q[kSpecTopK]);
  return q[kSpecTemperature] > 0 && ((top_k > 0 && top_k < v) || q[kSpecMinP] > 0 || q[kSpecTopP] < 1);
}

// The rows without a cut, v ≤ kPlainRow: the row held in registers. Warp w holds
// logits [w·kPlainSpan, (w + 1)·kPlainSpan) and its lane l, in round i, the four at w·kPlainSpan + 128·i +
// 4·l: the loads coalesce, and (warp, round, lane, element) is vocabulary order, so the pick is a scan in
// three levels: each round's lanes (shuffles), each warp's rounds in order, the warps (one warp's scan).
// The same rule as sample_kernel (the first maximum; the first token at which the running sum of p
// exceeds u · Σ p, the last token with p > 0 where rounding leaves none), its sums in another fixed
// order: repeated runs are bitwise equal. A thread's own work is trees rather than chains (a block an
// SM, its time is latency).
constexpr int kPlainThreads = kSampleThreads, kPlainRounds = 8;
constexpr int kPlainWarps = kPlainThreads / 32, kPlainSpan = 32 * 4 * kPlainRounds;
constexpr int64_t kPlainRow = int64_t{kPlainWarps} * kPlainSpan;  // 32768

// op over the 4·kPlainRounds values f(i, e) of a thread, as a tree.
template <typename T, typename F, typename Op>
__device__ __forceinline__ T plain_tree(F&& f, Op&& op) {
  T t[kPlainRounds];
#pragma unroll
  for (int i = 0; i < kPlainRounds; ++i) t[i] = op(op(f(i, 0), f(i, 1)), op(f(i, 2), f(i, 3)));
#pragma unroll
  for (int w = 1; w < kPlainRounds; w *= 2)
#pragma unroll
    for (int i = 0; i + w < kPlainRounds; i += 2 * w) t[i] = op(t[i], t[i + w]);
  return t[0];
}

// op over the block (every thread's v), through slots [kPlainWarps] of shared memory: the result in every
// thread. The caller's next use of slots comes after a barrier.
template <typename T, typename Op>
__device__ __forceinline__ T plain_block(T v, Op&& op, T* slots) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) slots[warp] = v;
  __syncthreads();
  T r = slots[0];
#pragma unroll
  for (int w = 1; w < kPlainWarps; ++w) r = op(r, slots[w]);
  return r;
}

// Spec row q (no cut) over logits row l of v ≤ kPlainRow values (row stride ld), by the whole block.
__device__ __forceinline__ void sample_plain(const float* l, int64_t ld, int v, const float* q, int32_t* token,
                                             float* logprob) {
  __shared__ float max_slots[kPlainWarps], sum_slots[kPlainWarps], warp_mass[kPlainWarps], warp_before[kPlainWarps];
  __shared__ int first_slots[kPlainWarps];
  __shared__ float total_all;
  __shared__ int pick_all, last_all;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const float temperature = q[kSpecTemperature];
  // x[i][e]: logit first + 128·i + e; -inf past v (never the first maximum, p = 0).
  const int first = warp * kPlainSpan + 4 * lane;
  const auto at = [&](int i, int e) { return first + 128 * i + e; };
  const bool vec = ld % 4 == 0 && (reinterpret_cast<uintptr_t>(l) & 15) == 0;
  float x[kPlainRounds][4];
#pragma unroll
  for (int i = 0; i < kPlainRounds; ++i) {
    if (vec && at(i, 3) < v) {
      const float4 f = *reinterpret_cast<const float4*>(l + at(i, 0));
      x[i][0] = f.x, x[i][1] = f.y, x[i][2] = f.z, x[i][3] = f.w;
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) x[i][e] = at(i, e) < v ? l[at(i, e)] : -INFINITY;
    }
  }
  const auto fmax = [](float a, float b) { return fmaxf(a, b); };
  const auto imin = [](int a, int b) { return a < b ? a : b; };
  const auto add = [](float a, float b) { return a + b; };
  // The maximum, then its first index (0 where none equals it: a row of NaNs).
  const float mx = plain_block(plain_tree<float>([&](int i, int e) { return x[i][e]; }, fmax), fmax, max_slots);
  const int at_max = plain_block(
      plain_tree<int>([&](int i, int e) { return x[i][e] == mx ? at(i, e) : INT_MAX; }, imin), imin, first_slots);
  int pick = at_max == INT_MAX ? 0 : at_max;
  // Σ exp(logit - max) for the log-sum-exp: at T = 1 the p below are those terms, and their sum comes
  // with the scan.
  float se = 0;
  if (!(temperature == 1.0f))
    se = plain_block(plain_tree<float>([&](int i, int e) { return expf(x[i][e] - mx); }, add), add, sum_slots);

  if (temperature > 0) {
    const float inv_t = 1.0f / temperature;
    // x becomes p = exp((logit - max) / T); own(i): this lane's four of round i summed in order (made
    // again where needed rather than held); upto[i]: the round's lanes' inclusive prefix sum.
    const auto own = [&](int i) { return ((x[i][0] + x[i][1]) + x[i][2]) + x[i][3]; };
    float upto[kPlainRounds];
#pragma unroll
    for (int i = 0; i < kPlainRounds; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) x[i][e] = expf((x[i][e] - mx) * inv_t);
      upto[i] = own(i);
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const float t = __shfl_up_sync(0xffffffffu, upto[i], o);
        if (lane >= o) upto[i] += t;
      }
    }
    const auto round_mass = [&](int i) { return __shfl_sync(0xffffffffu, upto[i], 31); };
    float mass = 0;  // the warp's, rounds in order
#pragma unroll
    for (int i = 0; i < kPlainRounds; ++i) mass += round_mass(i);
    if (lane == 0) warp_mass[warp] = mass;
    __syncthreads();
    if (warp == 0) {
      float u = warp_mass[lane];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const float t = __shfl_up_sync(0xffffffffu, u, o);
        if (lane >= o) u += t;
      }
      const float before = __shfl_up_sync(0xffffffffu, u, 1);
      warp_before[lane] = lane == 0 ? 0.0f : before;
      if (lane == 31) total_all = u;
      if (lane == 0) pick_all = INT_MAX, last_all = -1;
    }
    __syncthreads();
    const float total = total_all;
    if (temperature == 1.0f) se = total;
    const float target = q[kSpecUniform] * total;
    float run = warp_before[warp];  // the mass before this warp's round i
    int claimed = INT_MAX, last = -1;
#pragma unroll
    for (int i = 0; i < kPlainRounds; ++i) {
      const float lanes_before = __shfl_up_sync(0xffffffffu, upto[i], 1);
      const float before = run + (lane == 0 ? 0.0f : lanes_before);
      if (claimed == INT_MAX && before <= target && target - before < own(i)) {
        // Rounding may let two lanes claim it: the first wins below.
        const float local = target - before;
        float acc = 0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          acc += x[i][e];
          if (claimed == INT_MAX && acc > local) claimed = at(i, e);
        }
      }
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (x[i][e] > 0) last = at(i, e);
      run += round_mass(i);
    }
    if (claimed != INT_MAX) atomicMin(&pick_all, claimed);
    if (last >= 0) atomicMax(&last_all, last);
    __syncthreads();
    if (pick_all != INT_MAX) {
      pick = pick_all;
    } else if (last_all >= 0) {
      pick = last_all;
    }
  }
  if (tid == 0) {
    *token = pick;
    *logprob = l[pick] - (mx + logf(se));
  }
}

// One block a spec row. Rows without a cut take sample_plain where v allows; the others: kShared, the
// row is read once into shared memory, where every pass reads it, one padding float after each 32 (so
// that neither a warp's strided reads nor its threads' chunks meet in a bank); otherwise each pass reads
// it from memory.
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
  if (v <= kPlainRow && !wants_cut(q, v)) {
    sample_plain(l, ld, static_cast<int>(v), q, tokens + blockIdx.x, logprobs + blockIdx.x);
    return;
  }
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
