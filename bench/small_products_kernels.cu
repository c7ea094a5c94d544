// The small kernel of bench/small_products' kernel chains (nvcc apart from the host code's headers).
#include <cuda_runtime.h>

#include <algorithm>

#include "core/cuda/cuda_check.h"
#include "core/cuda/mma.cuh"  // tc::cp_async16 and its commit and wait

namespace {

// A small elementwise kernel, as a decode step's norms and gathers are: y = x + 1 over n floats. With
// programmatic dependent launch (PDL), blocks wait for the kernel before (griddepcontrol.wait) and let
// the next one launch as soon as they are all running (griddepcontrol.launch_dependents). Both need
// sm_90; builds for older devices (sm_80) run the chain without them.
__global__ void bump_kernel(const float* x, float* y, int n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] = x[i] + 1.0f;
}

}  // namespace

void launch_bump(cudaStream_t s, bool pdl, const float* x, float* y, int n) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(std::min(264, (n + 255) / 256)));
  cfg.blockDim = dim3(256);
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  CUDA_CHECK(cudaLaunchKernelEx(&cfg, bump_kernel, x, y, n));
}


// ---------------------------------------------------------------------------------------------------
// How a block streams weights into shared memory, as the experts' products of a decode step do: a
// [rows, 2048-byte] matrix (k 1024 in bf16), a block per 128 rows, in steps of 128 bytes of every row
// (16 KB a step, the products' tile order) or of 16 KB lying contiguously (a pre-tiled layout), through
// a ring of kStages buffers, by cp.async (16 bytes a thread a copy) or by the copy engine's bulk copies
// (cp.async.bulk, completion counted on an mbarrier). The consumer only folds the bytes (xor) so that
// memory is all there is to time.
namespace {

constexpr int kStreamRows = 128, kRowBytes = 2048, kStepBytes = 16384, kStreamThreads = 256;
constexpr int kSteps = kRowBytes / 128;

__device__ __forceinline__ void fold(uint4& acc, uint4 v) { acc.x ^= v.x, acc.y ^= v.y, acc.z ^= v.z, acc.w ^= v.w; }

// This thread's share of a step's buffer folded into acc.
__device__ __forceinline__ void fold_step(uint4& acc, const unsigned char* buf) {
#pragma unroll
  for (int u = 0; u < kStepBytes / 16 / kStreamThreads; ++u)
    fold(acc, reinterpret_cast<const uint4*>(buf)[threadIdx.x + u * kStreamThreads]);
}

__device__ __forceinline__ void put_fold(uint4 acc, unsigned* out) {
  const unsigned v = acc.x ^ acc.y ^ acc.z ^ acc.w;
  if (v == 0x9e3779b9u) out[blockIdx.x] = v;  // never, in practice; keeps the loads alive
}

// Byte offset of step s's piece u (of 16 bytes) in the block's 128 rows: strided (row r's 128 bytes
// at column s) or contiguous.
template <bool kTiled>
__device__ __forceinline__ size_t piece_offset(int s, int u) {
  if constexpr (kTiled) return static_cast<size_t>(s) * kStepBytes + 16 * u;
  return static_cast<size_t>(u / 8) * kRowBytes + s * 128 + 16 * (u % 8);
}

// kPhantom: each step also issues half as many zero-filling copies (source size 0) into a second
// buffer, as a product's tile of rows past a group's end would. kTokens: each step also brings the
// block's tile of token rows, as the experts' gate/up product (64-row tiles) does: 64 rows' 128 bytes,
// 32 of them read (from the first 2 MB of w, shared by 8 blocks as 8 column tiles share their token
// rows, so mostly from L2) and 32 zero-filled (a group of 32 rows in a tile of 64).
template <int kStages, bool kTiled, bool kPhantom = false, bool kTokens = false>
__global__ void __launch_bounds__(kStreamThreads) stream_cp_async_kernel(const unsigned char* w, unsigned* out) {
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ __align__(16) unsigned char phantom[kPhantom ? kStepBytes / 2 : 16];
  constexpr int kTokenStep = 64 * 128;  // bytes of a step's token tile
  const unsigned char* base = w + static_cast<size_t>(blockIdx.x) * kStreamRows * kRowBytes;
  const unsigned char* tokens = w + static_cast<size_t>(blockIdx.x / 8 % 32) * 32 * kRowBytes;
  const auto issue = [&](int s) {
    if (s < kSteps) {
      unsigned char* buf = ring + (s % kStages) * (kStepBytes + (kTokens ? kTokenStep : 0));
#pragma unroll
      for (int k = 0; k < kStepBytes / 16 / kStreamThreads; ++k) {
        const int u = threadIdx.x + k * kStreamThreads;
        tc::cp_async16(buf + 16 * u, base + piece_offset<kTiled>(s, u), true);
      }
      if constexpr (kPhantom) {
        for (int u = threadIdx.x; u < kStepBytes / 32; u += kStreamThreads) tc::cp_async16(phantom + 16 * u, base, false);
      }
      if constexpr (kTokens) {
#pragma unroll
        for (int k = 0; k < kTokenStep / 16 / kStreamThreads; ++k) {
          const int u = threadIdx.x + k * kStreamThreads, r = u / 8;
          tc::cp_async16(buf + kStepBytes + 16 * u, tokens + r * kRowBytes + s * 128 + 16 * (u % 8), r < 32);
        }
      }
    }
    tc::cp_async_commit();
  };
  for (int s = 0; s < kStages - 1; ++s) issue(s);
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int s = 0; s < kSteps; ++s) {
    tc::cp_async_wait<kStages - 2>();
    __syncthreads();
    issue(s + kStages - 1);
    const unsigned char* buf = ring + (s % kStages) * (kStepBytes + (kTokens ? kTokenStep : 0));
    fold_step(acc, buf);
    if constexpr (kTokens) {
#pragma unroll
      for (int u = 0; u < kTokenStep / 16 / kStreamThreads; ++u)
        fold(acc, reinterpret_cast<const uint4*>(buf + kStepBytes)[threadIdx.x + u * kStreamThreads]);
    }
  }
  put_fold(acc, out);
}

template <int kStages, bool kTiled>
__global__ void __launch_bounds__(kStreamThreads) stream_bulk_kernel(const unsigned char* w, unsigned* out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ __align__(8) unsigned long long full[kStages];
  const auto smem_addr = [](const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); };
  const unsigned char* base = w + static_cast<size_t>(blockIdx.x) * kStreamRows * kRowBytes;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kStages; ++i) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(&full[i])));
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::);
  }
  __syncthreads();
  // The first warp issues a step: lane 0 sets the bytes to expect, then the lanes copy 128-byte row
  // pieces (strided) or lane 0 the whole step (tiled).
  const auto issue = [&](int s) {
    if (s >= kSteps || threadIdx.x >= 32) return;
    unsigned char* buf = ring + (s % kStages) * kStepBytes;
    const unsigned bar = smem_addr(&full[s % kStages]);
    if (threadIdx.x == 0)
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(kStepBytes) : "memory");
    __syncwarp();
    if constexpr (kTiled) {
      if (threadIdx.x == 0)
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                         smem_addr(buf)),
                     "l"(base + piece_offset<true>(s, 0)), "r"(kStepBytes), "r"(bar)
                     : "memory");
    } else {
      for (int r = threadIdx.x; r < kStreamRows; r += 32)
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 128, [%2];\n" ::"r"(
                         smem_addr(buf + 128 * r)),
                     "l"(base + static_cast<size_t>(r) * kRowBytes + s * 128), "r"(bar)
                     : "memory");
    }
  };
  for (int s = 0; s < kStages - 1; ++s) issue(s);
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int s = 0; s < kSteps; ++s) {
    __syncthreads();  // every thread is done with step s - 1's buffer, which step s + kStages - 1 takes
    issue(s + kStages - 1);
    const unsigned bar = smem_addr(&full[s % kStages]), parity = (s / kStages) & 1;
    unsigned done = 0;
    while (!done)
      asm volatile(
          "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(bar), "r"(parity)
          : "memory");
    fold_step(acc, ring + (s % kStages) * kStepBytes);
  }
  put_fold(acc, out);
#endif
}

// Plain loads, 16 bytes a thread, the whole matrix over a grid of 4 blocks an SM: the ceiling.
__global__ void stream_plain_kernel(const uint4* w, size_t n, unsigned* out) {
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    fold(acc, __ldcs(w + i));
  }
  put_fold(acc, out);
}

template <typename K>
void launch_stream(K kernel, cudaStream_t s, int stages, int blocks, const unsigned char* w, unsigned* out,
                   size_t step_bytes = kStepBytes) {
  const size_t smem = static_cast<size_t>(stages) * step_bytes;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<blocks, kStreamThreads, smem, s>>>(w, out);
}

// Each way of streaming `blocks` blocks' rows at w.
void launch_plain(cudaStream_t s, int blocks, const unsigned char* w, unsigned* out) {
  int sms = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  stream_plain_kernel<<<4 * sms, 256, 0, s>>>(reinterpret_cast<const uint4*>(w),
                                              static_cast<size_t>(blocks) * kStreamRows * kRowBytes / 16, out);
}
template <int kStages, bool kTiled, bool kPhantom = false, bool kTokens = false>
void launch_cp_async(cudaStream_t s, int blocks, const unsigned char* w, unsigned* out) {
  launch_stream(stream_cp_async_kernel<kStages, kTiled, kPhantom, kTokens>, s, kStages, blocks, w, out,
                kStepBytes + (kTokens ? 64 * 128 : 0));
}
template <int kStages, bool kTiled>
void launch_bulk(cudaStream_t s, int blocks, const unsigned char* w, unsigned* out) {
  launch_stream(stream_bulk_kernel<kStages, kTiled>, s, kStages, blocks, w, out);
}

struct StreamVariant {
  const char* name;
  void (*launch)(cudaStream_t, int, const unsigned char*, unsigned*);
};
constexpr StreamVariant kStreamVariants[] = {
    {"plain loads (16 B a thread)", launch_plain},
    {"cp.async, row pieces, 3 stages", launch_cp_async<3, false>},
    {"cp.async, row pieces, 6 stages", launch_cp_async<6, false>},
    {"cp.async, tiled, 3 stages", launch_cp_async<3, true>},
    {"cp.async, tiled, 6 stages", launch_cp_async<6, true>},
    {"bulk, row pieces, 3 stages", launch_bulk<3, false>},
    {"bulk, row pieces, 6 stages", launch_bulk<6, false>},
    {"bulk, tiled, 3 stages", launch_bulk<3, true>},
    {"bulk, tiled, 6 stages", launch_bulk<6, true>},
    {"cp.async, row pieces, 3 stages, + half as many zero-filling copies", launch_cp_async<3, false, true>},
    {"cp.async, row pieces, 3 stages, + the token tile (32 rows read, 32 zero-filled)",
     launch_cp_async<3, false, false, true>},
};

}  // namespace

int stream_variants() { return static_cast<int>(sizeof(kStreamVariants) / sizeof(kStreamVariants[0])); }

// Streams rows × 2048 bytes at w by variant v (0 .. stream_variants() - 1); its name into *name.
void launch_stream_variant(int v, cudaStream_t s, const unsigned char* w, int64_t rows, unsigned* out,
                           const char** name) {
  *name = kStreamVariants[v].name;
  kStreamVariants[v].launch(s, static_cast<int>(rows / kStreamRows), w, out);
  CUDA_CHECK(cudaGetLastError());
}
