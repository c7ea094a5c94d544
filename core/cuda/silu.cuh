// The SiLU gate, silu(g) · u = g / (1 + e^-g) · u, as every CUDA kernel that makes it writes it: the
// unfused op (silu_mul_forward), the gated grouped products and the router's pass with the shared
// experts' gate all round the same expression, so their results are the same bits. Its backward
// likewise: the unfused op (silu_mul_backward) and the experts' down product that ends in it.
#pragma once

namespace r1lab::core::cuda {

__device__ __forceinline__ float silu_gate(float g, float u) { return g / (1.0f + __expf(-g)) * u; }

// The gradients of silu(g) · u for the output's gradient d: dg = d · u · silu'(g), du = d · silu(g),
// where silu'(g) = s(g) · (1 + g · (1 - s(g))).
__device__ __forceinline__ void silu_gate_backward(float d, float g, float u, float* dg, float* du) {
  const float s = 1.0f / (1.0f + __expf(-g));
  *dg = d * u * s * (1.0f + g * (1.0f - s));
  *du = d * g * s;
}

}  // namespace r1lab::core::cuda
