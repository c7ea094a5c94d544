// Moving device tensors between processes, each on its own GPU: NCCL communicators. One member makes a
// group id (new_group_id) and hands it to the others by any channel (the rollout service passes it over
// gRPC); every member then joins with its rank. Joins and transfers wait with a deadline and a cancel
// check, so a member that dies or never comes gives an error here rather than a hang; after any error
// the communicator is aborted and every later call on it fails (make a new group).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/tensor.h"

namespace r1lab::core {

// How long a collective may take, and what ends it early (true: give up now, e.g. the peer's RPC
// failed or its connection closed).
struct CommWait {
  double timeout_seconds = 120;
  std::function<bool()> cancelled;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // The bytes of t (a contiguous device tensor of the backend the communicator was joined with) on rank
  // `root`, copied into t on every other rank. Ordered after the work queued on the backend's stream so
  // far; later work there sees the result. Returns when this member's part is done. The caller owns the
  // backend's stream while this runs (no other thread queues work on it).
  virtual absl::Status broadcast(Tensor& t, int root, const CommWait& wait) = 0;
};

// True when this build can form groups (CUDA with NCCL); otherwise *why says what is missing.
bool comm_available(std::string* why);
// A new group id (opaque bytes), made by the member that will be rank 0.
absl::StatusOr<std::string> new_group_id();
// Joins the group `id` as `rank` of `size`, on backend's GPU. Every member must call this; it returns
// once all have joined (or with an error: no CUDA backend, two members on one GPU, timeout, cancelled).
absl::StatusOr<std::unique_ptr<Communicator>> join_group(Backend& backend, const std::string& id, int rank, int size,
                                                         const CommWait& wait);

}  // namespace r1lab::core
