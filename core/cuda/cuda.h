// The CUDA side of core: device memory and the fused kernels so far, each matching a CPU reference op
// (core/cpu). Tensors passed here live on the device (Device::kCuda); f32 or bf16 activations with f32
// math and f32 statistics. The full Backend over these kernels is the CUDA backend's work.
#pragma once

#include <string>

#include "core/tensor.h"

namespace r1lab::core::cuda {

// True when a usable GPU is present; otherwise *why says what is missing (no device, no driver).
bool available(std::string* why);

// A zero-filled contiguous tensor in device memory.
Tensor zeros(const Shape& shape, DType dtype = DType::kF32);
// Host <-> device copies of contiguous tensors of one shape and dtype.
void upload(const Tensor& host, Tensor& device);
Tensor download(const Tensor& device);

// As CpuBackend::rmsnorm_forward/backward; x, y, dy, dx: [M, D] contiguous f32 or bf16 (one dtype);
// w, dw, rstd: f32. dx and dw accumulate.
void rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd);
void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx,
                      Tensor& dw);
// As CpuBackend::silu_mul_forward/backward; gu [M, 2I], h [M, I], f32 or bf16. dgu accumulates.
void silu_mul_forward(const Tensor& gu, Tensor& h);
void silu_mul_backward(const Tensor& dh, const Tensor& gu, Tensor& dgu);

}  // namespace r1lab::core::cuda
