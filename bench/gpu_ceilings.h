// What the benchmarks compare a GPU's results with: its dense FLOP/s by name and its memory bandwidth
// measured now (bench/train_step, bench/rollout).
#pragma once

#include <string>

#include <cuda_runtime.h>

namespace r1lab::bench {

// The device's ceilings: dense bf16 / tf32 / f32 FLOP/s by name (H100 SXM, H200; A100), and the
// memory bandwidth measured now by a device-to-device copy.
struct Ceilings {
  double bf16 = 0, tf32 = 0, f32 = 0, bytes_per_s = 0;
  std::string device;
};

inline Ceilings ceilings() {
  Ceilings c;
  cudaDeviceProp p;
  cudaGetDeviceProperties(&p, 0);
  c.device = p.name;
  const std::string n = p.name;
  if (n.find("H100") != std::string::npos || n.find("H200") != std::string::npos) {
    c.bf16 = 989e12, c.tf32 = 494e12, c.f32 = 67e12;
  } else if (n.find("A100") != std::string::npos) {
    c.bf16 = 312e12, c.tf32 = 156e12, c.f32 = 19.5e12;
  }
  const size_t bytes = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  cudaMalloc(&a, bytes);
  cudaMalloc(&b, bytes);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
  cudaEventRecord(e0);
  for (int i = 0; i < 5; ++i) cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
  cudaEventRecord(e1);
  cudaEventSynchronize(e1);
  float ms = 0;
  cudaEventElapsedTime(&ms, e0, e1);
  c.bytes_per_s = 5 * 2.0 * bytes / (ms / 1e3);  // read + write
  cudaFree(a);
  cudaFree(b);
  return c;
}


}  // namespace r1lab::bench
