#include "core/device.h"

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

#ifdef R1LAB_HAVE_CUDA
#include "core/cuda/cuda.h"
#endif

namespace r1lab::core {
namespace {

bool is_cuda(const std::string& device) { return device == "cuda" || absl::StartsWith(device, "cuda:"); }

}  // namespace

absl::Status check_device_names(const std::string& device, const std::string& gemm) {
  if (device != "cpu" && !is_cuda(device))
    return absl::InvalidArgumentError(absl::StrCat("unknown device '", device, "' (cpu, cuda or cuda:N)"));
  int n = 0;
  if (is_cuda(device) && device != "cuda" && (!absl::SimpleAtoi(device.substr(5), &n) || n < 0))
    return absl::InvalidArgumentError(absl::StrCat("device '", device, "': expected cuda or cuda:N with N >= 0"));
  if (gemm != "f32" && gemm != "tf32" && gemm != "bf16" && gemm != "bf16_invariant")
    return absl::InvalidArgumentError(
        absl::StrCat("matrix-product precision '", gemm, "': expected f32, tf32, bf16 or bf16_invariant"));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Backend>> make_backend(const std::string& device, const std::string& gemm) {
  if (auto st = check_device_names(device, gemm); !st.ok()) return st;
  if (device == "cpu") return make_cpu_backend();
#ifdef R1LAB_HAVE_CUDA
  cuda::Options o;
  if (device != "cuda") (void)absl::SimpleAtoi(device.substr(5), &o.device);
  o.gemm = gemm == "f32"    ? cuda::Options::GemmPrecision::kF32
           : gemm == "tf32" ? cuda::Options::GemmPrecision::kTF32
                            : cuda::Options::GemmPrecision::kBF16;
  o.batch_invariant = gemm == "bf16_invariant";
  return cuda::make_backend(o);
#else
  return absl::FailedPreconditionError(
      absl::StrCat("device ", device, ": this r1lab was built without CUDA (no nvcc at configure time); rebuild "
                   "where the CUDA toolkit is installed, or use the cpu device"));
#endif
}

}  // namespace r1lab::core
