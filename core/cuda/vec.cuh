// kV (1 or 4) consecutive elements of an f32 or bf16 row as floats, loaded and stored in one access
// where kV = 4 (16 bytes of f32, 8 of bf16; the caller checks the alignment): the row kernels' vector
// accesses.
#pragma once

#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>

namespace r1lab::core::cuda {

// Whether rows of `cols` elements at p (row stride ld) can go 4 elements an access: cols and ld
// multiples of 4, p aligned to 4 elements' bytes.
inline bool rows_by4(const void* p, int64_t cols, int64_t ld, size_t elem) {
  return cols % 4 == 0 && ld % 4 == 0 && reinterpret_cast<uintptr_t>(p) % (4 * elem) == 0;
}

template <int kV>
__device__ __forceinline__ void loadv(const float* p, float* o) {
  if constexpr (kV == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    o[0] = v.x, o[1] = v.y, o[2] = v.z, o[3] = v.w;
  } else {
    o[0] = *p;
  }
}
template <int kV>
__device__ __forceinline__ void loadv(const __nv_bfloat16* p, float* o) {
  if constexpr (kV == 4) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
    o[0] = a.x, o[1] = a.y, o[2] = b.x, o[3] = b.y;
  } else {
    o[0] = __bfloat162float(*p);
  }
}
template <int kV>
__device__ __forceinline__ void storev(float* p, const float* v) {
  if constexpr (kV == 4) *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  else *p = v[0];
}
template <int kV>
__device__ __forceinline__ void storev(__nv_bfloat16* p, const float* v) {
  if constexpr (kV == 4) {
    const __nv_bfloat162 a = __floats2bfloat162_rn(v[0], v[1]), b = __floats2bfloat162_rn(v[2], v[3]);
    uint2 u;
    u.x = *reinterpret_cast<const uint32_t*>(&a);
    u.y = *reinterpret_cast<const uint32_t*>(&b);
    *reinterpret_cast<uint2*>(p) = u;
  } else {
    *p = __float2bfloat16(v[0]);
  }
}

}  // namespace r1lab::core::cuda
