// Device memory and the first fused kernels of the CUDA backend (RMSNorm, SiLU-gate; forward and
// backward). Loads and stores in the tensor's dtype, math in f32.
#include <cuda_bf16.h>

#include "core/check.h"
#include "core/cuda/cuda.h"
#include "core/cuda/cuda_check.h"

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

// Sum over a block of 256 threads.
__device__ float block_sum(float v) {
  __shared__ float partial[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.0f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;  // valid in warp 0
}

constexpr int kThreads = 256;

// One block per row: rstd = 1/sqrt(mean(x²) + eps); y = x · rstd · w.
template <typename T>
__global__ void rmsnorm_forward_kernel(const T* x, const float* w, float eps, T* y, float* rstd, int d) {
  const T* xr = x + static_cast<int64_t>(blockIdx.x) * d;
  float ss = 0;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float v = load(xr + i);
    ss += v * v;
  }
  __shared__ float s_rstd;
  ss = block_sum(ss);
  if (threadIdx.x == 0) {
    s_rstd = rsqrtf(ss / d + eps);
    rstd[blockIdx.x] = s_rstd;
  }
  __syncthreads();
  T* yr = y + static_cast<int64_t>(blockIdx.x) * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) store(yr + i, w[i] * (load(xr + i) * s_rstd));
}

// One block per row: n = x·rstd;  dx += rstd · (dy·w - n · mean(dy·w·n));  dw += dy·n (atomics).
template <typename T>
__global__ void rmsnorm_backward_kernel(const T* dy, const T* x, const float* w, const float* rstd, T* dx,
                                        float* dw, int d) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * d;
  const float r = rstd[blockIdx.x];
  float dot = 0;
  for (int i = threadIdx.x; i < d; i += blockDim.x) dot += load(dy + base + i) * w[i] * load(x + base + i) * r;
  __shared__ float s_mean;
  dot = block_sum(dot);
  if (threadIdx.x == 0) s_mean = dot / d;
  __syncthreads();
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float g = load(dy + base + i), n = load(x + base + i) * r;
    store(dx + base + i, load(dx + base + i) + r * (g * w[i] - n * s_mean));
    atomicAdd(&dw[i], g * n);
  }
}

// h = silu(g) · u over gu = [g | u].
template <typename T>
__global__ void silu_mul_forward_kernel(const T* gu, T* h, int64_t rows, int inter) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * inter) return;
  const int64_t r = i / inter, c = i % inter;
  const float g = load(gu + r * 2 * inter + c), u = load(gu + r * 2 * inter + inter + c);
  store(h + i, g / (1.0f + __expf(-g)) * u);
}

template <typename T>
__global__ void silu_mul_backward_kernel(const T* dh, const T* gu, T* dgu, int64_t rows, int inter) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * inter) return;
  const int64_t r = i / inter, c = i % inter;
  const int64_t gi = r * 2 * inter + c, ui = gi + inter;
  const float g = load(gu + gi), u = load(gu + ui), d = load(dh + i);
  const float s = 1.0f / (1.0f + __expf(-g));
  store(dgu + gi, load(dgu + gi) + d * u * s * (1.0f + g * (1.0f - s)));
  store(dgu + ui, load(dgu + ui) + d * g * s);
}

void check_rows(const Tensor& t, DType dtype) {
  CHECK(t.device() == Device::kCuda) << "expected a device tensor";
  CHECK(t.is_contiguous()) << "expected a contiguous tensor";
  CHECK(t.dtype() == dtype) << "dtype " << dtype_name(t.dtype()) << " vs " << dtype_name(dtype);
}

// Runs f with the element type of dtype (f32 or bf16).
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

Tensor zeros(const Shape& shape, DType dtype) {
  const size_t bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
  void* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, bytes == 0 ? 1 : bytes));
  CUDA_CHECK(cudaMemset(p, 0, bytes));
  auto st = std::make_shared<Storage>(p, bytes, Device::kCuda, [](void* q) { cudaFree(q); });
  return Tensor(std::move(st), 0, shape, contiguous_strides(shape), dtype);
}

void upload(const Tensor& host, Tensor& device) {
  CHECK(host.shape() == device.shape() && host.dtype() == device.dtype() && host.is_contiguous());
  CUDA_CHECK(cudaMemcpy(device.raw(), host.raw(), static_cast<size_t>(host.numel()) * dtype_size(host.dtype()),
                        cudaMemcpyHostToDevice));
}

Tensor download(const Tensor& device) {
  Tensor host = Tensor::zeros(device.shape(), device.dtype());
  CUDA_CHECK(cudaMemcpy(host.raw(), device.raw(), static_cast<size_t>(host.numel()) * dtype_size(host.dtype()),
                        cudaMemcpyDeviceToHost));
  return host;
}

void rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd) {
  check_rows(x, x.dtype());
  check_rows(y, x.dtype());
  check_rows(w, DType::kF32);
  check_rows(rstd, DType::kF32);
  const int64_t d = x.size(-1), rows = x.numel() / d;
  dispatch(x.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rmsnorm_forward_kernel<T><<<rows, kThreads>>>(x.data<T>(), w.f32(), eps, y.data<T>(), rstd.f32(),
                                                  static_cast<int>(d));
  });
  CUDA_CHECK(cudaGetLastError());
}

void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx,
                      Tensor& dw) {
  check_rows(dy, x.dtype());
  check_rows(x, x.dtype());
  check_rows(dx, x.dtype());
  const int64_t d = x.size(-1), rows = x.numel() / d;
  dispatch(x.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rmsnorm_backward_kernel<T><<<rows, kThreads>>>(dy.data<T>(), x.data<T>(), w.f32(), rstd.f32(), dx.data<T>(),
                                                   dw.f32(), static_cast<int>(d));
  });
  CUDA_CHECK(cudaGetLastError());
}

void silu_mul_forward(const Tensor& gu, Tensor& h) {
  check_rows(gu, gu.dtype());
  check_rows(h, gu.dtype());
  const int64_t inter = h.size(-1), rows = h.numel() / inter, n = rows * inter;
  CHECK_EQ(gu.size(-1), 2 * inter);
  dispatch(gu.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    silu_mul_forward_kernel<T><<<(n + kThreads - 1) / kThreads, kThreads>>>(gu.data<T>(), h.data<T>(), rows,
                                                                            static_cast<int>(inter));
  });
  CUDA_CHECK(cudaGetLastError());
}

void silu_mul_backward(const Tensor& dh, const Tensor& gu, Tensor& dgu) {
  check_rows(dh, gu.dtype());
  check_rows(gu, gu.dtype());
  check_rows(dgu, gu.dtype());
  const int64_t inter = dh.size(-1), rows = dh.numel() / inter, n = rows * inter;
  dispatch(gu.dtype(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    silu_mul_backward_kernel<T><<<(n + kThreads - 1) / kThreads, kThreads>>>(dh.data<T>(), gu.data<T>(),
                                                                             dgu.data<T>(), rows,
                                                                             static_cast<int>(inter));
  });
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace r1lab::core::cuda
