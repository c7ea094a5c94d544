// The small kernel of bench/small_products' kernel chains (nvcc apart from the host code's headers).
#include <cuda_runtime.h>

#include <algorithm>

#include "core/cuda/cuda_check.h"

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

