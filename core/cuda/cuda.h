// The CUDA backend: every core::Backend op on an NVIDIA GPU, matching the CPU reference (core/cpu).
// Tensors live in device memory from a stream-ordered caching pool; all work runs on the backend's one
// stream, so ops are asynchronous and ordered, and only download() and sum_squares() wait for the device
// (and grouped products in f32 or tf32, which read the group offsets on the host). Every kernel is
// deterministic: the same inputs give bitwise the same outputs on every run (no float atomics).
#pragma once

#include <memory>
#include <string>

#include "core/backend.h"
#include "core/comm.h"

namespace r1lab::core::cuda {

// True when a usable GPU is present; otherwise *why says what is missing (no device, no driver).
bool available(std::string* why);

struct Options {
  int device = 0;
  // Matrix products: kF32 computes in full fp32 (CUDA cores; what parity against the CPU uses);
  // kBF16 rounds each f32 operand once into a bf16 copy and runs cuBLAS's bf16 tensor-core products with
  // fp32 accumulation into f32 outputs;
  // kTF32 uses TF32 tensor cores.
  enum class GemmPrecision { kF32, kTF32, kBF16 };
  GemmPrecision gemm = GemmPrecision::kF32;
  // The grouped products' 128-row tiles on Hopper's warpgroup products (wgmma) where the GPU and the
  // build have them (sm_90a); false keeps the mma.sync kernels every GPU runs (tests and benchmarks
  // compare the two). Each kind repeats its results bitwise; the two differ in rounding.
  bool hopper_products = true;
  // Batch-invariant products (with kBF16): a row's result does not depend on the other rows of its
  // product, so that a sequence's logprobs come out bitwise the same whatever batch it runs in (the
  // rollout engine's rescoring and the trainer's recomputation agree bit for bit). Dense products then
  // run on the grouped products' tensor-core kernel with fixed 128-row tiles instead of cuBLAS, and the
  // grouped products always take 128-row tiles (never the few-rows kernels of decode).
  bool batch_invariant = false;
  // Per-op timing (cudaEvents around every op, by op name); costs a little, for benchmarks.
  bool profile = false;
  // With profile: each dense product (gemm) timed under a name of its own, "gemm M×N×K" with its
  // transposes, operand dtypes and whether it adds into C, and each copy that converts dtypes as
  // "copy_convert [shape] f32→bf16" (with "strided" where either side is not contiguous), so that a
  // benchmark can list them by shape.
  bool profile_shapes = false;
  // Backend::empty fills with 0xFF bytes (NaN in f32 and bf16, -1 in I32): tests use it to catch a read
  // of memory before it is written.
  bool poison_empty = false;
};

// The backend, or an error saying why no GPU can be used.
absl::StatusOr<std::unique_ptr<Backend>> make_backend(const Options& options = {});

// What the profiler measured: per op name, calls and total milliseconds (empty without profile).
struct OpTime {
  std::string op;
  int64_t calls = 0;
  double ms = 0;
  double flops = 0;  // useful floating-point operations counted for the op (GEMMs, attention)
  double bytes = 0;  // bytes the op must move at least
};
std::vector<OpTime> profile(Backend& backend);
void reset_profile(Backend& backend);
// Bytes of device memory in use by the backend's pool at its peak since the last reset, and now.
size_t peak_memory(Backend& backend);
void reset_peak_memory(Backend& backend);
// Where the profiled work (since reset_profile) held the most memory: the pool's bytes in use as an op
// began (its operands and outputs allocated, not its own scratch), the op and its call number among the
// ops of its name; `start`, the bytes in use at reset_profile (the pool is the device's: every backend
// of the program on that device counts). Empty without profile.
struct MemoryHigh {
  size_t bytes = 0, start = 0;
  std::string op;
  int64_t call = 0;
};
MemoryHigh memory_high(Backend& backend);

// NCCL groups (core/comm.h); defined where the build found NCCL (R1LAB_HAVE_NCCL).
absl::StatusOr<std::string> new_group_id();
absl::StatusOr<std::unique_ptr<Communicator>> join_group(Backend& backend, const std::string& id, int rank, int size,
                                                         const CommWait& wait);

}  // namespace r1lab::core::cuda
