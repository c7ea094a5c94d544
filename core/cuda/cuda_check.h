// Every CUDA and cuBLAS call goes through these: a failure reports the call, file and line, then aborts
// (a failed CUDA call leaves the context in a state no caller can recover from).
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CUDA_CHECK(call)                                                                            \
  do {                                                                                              \
    cudaError_t r1lab_err_ = (call);                                                                \
    if (r1lab_err_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "%s:%d: CUDA error %s: %s in %s\n", __FILE__, __LINE__,                   \
                   cudaGetErrorName(r1lab_err_), cudaGetErrorString(r1lab_err_), #call);            \
      std::abort();                                                                                 \
    }                                                                                               \
  } while (0)
