// NCCL communicators for core/comm.h. Non-blocking communicators, so that every wait (joining, each
// collective) polls with a deadline and a cancel check, and an error aborts the communicator instead of
// hanging the process. Collectives run on the communicator's own stream, ordered against the backend's
// stream by events.
#include <nccl.h>

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda.h"
#include "core/cuda/cuda_backend.h"
#include "core/status_macros.h"

namespace r1lab::core::cuda {
namespace {

using Clock = std::chrono::steady_clock;

std::string nccl_error(ncclResult_t r, ncclComm_t comm) {
  std::string m = ncclGetErrorString(r);
  const char* last = comm ? ncclGetLastError(comm) : ncclGetLastError(nullptr);
  if (last && *last) absl::StrAppend(&m, ": ", last);
  return m;
}

// Polls `done` until it says finished, the wait's deadline passes or it is cancelled. `what` names the
// operation in errors. done returns OK when finished, UNAVAILABLE (retry) while running, or an error.
absl::Status poll(const CommWait& wait, const std::string& what, const std::function<absl::Status()>& done) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(wait.timeout_seconds);
  for (int spins = 0;; ++spins) {
    absl::Status s = done();
    if (!absl::IsUnavailable(s)) return s;
    if (wait.cancelled && wait.cancelled()) return absl::CancelledError(absl::StrCat(what, ": cancelled"));
    if (Clock::now() > deadline)
      return absl::DeadlineExceededError(absl::StrCat(what, ": no progress within ", wait.timeout_seconds, " s"));
    if (spins > 100) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

// The communicator's state: OK when idle, UNAVAILABLE while an operation is in flight, else its error.
absl::Status comm_state(ncclComm_t comm) {
  ncclResult_t st = ncclSuccess;
  const ncclResult_t r = ncclCommGetAsyncError(comm, &st);
  if (r != ncclSuccess) return absl::InternalError(nccl_error(r, comm));
  if (st == ncclInProgress) return absl::UnavailableError("in progress");
  if (st != ncclSuccess) return absl::InternalError(nccl_error(st, comm));
  return absl::OkStatus();
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(CudaBackend& be, ncclComm_t comm, int rank, int size)
      : be_(be), device_(be.device_index()), comm_(comm), rank_(rank), size_(size) {
    use_device(device_);
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  }
  ~NcclCommunicator() override {
    use_device(device_);
    if (comm_) ncclCommAbort(comm_);  // frees it; a member still waiting on us gets an error, not a hang
    // After a failure the stream may hold a collective that never finished: its buffers (held_) and
    // the stream itself are left as they are rather than freed under it.
    if (failure_.empty()) {
      cudaStreamSynchronize(stream_);
      cudaStreamDestroy(stream_);
      cudaEventDestroy(ready_);
      cudaEventDestroy(done_);
    }
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  absl::Status broadcast(Tensor& t, int root, const CommWait& wait) override {
    if (!failure_.empty())
      return absl::FailedPreconditionError(absl::StrCat("the communicator failed earlier (", failure_, ")"));
    if (root < 0 || root >= size_)
      return absl::InvalidArgumentError(absl::StrCat("broadcast root ", root, " of ", size_));
    if (!t.defined() || t.device() != Device::kCuda || !t.is_contiguous())
      return absl::InvalidArgumentError("broadcast: expected a contiguous device tensor");
    use_device(device_);
    const size_t bytes = static_cast<size_t>(t.numel()) * dtype_size(t.dtype());
    held_ = t;  // alive until the collective is done (for good, if it never is)
    CUDA_CHECK(cudaEventRecord(ready_, be_.stream()));
    CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_));
    const std::string what = absl::StrCat("NCCL broadcast of ", bytes, " bytes from rank ", root);
    const ncclResult_t r = ncclBroadcast(t.raw(), t.raw(), bytes, ncclUint8, root, comm_, stream_);
    if (r != ncclSuccess && r != ncclInProgress)
      return fail(absl::InternalError(absl::StrCat(what, ": ", nccl_error(r, comm_))));
    // Queued (non-blocking communicators may finish queueing in the background), then done on the GPU.
    absl::Status s = poll(wait, what, [&] { return comm_state(comm_); });
    if (!s.ok()) return fail(s);
    CUDA_CHECK(cudaEventRecord(done_, stream_));
    s = poll(wait, what, [&]() -> absl::Status {
      const cudaError_t e = cudaEventQuery(done_);
      if (e == cudaSuccess) return absl::OkStatus();
      if (e != cudaErrorNotReady) return absl::InternalError(cudaGetErrorString(e));
      R1LAB_RETURN_IF_ERROR(comm_state(comm_));  // a peer's failure shows here while the GPU waits
      return absl::UnavailableError("running");
    });
    if (!s.ok()) return fail(s);
    CUDA_CHECK(cudaStreamWaitEvent(be_.stream(), done_));
    held_ = Tensor();
    return absl::OkStatus();
  }

 private:
  absl::Status fail(absl::Status s) {
    failure_ = std::string(s.message());
    ncclCommAbort(comm_);
    comm_ = nullptr;
    return s;
  }

  CudaBackend& be_;
  int device_;
  ncclComm_t comm_;
  int rank_, size_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr, done_ = nullptr;
  Tensor held_;
  std::string failure_;
};

}  // namespace

absl::StatusOr<std::string> new_group_id() {
  ncclUniqueId id;
  const ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) return absl::UnavailableError(absl::StrCat("NCCL group id: ", nccl_error(r, nullptr)));
  return std::string(id.internal, sizeof(id.internal));
}

absl::StatusOr<std::unique_ptr<Communicator>> join_group(Backend& backend, const std::string& id, int rank, int size,
                                                         const CommWait& wait) {
  auto* be = dynamic_cast<CudaBackend*>(&backend);
  if (be == nullptr)
    return absl::FailedPreconditionError(
        absl::StrCat("NCCL needs a CUDA backend; this member runs on ", backend.name()));
  ncclUniqueId uid;
  if (id.size() != sizeof(uid.internal))
    return absl::InvalidArgumentError(
        absl::StrCat("NCCL group id of ", id.size(), " bytes, expected ", sizeof(uid.internal)));
  if (size < 2 || rank < 0 || rank >= size)
    return absl::InvalidArgumentError(absl::StrCat("NCCL rank ", rank, " of ", size));
  std::copy(id.begin(), id.end(), uid.internal);
  // NCCL sets up on this thread and its own streams: the backend's stream is not touched (an engine may
  // be stepping on it from another thread).
  use_device(be->device_index());
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  const std::string what = absl::StrCat("NCCL join as rank ", rank, " of ", size, " on cuda:", be->device_index());
  ncclResult_t r = ncclCommInitRankConfig(&comm, size, uid, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    const std::string m = nccl_error(r, comm);
    if (comm) ncclCommAbort(comm);
    return absl::UnavailableError(absl::StrCat(what, ": ", m));
  }
  absl::Status s = poll(wait, what, [&] { return comm_state(comm); });
  if (!s.ok()) {
    ncclCommAbort(comm);
    return absl::Status(s.code(),
                        absl::IsInternal(s) ? absl::StrCat(what, ": ", s.message()) : std::string(s.message()));
  }
  return std::unique_ptr<Communicator>(new NcclCommunicator(*be, comm, rank, size));
}

}  // namespace r1lab::core::cuda
