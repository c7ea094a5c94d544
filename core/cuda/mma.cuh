// Primitives shared by the attention and grouped-product kernels: the bf16 mma.sync m16n8k16 step (f32
// accumulators), the ldmatrix loads that make its operand fragments from shared memory, and cp.async
// copies from global to shared memory (zero-filled where invalid), committed and waited for in groups.
//
// Fragment layout (PTX ISA, mma.m16n8k16): lane = 4·g + c. An accumulator holds rows g and g+8,
// columns 2c and 2c+1 of a 16×8 block; an A operand holds the same rows and columns 2c, 2c+1, 2c+8,
// 2c+9 of a 16×16 block.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace tc {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldsm4(uint32_t* r, const bf16* p) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldsm4_t(uint32_t* r, const bf16* p) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The A operand of the 16×16 block at p (row-major, row stride ld).
__device__ __forceinline__ void load_a(uint32_t* a, const bf16* p, int ld) {
  const int lane = threadIdx.x % 32;
  ldsm4(a, p + (lane % 16) * ld + (lane / 16) * 8);
}

// B operands of two 16(k)×8(n) blocks, from a matrix stored [n][k] (row stride ld) at p: b[0..1] is
// columns n 0..7, b[2..3] columns n 8..15.
__device__ __forceinline__ void load_b_nk(uint32_t* b, const bf16* p, int ld) {
  const int lane = threadIdx.x % 32;
  ldsm4(b, p + (lane % 8 + (lane / 16) * 8) * ld + ((lane / 8) % 2) * 8);
}

// B operands of one 8(n)-column block over two 16-k steps, from [n][k] at p: b[0..1] is k 0..15,
// b[2..3] k 16..31.
__device__ __forceinline__ void load_b_nk32(uint32_t* b, const bf16* p, int ld) {
  const int lane = threadIdx.x % 32;
  ldsm4(b, p + (lane % 8) * ld + (lane / 8) * 8);
}

// B operands of one 16(k)×8(n) block from [n][k] at p (lanes 16-31 give addresses ldmatrix ignores).
__device__ __forceinline__ void load_b_nk8(uint32_t* b, const bf16* p, int ld) {
  const int lane = threadIdx.x % 32;
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p + (lane % 8) * ld + ((lane / 8) % 2) * 8));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(b[0]), "=r"(b[1]) : "r"(addr));
}

// The same from a matrix stored [k][n] (row stride ld).
__device__ __forceinline__ void load_b_kn(uint32_t* b, const bf16* p, int ld) {
  const int lane = threadIdx.x % 32;
  ldsm4_t(b, p + (lane % 8 + ((lane / 8) % 2) * 8) * ld + (lane / 16) * 8);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(float* smem, const float* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most kPending committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

}  // namespace tc
