// Backends by name, as the command line and recipes give them: "cpu" (the fp32 reference) or "cuda" /
// "cuda:N" (GPU N), with the precision of the GPU's matrix products: "f32" (what parity uses), "tf32",
// "bf16" (tensor cores; storage and accumulation stay f32) or "bf16_invariant" (bf16 products in which a
// row's result does not depend on the other rows: cuda::Options::batch_invariant).
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/backend.h"

namespace r1lab::core {

// Checks the names without touching a GPU (recipes are checked before a run starts).
absl::Status check_device_names(const std::string& device, const std::string& gemm);

// The backend, or an error that says why it cannot be had (an unknown name, a build without CUDA, no GPU).
absl::StatusOr<std::unique_ptr<Backend>> make_backend(const std::string& device, const std::string& gemm);

}  // namespace r1lab::core
