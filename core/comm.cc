#include "core/comm.h"

#include "absl/strings/str_cat.h"

#if defined(R1LAB_HAVE_CUDA) && defined(R1LAB_HAVE_NCCL)
#include "core/cuda/cuda.h"
#endif

namespace r1lab::core {

#if defined(R1LAB_HAVE_CUDA) && defined(R1LAB_HAVE_NCCL)

bool comm_available(std::string* why) { return cuda::available(why); }
absl::StatusOr<std::string> new_group_id() { return cuda::new_group_id(); }
absl::StatusOr<std::unique_ptr<Communicator>> join_group(Backend& backend, const std::string& id, int rank, int size,
                                                         const CommWait& wait) {
  return cuda::join_group(backend, id, rank, size, wait);
}

#else

namespace {
absl::Status no_nccl() {
  return absl::FailedPreconditionError(
      "this r1lab was built without NCCL (it needs the CUDA backend and libnccl at configure time)");
}
}  // namespace

bool comm_available(std::string* why) {
  if (why) *why = std::string(no_nccl().message());
  return false;
}
absl::StatusOr<std::string> new_group_id() { return no_nccl(); }
absl::StatusOr<std::unique_ptr<Communicator>> join_group(Backend&, const std::string&, int, int, const CommWait&) {
  return no_nccl();
}

#endif

}  // namespace r1lab::core
