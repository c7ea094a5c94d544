// The CUDA backend's context and memory: a stream-ordered caching pool (cudaMallocAsync with the pool
// keeping what it frees), host <-> device copies, strided copy/add/fill, embeddings, row scatter, the
// per-op profiler and the optimizer (gradient norm and a fused AdamW over the one parameter buffer).
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstring>
#include <iterator>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_backend.h"

namespace r1lab::core::cuda {

// ---------------------------------------------------------------------------------------------------
// Shared helpers.

Context::~Context() {
  use_device(device);
  for (Side& s : sides) {
    cudaStreamSynchronize(s.stream);
    cudaFreeAsync(s.workspace, stream);
    cublasDestroy(s.blas);
    cudaEventDestroy(s.done);
    cudaStreamDestroy(s.stream);
  }
  if (fork) cudaEventDestroy(fork);
  for (auto& [p, bytes] : pinned) cudaFreeHost(p);
  if (workspace) cudaFreeAsync(workspace, stream);
  if (blas) cublasDestroy(blas);
  if (stream) {
    cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
  }
}

std::pair<void*, size_t> Context::take_pinned(size_t bytes) {
  {
    std::lock_guard<std::mutex> lk(pinned_mu);
    for (size_t i = 0; i < pinned.size(); ++i)
      if (pinned[i].second >= bytes) {
        const std::pair<void*, size_t> buffer = pinned[i];
        pinned.erase(pinned.begin() + static_cast<std::ptrdiff_t>(i));
        return buffer;
      }
  }
  void* p = nullptr;
  CUDA_CHECK(cudaMallocHost(&p, bytes));
  return {p, bytes};
}

void Context::give_pinned(void* p, size_t bytes) {
  std::lock_guard<std::mutex> lk(pinned_mu);
  pinned.emplace_back(p, bytes);
}

void check_device(const Tensor& t, DType dtype) {
  CHECK(t.defined() && t.device() == Device::kCuda) << "expected a device tensor";
  CHECK(t.dtype() == dtype) << "dtype " << dtype_name(t.dtype()) << ", expected " << dtype_name(dtype);
}

Rows rows_of(const Tensor& t) {
  CHECK(t.device() == Device::kCuda) << "expected a device tensor";
  CHECK(t.dim() >= 1);
  if (t.dim() == 1) {
    CHECK(t.stride(0) == 1 || t.size(0) <= 1);
    return Rows{t.raw(), 1, t.size(0), t.size(0)};
  }
  CHECK(t.stride(-1) == 1 || t.size(-1) == 1) << "last dimension must be contiguous, shape " << shape_str(t.shape());
  int64_t rows = 1;
  for (int d = 0; d < t.dim() - 1; ++d) rows *= t.size(d);
  for (int d = t.dim() - 3; d >= 0; --d)
    CHECK(t.size(d) == 1 || t.stride(d) == t.stride(d + 1) * t.size(d + 1))
        << "rows of " << shape_str(t.shape()) << " are not uniformly strided";
  return Rows{t.raw(), rows, t.size(-1), t.stride(-2)};
}

Dims4 dims4(const Tensor& t) {
  CHECK_LE(t.dim(), 4);
  Dims4 d{{1, 1, 1, 1}, {0, 0, 0, 0}};
  const int off = 4 - t.dim();
  for (int i = 0; i < t.dim(); ++i) {
    d.n[off + i] = t.size(i);
    d.s[off + i] = t.stride(i);
  }
  return d;
}

namespace {

constexpr int kThreads = 256;

// Flat element i of a shape [n0, n1, n2, n3] (row-major) to its offsets in two strided views of that
// shape (a: the one read, b: the one written). PairWide divides in 64 bits (any size); PairFast, for
// fewer than 2^31 elements, finds the coordinates once by 32-bit multiply-shift divisions (a few
// instructions where a 64-bit division takes dozens): the strided copies, conversions and adds.
struct PairWide {
  int64_t n[4], a[4], b[4];
  __device__ __forceinline__ void at(int64_t i, int64_t& oa, int64_t& ob) const {
    const int64_t i3 = i % n[3];
    i /= n[3];
    const int64_t i2 = i % n[2];
    i /= n[2];
    const int64_t i1 = i % n[1], i0 = i / n[1];
    oa = i0 * a[0] + i1 * a[1] + i2 * a[2] + i3 * a[3];
    ob = i0 * b[0] + i1 * b[1] + i2 * b[2] + i3 * b[3];
  }
};
// x / d for x < 2^31 and 1 <= d < 2^31: (umulhi(x, m) + x) >> s, with s = ceil(log2 d) and
// m = floor(2^32 (2^s - d) / d) + 1.
struct FastDiv {
  uint32_t d = 1, m = 1, s = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t div) : d(div) {
    while ((uint64_t{1} << s) < d) ++s;
    m = static_cast<uint32_t>((uint64_t{1} << 32) * ((uint64_t{1} << s) - d) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t x) const { return (__umulhi(x, m) + x) >> s; }
};
struct PairFast {
  FastDiv n1, n2, n3;
  int64_t a[4], b[4];
  __device__ __forceinline__ void at(int64_t i64, int64_t& oa, int64_t& ob) const {
    const uint32_t i = static_cast<uint32_t>(i64);
    const uint32_t q3 = n3.div(i), i3 = i - q3 * n3.d;
    const uint32_t q2 = n2.div(q3), i2 = q3 - q2 * n2.d;
    const uint32_t i0 = n1.div(q2), i1 = q2 - i0 * n1.d;
    oa = i0 * a[0] + i1 * a[1] + i2 * a[2] + i3 * a[3];
    ob = i0 * b[0] + i1 * b[1] + i2 * b[2] + i3 * b[3];
  }
};

// f(pair) for views a and b of one shape: PairFast where it holds the elements, else PairWide.
template <typename F>
void with_pair(const Tensor& a, const Tensor& b, F&& f) {
  const Dims4 da = dims4(a), db = dims4(b);
  if (a.numel() > 0 && a.numel() < (int64_t{1} << 31)) {  // (every size at least 1: no division by 0)
    PairFast p{FastDiv(static_cast<uint32_t>(da.n[1])), FastDiv(static_cast<uint32_t>(da.n[2])),
               FastDiv(static_cast<uint32_t>(da.n[3])), {}, {}};
    std::copy(std::begin(da.s), std::end(da.s), p.a);
    std::copy(std::begin(db.s), std::end(db.s), p.b);
    f(p);
  } else {
    PairWide p;
    std::copy(std::begin(da.n), std::end(da.n), p.n);
    std::copy(std::begin(da.s), std::end(da.s), p.a);
    std::copy(std::begin(db.s), std::end(db.s), p.b);
    f(p);
  }
}

template <typename T, typename P>
__global__ void copy_kernel(const T* src, T* dst, P p, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t os, od;
    p.at(i, os, od);
    dst[od] = src[os];
  }
}

// f32 -> bf16 (round to nearest even) and bf16 -> f32, any strides.
template <typename P>
__global__ void to_bf16_copy_kernel(const float* src, __nv_bfloat16* dst, P p, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t os, od;
    p.at(i, os, od);
    dst[od] = __float2bfloat16(src[os]);
  }
}
template <typename P>
__global__ void from_bf16_copy_kernel(const __nv_bfloat16* src, float* dst, P p, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t os, od;
    p.at(i, os, od);
    dst[od] = __bfloat162float(src[os]);
  }
}

// y[m, c] += Σ_h x[m, h, c] in head order; thread i takes (m, c) = (i / d, i % d) (a warp: consecutive c).
__global__ void sum_heads_kernel(const float* x, int64_t x0, int64_t x1, int64_t heads, float* y, int64_t y0,
                                 uint32_t d, uint32_t n) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const uint32_t m = i / d, c = i - m * d;
    const float* xr = x + m * x0 + c;
    float acc = y[m * y0 + c];
    for (int64_t h = 0; h < heads; ++h) acc += xr[h * x1];
    y[m * y0 + c] = acc;
  }
}

template <typename P>
__global__ void add_kernel(const float* x, float* y, P p, int64_t n, float alpha) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t ox, oy;
    p.at(i, ox, oy);
    y[oy] += alpha * x[ox];
  }
}

// The same on contiguous tensors, 4 elements a thread (the residual adds: no index arithmetic).
__global__ void add_vec4_kernel(const float4* x, float4* y, int64_t n4, float alpha) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n4;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float4 a = x[i];
    float4 b = y[i];
    b.x += alpha * a.x;
    b.y += alpha * a.y;
    b.z += alpha * a.z;
    b.w += alpha * a.w;
    y[i] = b;
  }
}

__global__ void fill_kernel(float* p, int64_t n, float v) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = v;
}

unsigned grid_for(int64_t n) { return static_cast<unsigned>(std::min<int64_t>(blocks(n, kThreads), 65536)); }

// Strided element-wise work 4 elements a thread (see by4): group i is flat elements 4i .. 4i + 3, which
// lie side by side in the last dimension, so one index computation and one vector access serve four.
template <typename T, typename V, typename P>
__global__ void copy4_kernel(const T* src, T* dst, P p, int64_t n4) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n4;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t os, od;
    p.at(4 * i, os, od);
    *reinterpret_cast<V*>(dst + od) = *reinterpret_cast<const V*>(src + os);
  }
}
template <typename P>
__global__ void to_bf16_copy4_kernel(const float* src, __nv_bfloat16* dst, P p, int64_t n4) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n4;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t os, od;
    p.at(4 * i, os, od);
    const float4 v = *reinterpret_cast<const float4*>(src + os);
    __nv_bfloat162* d = reinterpret_cast<__nv_bfloat162*>(dst + od);
    d[0] = __floats2bfloat162_rn(v.x, v.y);
    d[1] = __floats2bfloat162_rn(v.z, v.w);
  }
}
template <typename P>
__global__ void add4_kernel(const float* x, float* y, P pr, int64_t n4, float alpha) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n4;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t ox, oy;
    pr.at(4 * i, ox, oy);
    const float4 a = *reinterpret_cast<const float4*>(x + ox);
    float4* p = reinterpret_cast<float4*>(y + oy);
    float4 b = *p;
    b.x += alpha * a.x;
    b.y += alpha * a.y;
    b.z += alpha * a.z;
    b.w += alpha * a.w;
    *p = b;
  }
}

// Whether strided element-wise work on these views can go 4 elements at a time: each one's last
// dimension contiguous and a multiple of 4 long, its base and other strides keeping groups of 4
// elements aligned to 4 elements' bytes.
bool by4(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) {
    if (t->dim() == 0 || t->size(-1) % 4 != 0 || t->stride(-1) != 1 ||
        reinterpret_cast<uintptr_t>(t->raw()) % (4 * dtype_size(t->dtype())) != 0)
      return false;
    for (int d = 0; d + 1 < t->dim(); ++d)
      if (t->stride(d) % 4 != 0) return false;
  }
  return true;
}

// out[m] = table[ids[m]] (one block per row); a bad id writes zeros.
__global__ void embedding_kernel(const float* table, int64_t ldt, int64_t vocab, const int32_t* ids, float* out,
                                 int64_t ldo, int64_t cols) {
  const int32_t id = ids[blockIdx.x];
  float* o = out + blockIdx.x * ldo;
  const bool ok = id >= 0 && id < vocab;
  const float* t = table + (ok ? id : 0) * ldt;
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) o[i] = ok ? t[i] : 0.0f;
}

// After a stable sort of (id, m): the first block of each run of one id sums dout over the run in m
// order and adds it to dtable[id] (deterministic, no atomics).
__global__ void embedding_backward_kernel(const int32_t* sorted_ids, const int32_t* sorted_m, int64_t n,
                                          const float* dout, int64_t ldd, float* dtable, int64_t ldt,
                                          int64_t vocab, int64_t cols) {
  const int64_t i = blockIdx.x;
  const int32_t id = sorted_ids[i];
  if ((i > 0 && sorted_ids[i - 1] == id) || id < 0 || id >= vocab) return;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float acc = 0;
    for (int64_t j = i; j < n && sorted_ids[j] == id; ++j) acc += dout[sorted_m[j] * ldd + c];
    dtable[id * ldt + c] += acc;
  }
}

__global__ void iota_kernel(int32_t* p, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) p[i] = static_cast<int32_t>(i);
}

template <typename T>
__global__ void scatter_rows_kernel(const float* src, int64_t lds, const int32_t* rows, T* dst, int64_t ldd,
                                    int64_t n_dst, int64_t cols) {
  const int32_t r = rows[blockIdx.x];
  if (r < 0 || r >= n_dst) return;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    if constexpr (std::is_same_v<T, float>) dst[r * ldd + c] = src[blockIdx.x * lds + c];
    else dst[r * ldd + c] = __float2bfloat16_rn(src[blockIdx.x * lds + c]);
  }
}

// scatter_rows_kernel for narrow rows (fewer columns than a warp): a thread an element.
template <typename T>
__global__ void scatter_narrow_rows_kernel(const float* src, int64_t lds, const int32_t* rows, T* dst, int64_t ldd,
                                           int64_t n_dst, int64_t n_src, int64_t cols) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n_src * cols) return;
  const int64_t s = i / cols, c = i % cols;
  const int32_t r = rows[s];
  if (r < 0 || r >= n_dst) return;
  if constexpr (std::is_same_v<T, float>) dst[r * ldd + c] = src[s * lds + c];
  else dst[r * ldd + c] = __float2bfloat16_rn(src[s * lds + c]);
}

// ---- optimizer: the spans cut into chunks of at most kChunk elements, one block each.
constexpr int64_t kChunk = 1 << 16;
struct Chunk {
  int64_t offset, numel;
  int32_t decay, pad;
};

// A chunk's 16-byte aligned body four elements at a time (as adamw_kernel below), its ends one at a time.
__global__ void sum_squares_kernel(const float* x, const Chunk* chunks, double* partial, bool vec4) {
  const Chunk c = chunks[blockIdx.x];
  const int64_t end = c.offset + c.numel;
  const int64_t body = vec4 ? min(end, (c.offset + 3) / 4 * 4) : end, body_end = max(body, end / 4 * 4);
  double s = 0;
  const auto add = [&](double v) { s += v * v; };
  for (int64_t i = c.offset + threadIdx.x; i < body; i += blockDim.x) add(x[i]);
  for (int64_t i = body_end + threadIdx.x; i < end; i += blockDim.x) add(x[i]);
  // 4 float4 loads in flight a thread (one at a time leaves the memory system underused), summed in the
  // same order as one at a time.
  const int64_t step = 4 * static_cast<int64_t>(blockDim.x);
  int64_t i = body + 4 * static_cast<int64_t>(threadIdx.x);
  for (; i + 3 * step < body_end; i += 4 * step) {
    float4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = *reinterpret_cast<const float4*>(x + i + u * step);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      add(v[u].x);
      add(v[u].y);
      add(v[u].z);
      add(v[u].w);
    }
  }
  for (; i < body_end; i += step) {
    const float4 v = *reinterpret_cast<const float4*>(x + i);
    add(v.x);
    add(v.y);
    add(v.z);
    add(v.w);
  }
  __shared__ double part[kThreads];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int o = kThreads / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = part[0];
}

// One block sums the partials in a fixed order.
__global__ void sum_partials_kernel(const double* partial, int64_t n, double* out) {
  __shared__ double part[kThreads];
  double s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int o = kThreads / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = part[0];
}

// The CPU reference's double-precision arithmetic, element by element.
struct AdamWElem {
  double wd, b1, b2;
  const AdamWUpdate& u;
  // One element in the CPU reference's double math (bitwise the same results).
  __device__ __forceinline__ void operator()(float& w, float g, float& m, float& v) const {
    const double gi = g * u.grad_scale;
    const double mi = b1 * m + (1.0 - b1) * gi;
    const double vi = b2 * v + (1.0 - b2) * gi * gi;
    m = static_cast<float>(mi);
    v = static_cast<float>(vi);
    double wi = w;
    wi -= wd * wi;
    wi -= u.lr * (mi / u.bias_correction1) / (sqrt(vi / u.bias_correction2) + u.eps);
    w = static_cast<float>(wi);
  }
};

// A chunk's unaligned head and tail one element a thread, its 16-byte aligned body four at a time
// (128-bit loads keep more bytes in flight: the update is bound by memory bandwidth).
// With rounded (not null), the updated weights also go there as bf16.
__global__ void adamw_kernel(float* w, const float* g, float* m, float* v, const Chunk* chunks, AdamWUpdate u,
                             bool vec4, __nv_bfloat16* rounded) {
  const Chunk c = chunks[blockIdx.x];
  const AdamWElem step{c.decay ? u.lr * u.weight_decay : 0.0, u.beta1, u.beta2, u};
  const int64_t end = c.offset + c.numel;
  const int64_t body = vec4 ? min(end, (c.offset + 3) / 4 * 4) : end, body_end = max(body, end / 4 * 4);
  const auto one = [&](int64_t i) {
    step(w[i], g[i], m[i], v[i]);
    if (rounded) rounded[i] = __float2bfloat16(w[i]);
  };
  for (int64_t i = c.offset + threadIdx.x; i < body; i += blockDim.x) one(i);
  for (int64_t i = body_end + threadIdx.x; i < end; i += blockDim.x) one(i);
  for (int64_t i = body + 4 * static_cast<int64_t>(threadIdx.x); i < body_end; i += 4 * blockDim.x) {
    float4 wv = *reinterpret_cast<float4*>(w + i), mv = *reinterpret_cast<float4*>(m + i),
           vv = *reinterpret_cast<float4*>(v + i);
    const float4 gv = *reinterpret_cast<const float4*>(g + i);
    step(wv.x, gv.x, mv.x, vv.x);
    step(wv.y, gv.y, mv.y, vv.y);
    step(wv.z, gv.z, mv.z, vv.z);
    step(wv.w, gv.w, mv.w, vv.w);
    *reinterpret_cast<float4*>(w + i) = wv;
    *reinterpret_cast<float4*>(m + i) = mv;
    *reinterpret_cast<float4*>(v + i) = vv;
    if (rounded) {
      __nv_bfloat162* r = reinterpret_cast<__nv_bfloat162*>(rounded + i);
      r[0] = __floats2bfloat162_rn(wv.x, wv.y);
      r[1] = __floats2bfloat162_rn(wv.z, wv.w);
    }
  }
}

}  // namespace

bool available(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear
    if (why) *why = std::string("no usable CUDA driver/device: ") + cudaGetErrorString(e);
    return false;
  }
  if (n == 0) {
    if (why) *why = "no CUDA device";
    return false;
  }
  return true;
}

absl::StatusOr<std::unique_ptr<Backend>> make_backend(const Options& options) {
  std::string why;
  if (!available(&why)) return absl::FailedPreconditionError(absl::StrCat("--device cuda: ", why));
  int n = 0;
  CUDA_CHECK(cudaGetDeviceCount(&n));
  if (options.device < 0 || options.device >= n)
    return absl::InvalidArgumentError(absl::StrCat("CUDA device ", options.device, " does not exist (", n, " found)"));
  return std::unique_ptr<Backend>(new CudaBackend(options));
}

CudaBackend::CudaBackend(const Options& options) : opt_(options), ctx_(std::make_shared<Context>()) {
  ctx_->device = options.device;
  CUDA_CHECK(cudaSetDevice(options.device));
  CUDA_CHECK(cudaStreamCreateWithFlags(&ctx_->stream, cudaStreamNonBlocking));
  CUDA_CHECK(cudaDeviceGetDefaultMemPool(&ctx_->pool, options.device));
  uint64_t keep = UINT64_MAX;  // a caching pool: freed memory stays reserved for the next allocation
  CUDA_CHECK(cudaMemPoolSetAttribute(ctx_->pool, cudaMemPoolAttrReleaseThreshold, &keep));
  CUBLAS_CHECK(cublasCreate(&ctx_->blas));
  CUBLAS_CHECK(cublasSetStream(ctx_->blas, ctx_->stream));
  constexpr size_t kWorkspace = 32 << 20;
  CUDA_CHECK(cudaMallocAsync(&ctx_->workspace, kWorkspace, ctx_->stream));
  CUBLAS_CHECK(cublasSetWorkspace(ctx_->blas, ctx_->workspace, kWorkspace));
  CUBLAS_CHECK(cublasSetPointerMode(ctx_->blas, CUBLAS_POINTER_MODE_HOST));
  // Deterministic: no atomics-based reductions inside cuBLAS.
  CUBLAS_CHECK(cublasSetAtomicsMode(ctx_->blas, CUBLAS_ATOMICS_NOT_ALLOWED));
  hopper_ = options.hopper_products && hopper_products_built(options.device);
}

CudaBackend::~CudaBackend() {
  synchronize();
  for (Pending& p : pending_) {
    cudaEventDestroy(p.start);
    cudaEventDestroy(p.stop);
  }
}

std::string CudaBackend::name() const {
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, opt_.device));
  const char* prec = opt_.gemm == Options::GemmPrecision::kF32    ? "f32"
                     : opt_.gemm == Options::GemmPrecision::kTF32 ? "tf32"
                                                                  : "bf16";
  return absl::StrCat("cuda:", opt_.device, " (", prop.name, ", gemm ", prec, opt_.batch_invariant ? " batch-invariant" : "",
                      hopper_ ? ", wgmma" : "", ")");
}

void use_device(int device) {
  int current = -1;
  CUDA_CHECK(cudaGetDevice(&current));
  if (current != device) CUDA_CHECK(cudaSetDevice(device));
}

void CudaBackend::synchronize() {
  use_device(ctx_->device);
  CUDA_CHECK(cudaStreamSynchronize(ctx_->stream));
}

// A CUDA graph of the stream's work. Allocations made and freed inside become the graph's own memory
// nodes; the profiler's events would time the capture, not the replays, so a profiling backend runs
// everything as it comes.
std::function<void()> CudaBackend::capture(const std::function<void()>& work) {
  if (!can_capture()) return {};
  use_device(ctx_->device);
  CUDA_CHECK(cudaStreamBeginCapture(ctx_->stream, cudaStreamCaptureModeThreadLocal));
  work();
  cudaGraph_t graph = nullptr;
  CUDA_CHECK(cudaStreamEndCapture(ctx_->stream, &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t made = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  CUDA_CHECK(made);
  std::shared_ptr<CUgraphExec_st> held(exec, [](cudaGraphExec_t e) { cudaGraphExecDestroy(e); });
  std::shared_ptr<Context> ctx = ctx_;
  return [held, ctx] {
    use_device(ctx->device);
    CUDA_CHECK(cudaGraphLaunch(held.get(), ctx->stream));
  };
}

// ---------------------------------------------------------------------------------------------------
// Memory.

Tensor CudaBackend::zeros(const Shape& shape, DType dtype) {
  Tensor t = uncleared(shape, dtype);
  if (t.numel()) CUDA_CHECK(cudaMemsetAsync(t.raw(), 0, static_cast<size_t>(t.numel()) * dtype_size(dtype), ctx_->stream));
  return t;
}

const std::vector<Context::Side>& CudaBackend::fork_sides() {
  constexpr int kSides = 4;
  constexpr size_t kWorkspace = 8 << 20;
  use_device(ctx_->device);
  if (ctx_->sides.empty()) {
    CUDA_CHECK(cudaEventCreateWithFlags(&ctx_->fork, cudaEventDisableTiming));
    for (int i = 0; i < kSides; ++i) {
      Context::Side s;
      CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
      CUDA_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
      CUBLAS_CHECK(cublasCreate(&s.blas));
      CUBLAS_CHECK(cublasSetStream(s.blas, s.stream));
      CUDA_CHECK(cudaMallocAsync(&s.workspace, kWorkspace, ctx_->stream));
      CUBLAS_CHECK(cublasSetWorkspace(s.blas, s.workspace, kWorkspace));
      CUBLAS_CHECK(cublasSetPointerMode(s.blas, CUBLAS_POINTER_MODE_HOST));
      CUBLAS_CHECK(cublasSetAtomicsMode(s.blas, CUBLAS_ATOMICS_NOT_ALLOWED));
      ctx_->sides.push_back(s);
    }
  }
  CUDA_CHECK(cudaEventRecord(ctx_->fork, ctx_->stream));
  for (const Context::Side& s : ctx_->sides) CUDA_CHECK(cudaStreamWaitEvent(s.stream, ctx_->fork));
  return ctx_->sides;
}

void CudaBackend::join_sides() {
  for (const Context::Side& s : ctx_->sides) {
    CUDA_CHECK(cudaEventRecord(s.done, s.stream));
    CUDA_CHECK(cudaStreamWaitEvent(ctx_->stream, s.done));
  }
}

Tensor CudaBackend::empty(const Shape& shape, DType dtype) {
  Tensor t = uncleared(shape, dtype);
  if (opt_.poison_empty && t.numel())
    CUDA_CHECK(cudaMemsetAsync(t.raw(), 0xFF, static_cast<size_t>(t.numel()) * dtype_size(dtype), ctx_->stream));
  return t;
}

Tensor CudaBackend::uncleared(const Shape& shape, DType dtype) {
  const size_t bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
  void* p = nullptr;
  use_device(ctx_->device);
  CUDA_CHECK(cudaMallocAsync(&p, bytes == 0 ? 16 : bytes, ctx_->stream));
  std::shared_ptr<Context> ctx = ctx_;
  auto st = std::make_shared<Storage>(p, bytes, Device::kCuda, [ctx](void* q) {
    use_device(ctx->device);
    cudaFreeAsync(q, ctx->stream);
  });
  return Tensor(std::move(st), 0, shape, contiguous_strides(shape), dtype);
}

void CudaBackend::upload(const Tensor& host, Tensor& dst) {
  CHECK(host.shape() == dst.shape() && host.dtype() == dst.dtype()) << shape_str(host.shape()) << " vs "
                                                                    << shape_str(dst.shape());
  CHECK(host.device() == Device::kCpu && dst.device() == Device::kCuda);
  CHECK(host.is_contiguous() && dst.is_contiguous());
  use_device(ctx_->device);
  // From pageable memory this returns once the source is staged, so the caller may free it at once.
  CUDA_CHECK(cudaMemcpyAsync(dst.raw(), host.raw(), static_cast<size_t>(host.numel()) * dtype_size(host.dtype()),
                             cudaMemcpyHostToDevice, ctx_->stream));
}

Tensor CudaBackend::download(const Tensor& src) {
  CHECK(src.device() == Device::kCuda);
  if (!src.is_contiguous()) {
    Tensor c = zeros(src.shape(), src.dtype());
    copy(src, c);
    return download(c);
  }
  Tensor host = Tensor::empty(src.shape(), src.dtype());  // every byte is copied in
  use_device(ctx_->device);
  CUDA_CHECK(cudaMemcpyAsync(host.raw(), src.raw(), static_cast<size_t>(src.numel()) * dtype_size(src.dtype()),
                             cudaMemcpyDeviceToHost, ctx_->stream));
  synchronize();
  return host;
}

namespace {

// A copy under way into pinned memory: done once its event is; the buffer goes back to the context.
struct LaterCopy {
  std::shared_ptr<Context> ctx;
  void* pinned = nullptr;
  size_t bytes = 0;  // the buffer's size
  cudaEvent_t done = nullptr;
  ~LaterCopy() {
    use_device(ctx->device);
    cudaEventSynchronize(done);
    cudaEventDestroy(done);
    ctx->give_pinned(pinned, bytes);
  }
};

}  // namespace

std::function<Tensor()> CudaBackend::download_later(const Tensor& src) {
  CHECK(src.device() == Device::kCuda);
  if (!src.is_contiguous()) {
    Tensor c = empty(src.shape(), src.dtype());
    copy(src, c);
    return download_later(c);
  }
  use_device(ctx_->device);
  auto later = std::make_shared<LaterCopy>();
  later->ctx = ctx_;
  std::tie(later->pinned, later->bytes) =
      ctx_->take_pinned(std::max<size_t>(16, static_cast<size_t>(src.numel()) * dtype_size(src.dtype())));
  CUDA_CHECK(cudaMemcpyAsync(later->pinned, src.raw(), static_cast<size_t>(src.numel()) * dtype_size(src.dtype()),
                             cudaMemcpyDeviceToHost, ctx_->stream));
  CUDA_CHECK(cudaEventCreateWithFlags(&later->done, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventRecord(later->done, ctx_->stream));
  const Shape shape = src.shape();
  const DType dtype = src.dtype();
  return [later, shape, dtype] {
    use_device(later->ctx->device);
    CUDA_CHECK(cudaEventSynchronize(later->done));
    Tensor host = Tensor::empty(shape, dtype);
    std::memcpy(host.raw(), later->pinned, static_cast<size_t>(host.numel()) * dtype_size(dtype));
    return host;
  };
}

void CudaBackend::copy(const Tensor& src, Tensor& dst) {
  CHECK(src.shape() == dst.shape()) << shape_str(src.shape()) << " vs " << shape_str(dst.shape());
  CHECK(src.device() == Device::kCuda && dst.device() == Device::kCuda);
  const int64_t n = src.numel();
  if (n == 0) return;
  if (src.dtype() != dst.dtype()) {
    const char* name = "copy_convert";
    if (opt_.profile && opt_.profile_shapes) {
      const std::string shape = "copy_convert " + shape_str(src.shape()) + " " + dtype_name(src.dtype()) + "→" +
                                dtype_name(dst.dtype()) +
                                (src.is_contiguous() && dst.is_contiguous() ? "" : " strided");
      name = op_names_.insert(shape).first->c_str();
    }
    Op op(this, name, 0, 6.0 * n);
    if (src.dtype() == DType::kF32 && dst.dtype() == DType::kBF16) {
      if (src.is_contiguous() && dst.is_contiguous()) {
        to_bf16(src.f32(), 1, n, n, 1, 0, dst.raw());  // one row
      } else {
        const bool vec = by4({&src, &dst});
        with_pair(src, dst, [&](auto p) {
          auto* d = static_cast<__nv_bfloat16*>(dst.raw());
          if (vec)
            to_bf16_copy4_kernel<<<grid_for(n / 4), kThreads, 0, stream()>>>(src.f32(), d, p, n / 4);
          else
            to_bf16_copy_kernel<<<grid_for(n), kThreads, 0, stream()>>>(src.f32(), d, p, n);
        });
      }
    } else {
      CHECK(src.dtype() == DType::kBF16 && dst.dtype() == DType::kF32)
          << "copy: " << dtype_name(src.dtype()) << " to " << dtype_name(dst.dtype());
      with_pair(src, dst, [&](auto p) {
        from_bf16_copy_kernel<<<grid_for(n), kThreads, 0, stream()>>>(static_cast<const __nv_bfloat16*>(src.raw()),
                                                                      dst.f32(), p, n);
      });
    }
    CUDA_CHECK(cudaGetLastError());
    return;
  }
  Op op(this, "copy", 0, 2.0 * n * dtype_size(src.dtype()));
  if (src.is_contiguous() && dst.is_contiguous()) {
    CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src.raw(), static_cast<size_t>(n) * dtype_size(src.dtype()),
                               cudaMemcpyDeviceToDevice, stream()));
    return;
  }
  const bool vec = by4({&src, &dst});
  const size_t es = dtype_size(src.dtype());
  CHECK(es == 2 || es == 4 || es == 8) << "copy: unsupported dtype " << dtype_name(src.dtype());
  with_pair(src, dst, [&](auto p) {
    if (vec && es == 4) {
      copy4_kernel<uint32_t, uint4>
          <<<grid_for(n / 4), kThreads, 0, stream()>>>(src.data<uint32_t>(), dst.data<uint32_t>(), p, n / 4);
    } else if (vec && es == 2) {
      copy4_kernel<uint16_t, uint2>
          <<<grid_for(n / 4), kThreads, 0, stream()>>>(src.data<uint16_t>(), dst.data<uint16_t>(), p, n / 4);
    } else if (es == 4) {
      copy_kernel<<<grid_for(n), kThreads, 0, stream()>>>(src.data<uint32_t>(), dst.data<uint32_t>(), p, n);
    } else if (es == 2) {
      copy_kernel<<<grid_for(n), kThreads, 0, stream()>>>(src.data<uint16_t>(), dst.data<uint16_t>(), p, n);
    } else {
      copy_kernel<<<grid_for(n), kThreads, 0, stream()>>>(src.data<uint64_t>(), dst.data<uint64_t>(), p, n);
    }
  });
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::add(const Tensor& x, Tensor& y, float alpha) {
  CHECK(x.shape() == y.shape()) << shape_str(x.shape()) << " vs " << shape_str(y.shape());
  check_device(x, DType::kF32);
  check_device(y, DType::kF32);
  const int64_t n = x.numel();
  if (n == 0) return;
  Op op(this, "add", n, 12.0 * n);
  if (x.is_contiguous() && y.is_contiguous() && n % 4 == 0 && reinterpret_cast<uintptr_t>(x.raw()) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(y.raw()) % 16 == 0) {
    add_vec4_kernel<<<grid_for(n / 4), kThreads, 0, stream()>>>(static_cast<const float4*>(x.raw()),
                                                                static_cast<float4*>(y.raw()), n / 4, alpha);
  } else {
    const bool vec = by4({&x, &y});
    with_pair(x, y, [&](auto p) {
      if (vec)
        add4_kernel<<<grid_for(n / 4), kThreads, 0, stream()>>>(x.f32(), y.f32(), p, n / 4, alpha);
      else
        add_kernel<<<grid_for(n), kThreads, 0, stream()>>>(x.f32(), y.f32(), p, n, alpha);
    });
  }
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::sum_heads(const Tensor& x, Tensor& y) {
  check_device(x, DType::kF32);
  check_device(y, DType::kF32);
  CHECK(x.dim() == 3 && y.dim() == 3 && y.size(1) == 1 && x.size(0) == y.size(0) && x.size(2) == y.size(2) &&
        x.stride(2) == 1 && y.stride(2) == 1)
      << "sum_heads of " << shape_str(x.shape()) << " into " << shape_str(y.shape());
  const int64_t n = x.size(0) * x.size(2);
  if (n == 0) return;
  CHECK_LE(n, int64_t{1} << 31) << "sum_heads over " << n << " rows and columns (indexed in 32 bits)";
  Op op(this, "sum_heads", 1.0 * x.numel(), 4.0 * (x.numel() + 2 * n));
  sum_heads_kernel<<<grid_for(n), kThreads, 0, stream()>>>(x.f32(), x.stride(0), x.stride(1), x.size(1), y.f32(),
                                                           y.stride(0), static_cast<uint32_t>(x.size(2)),
                                                           static_cast<uint32_t>(n));
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::fill(Tensor& t, float value) {
  check_device(t, DType::kF32);
  CHECK(t.is_contiguous());
  const int64_t n = t.numel();
  if (n == 0) return;
  Op op(this, "fill", 0, 4.0 * n);
  if (value == 0.0f) {
    CUDA_CHECK(cudaMemsetAsync(t.raw(), 0, static_cast<size_t>(n) * 4, stream()));
    return;
  }
  fill_kernel<<<grid_for(n), kThreads, 0, stream()>>>(t.f32(), n, value);
  CUDA_CHECK(cudaGetLastError());
}

void* CudaBackend::scratch(size_t bytes) {
  if (!scratch_.defined() || static_cast<size_t>(scratch_.numel()) < bytes)
    scratch_ = zeros({static_cast<int64_t>(std::max<size_t>(bytes, 1 << 20) + 3) / 4}, DType::kI32);
  return scratch_.raw();
}

// ---------------------------------------------------------------------------------------------------
// Embeddings and rows.

void CudaBackend::embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out) {
  const Rows t = rows_of(table), o = rows_of(out);
  check_device(ids, DType::kI32);
  check_device(table, DType::kF32);
  check_device(out, DType::kF32);
  CHECK(ids.is_contiguous());
  CHECK_EQ(ids.numel(), o.rows);
  CHECK_EQ(t.cols, o.cols);
  if (o.rows == 0) return;
  Op op(this, "embedding", 0, 8.0 * o.rows * o.cols);
  embedding_kernel<<<static_cast<unsigned>(o.rows), kThreads, 0, stream()>>>(
      t.f(), t.ld, t.rows, ids.data<int32_t>(), o.f(), o.ld, o.cols);
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable) {
  const Rows d = rows_of(dout), t = rows_of(dtable);
  check_device(ids, DType::kI32);
  CHECK(ids.is_contiguous());
  CHECK_EQ(ids.numel(), d.rows);
  CHECK_EQ(t.cols, d.cols);
  const int64_t n = d.rows;
  if (n == 0) return;
  Op op(this, "embedding_backward", n * d.cols, 12.0 * n * d.cols);
  // Stable radix sort of (id, m) so that every id's rows are summed in order.
  Tensor keys = zeros({2 * n}, DType::kI32), vals = zeros({2 * n}, DType::kI32);
  int32_t* m_in = vals.data<int32_t>();
  int32_t* m_out = m_in + n;
  int32_t* k_out = keys.data<int32_t>() + n;
  iota_kernel<<<blocks(n, kThreads), kThreads, 0, stream()>>>(m_in, n);
  size_t temp = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp, ids.data<int32_t>(), k_out, m_in, m_out,
                                             static_cast<int>(n), 0, 32, stream()));
  void* tmp = scratch(temp);
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(tmp, temp, ids.data<int32_t>(), k_out, m_in, m_out,
                                             static_cast<int>(n), 0, 32, stream()));
  embedding_backward_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream()>>>(k_out, m_out, n, d.f(), d.ld, t.f(),
                                                                                 t.ld, t.rows, d.cols);
  CUDA_CHECK(cudaGetLastError());
}

void CudaBackend::scatter_rows(const Tensor& src, const Tensor& rows, Tensor& dst) {
  const Rows s = rows_of(src), d = rows_of(dst);
  check_device(rows, DType::kI32);
  check_device(src, DType::kF32);
  CHECK_EQ(rows.numel(), s.rows);
  CHECK_EQ(s.cols, d.cols);
  if (s.rows == 0) return;
  CHECK(dst.dtype() == DType::kF32 || dst.dtype() == DType::kBF16) << "scatter_rows into f32 or bf16";
  Op op(this, "scatter_rows", 0, (4.0 + dtype_size(dst.dtype())) * s.rows * s.cols);
  if (s.cols < 32) {  // narrow rows (a value or a few a row): a thread an element, not a block a row
    const unsigned grid = static_cast<unsigned>((s.rows * s.cols + 255) / 256);
    if (dst.dtype() == DType::kBF16)
      scatter_narrow_rows_kernel<<<grid, 256, 0, stream()>>>(s.f(), s.ld, rows.data<int32_t>(),
                                                            static_cast<__nv_bfloat16*>(d.p), d.ld, d.rows, s.rows,
                                                            s.cols);
    else
      scatter_narrow_rows_kernel<<<grid, 256, 0, stream()>>>(s.f(), s.ld, rows.data<int32_t>(), d.f(), d.ld, d.rows,
                                                            s.rows, s.cols);
  } else if (dst.dtype() == DType::kBF16)
    scatter_rows_kernel<<<static_cast<unsigned>(s.rows), kThreads, 0, stream()>>>(
        s.f(), s.ld, rows.data<int32_t>(), static_cast<__nv_bfloat16*>(d.p), d.ld, d.rows, s.cols);
  else
    scatter_rows_kernel<<<static_cast<unsigned>(s.rows), kThreads, 0, stream()>>>(s.f(), s.ld, rows.data<int32_t>(),
                                                                                  d.f(), d.ld, d.rows, s.cols);
  CUDA_CHECK(cudaGetLastError());
}


// ---------------------------------------------------------------------------------------------------
// Optimizer.

const void* CudaBackend::span_chunks(const std::vector<ParamSpan>& spans, int64_t* n_chunks) {
  const bool same = spans.size() == cached_spans_.size() &&
                    std::equal(spans.begin(), spans.end(), cached_spans_.begin(), [](const ParamSpan& a, const ParamSpan& b) {
                      return a.offset == b.offset && a.numel == b.numel && a.decay == b.decay;
                    });
  if (!same || !span_table_.defined()) {
    std::vector<Chunk> chunks;
    for (const ParamSpan& s : spans)
      for (int64_t o = 0; o < s.numel; o += kChunk)
        chunks.push_back({s.offset + o, std::min(kChunk, s.numel - o), s.decay ? 1 : 0, 0});
    span_chunks_ = static_cast<int64_t>(chunks.size());
    static_assert(sizeof(Chunk) % 4 == 0);
    const int64_t words = span_chunks_ * static_cast<int64_t>(sizeof(Chunk) / 4);
    span_table_ = zeros({std::max<int64_t>(1, words)}, DType::kI32);
    if (!chunks.empty()) {
      Tensor host = Tensor::wrap(chunks.data(), {words}, DType::kI32);
      upload(host, span_table_);
    }
    cached_spans_ = spans;
  }
  *n_chunks = span_chunks_;
  return span_table_.raw();
}

double CudaBackend::sum_squares(const Tensor& x, const std::vector<ParamSpan>& spans) {
  check_device(x, DType::kF32);
  CHECK(x.is_contiguous());
  for (const ParamSpan& s : spans) CHECK(s.offset >= 0 && s.numel >= 0 && s.offset + s.numel <= x.numel());
  int64_t n = 0;
  const Chunk* chunks = static_cast<const Chunk*>(span_chunks(spans, &n));
  if (n == 0) return 0.0;
  Op op(this, "sum_squares", 2.0 * x.numel(), 4.0 * x.numel());
  Tensor partial = zeros({n + 1}, DType::kI64);  // doubles
  double* p = partial.data<double>();
  const bool vec4 = reinterpret_cast<uintptr_t>(x.raw()) % 16 == 0;
  sum_squares_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream()>>>(x.f32(), chunks, p, vec4);
  sum_partials_kernel<<<1, kThreads, 0, stream()>>>(p, n, p + n);
  CUDA_CHECK(cudaGetLastError());
  double out = 0;
  CUDA_CHECK(cudaMemcpyAsync(&out, p + n, sizeof(double), cudaMemcpyDeviceToHost, stream()));
  synchronize();
  return out;
}

void CudaBackend::adamw_update(Tensor& w, const Tensor& g, Tensor& m, Tensor& v, const std::vector<ParamSpan>& spans,
                               const AdamWUpdate& u, Tensor* rounded) {
  for (const Tensor* t : std::initializer_list<const Tensor*>{&w, &g, &m, &v}) {
    check_device(*t, DType::kF32);
    CHECK(t->is_contiguous() && t->numel() == w.numel());
  }
  for (const ParamSpan& s : spans) CHECK(s.offset >= 0 && s.numel >= 0 && s.offset + s.numel <= w.numel());
  int64_t n = 0;
  const Chunk* chunks = static_cast<const Chunk*>(span_chunks(spans, &n));
  if (n == 0) return;
  __nv_bfloat16* r = nullptr;
  if (rounded != nullptr) {
    check_device(*rounded, DType::kBF16);
    CHECK(rounded->is_contiguous() && rounded->numel() == w.numel()) << "adamw_update: rounded copy of "
                                                                      << shape_str(rounded->shape());
    r = static_cast<__nv_bfloat16*>(rounded->raw());
  }
  Op op(this, "adamw", 10.0 * w.numel(), (r ? 30.0 : 28.0) * w.numel());
  const bool vec4 = (reinterpret_cast<uintptr_t>(w.raw()) | reinterpret_cast<uintptr_t>(g.raw()) |
                     reinterpret_cast<uintptr_t>(m.raw()) | reinterpret_cast<uintptr_t>(v.raw())) %
                            16 ==
                        0 &&
                    reinterpret_cast<uintptr_t>(r) % 8 == 0;
  adamw_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream()>>>(w.f32(), g.f32(), m.f32(), v.f32(), chunks, u,
                                                                     vec4, r);
  CUDA_CHECK(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------------
// Profiling.

CudaBackend::Op::Op(CudaBackend* be, const char* name, double flops, double bytes)
    : be_(be), name_(name), flops_(flops), bytes_(bytes) {
  use_device(be_->ctx_->device);
  if (!be_->opt_.profile) return;
  uint64_t used = 0;
  CUDA_CHECK(cudaMemPoolGetAttribute(be_->ctx_->pool, cudaMemPoolAttrUsedMemCurrent, &used));
  const int64_t call = ++be_->op_calls_[name];
  if (used > be_->mem_high_.bytes) be_->mem_high_ = {static_cast<size_t>(used), be_->mem_high_.start, name, call};
  CUDA_CHECK(cudaEventCreate(&start_));
  CUDA_CHECK(cudaEventRecord(start_, be_->stream()));
}

CudaBackend::Op::~Op() {
  if (!start_) return;
  cudaEvent_t stop;
  CUDA_CHECK(cudaEventCreate(&stop));
  CUDA_CHECK(cudaEventRecord(stop, be_->stream()));
  be_->pending_.push_back({name_, start_, stop, flops_, bytes_});
  if (be_->pending_.size() > 20000) be_->profile();  // resolve what is pending
}

std::vector<OpTime> CudaBackend::profile() {
  synchronize();
  for (Pending& p : pending_) {
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, p.start, p.stop));
    OpTime& t = times_[p.name];
    t.op = p.name;
    t.calls += 1;
    t.ms += ms;
    t.flops += p.flops;
    t.bytes += p.bytes;
    CUDA_CHECK(cudaEventDestroy(p.start));
    CUDA_CHECK(cudaEventDestroy(p.stop));
  }
  pending_.clear();
  std::vector<OpTime> out;
  for (const auto& [name, t] : times_) out.push_back(t);
  return out;
}

void CudaBackend::reset_profile() {
  profile();
  times_.clear();
  uint64_t used = 0;
  CUDA_CHECK(cudaMemPoolGetAttribute(ctx_->pool, cudaMemPoolAttrUsedMemCurrent, &used));
  mem_high_ = {static_cast<size_t>(used), static_cast<size_t>(used), "", 0};
  op_calls_.clear();
}

size_t CudaBackend::peak_memory() const {
  uint64_t high = 0;
  CUDA_CHECK(cudaMemPoolGetAttribute(ctx_->pool, cudaMemPoolAttrUsedMemHigh, &high));
  return high;
}

void CudaBackend::reset_peak_memory() {
  uint64_t zero = 0;
  CUDA_CHECK(cudaMemPoolSetAttribute(ctx_->pool, cudaMemPoolAttrUsedMemHigh, &zero));
}

std::vector<OpTime> profile(Backend& backend) { return dynamic_cast<CudaBackend&>(backend).profile(); }
void reset_profile(Backend& backend) { dynamic_cast<CudaBackend&>(backend).reset_profile(); }
size_t peak_memory(Backend& backend) { return dynamic_cast<CudaBackend&>(backend).peak_memory(); }
void reset_peak_memory(Backend& backend) { dynamic_cast<CudaBackend&>(backend).reset_peak_memory(); }
MemoryHigh memory_high(Backend& backend) { return dynamic_cast<CudaBackend&>(backend).memory_high(); }

}  // namespace r1lab::core::cuda
