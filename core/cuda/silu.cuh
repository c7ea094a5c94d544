// The SiLU gate, silu(g) · u = g / (1 + e^-g) · u, as every CUDA kernel that makes it writes it: the
// unfused op (silu_mul_forward), the gated grouped products and the router's pass with the shared
// experts' gate all round the same expression, so their results are the same bits.
#pragma once

namespace r1lab::core::cuda {

__device__ __forceinline__ float silu_gate(float g, float u) { return g / (1.0f + __expf(-g)) * u; }

}  // namespace r1lab::core::cuda
