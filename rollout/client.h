// RolloutClient: how a trainer asks for rollouts, the same whether the engine runs in this process
// (make_local_client, sharing the trainer's weights) or in a worker behind gRPC (make_grpc_client).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/tensor.h"
#include "rollout/engine.h"

namespace r1lab::rollout {

struct NamedTensor {
  std::string name;     // a parameter name of the model (see WeightChunk.name in rollout.proto)
  core::Tensor tensor;  // host, F32 / BF16 / F16, contiguous, the parameter's shape
};

struct Health {
  int64_t policy_version = 0;
  std::string model;
  int64_t vocab_size = 0, max_context = 0;
  bool has_tokenizer = false;
  EngineStats stats;
  double uptime_seconds = 0;
};

class RolloutClient {
 public:
  virtual ~RolloutClient() = default;
  // Calls on_completion for each completion as it finishes; returning false from it cancels the rest
  // (they are not delivered). Returns when every completion has arrived, or on the first error.
  virtual absl::Status generate(std::vector<GroupRequest> groups,
                                const std::function<bool(Completion&&)>& on_completion) = 0;
  // Makes `version` current with these tensors replaced (none: the weights are already in place, as
  // with an in-process engine that shares the trainer's model).
  virtual absl::Status update_weights(int64_t version, const std::vector<NamedTensor>& tensors) = 0;
  // Makes `version` current with all of `policy`'s weights (the same architecture), the fastest way
  // this client has: an in-process engine over `policy` itself moves nothing; a worker that joined a
  // weight group (join_weight_group) gets an NCCL broadcast from policy's GPU; otherwise the weights go
  // to the host and through update_weights.
  virtual absl::Status publish_weights(int64_t version, const model::Model& policy);
  // Opens the NCCL path from policy's GPU to the worker (a worker behind gRPC only). An error (a side on
  // the CPU, a build without NCCL, both sides on one GPU, a worker that does not answer) changes
  // nothing: publish_weights keeps using update_weights.
  virtual absl::Status join_weight_group(const model::Model& policy, double timeout_seconds = 60);
  // How publish_weights moves policy's weights now. In process: "shared" (the engine's own model),
  // "copy" (another model on the same backend: one device copy) or "host". To a worker: "nccl" or
  // "grpc".
  virtual std::string weight_path(const model::Model& policy) const = 0;
  virtual absl::StatusOr<Health> health() = 0;

  // Every completion, in (group, sample) order.
  absl::StatusOr<std::vector<Completion>> generate_all(std::vector<GroupRequest> groups);
};

// A model's parameters as named tensors for update_weights: views of one host copy.
std::vector<NamedTensor> weight_tensors(const model::Model& m);
// Checks named tensors against a model's parameters (known name, shape, dtype, no repeats).
absl::Status check_weight_update(const model::ParameterSet& params, const std::vector<NamedTensor>& tensors);
// Copies them into the parameters (after check_weight_update).
void copy_weights(model::Model& model, const std::vector<NamedTensor>& tensors);

// In process: drives `engine` (on its thread if started, else on the caller's). model_dir is what
// health() reports.
std::unique_ptr<RolloutClient> make_local_client(Engine& engine, std::string model_dir = "");
// A worker at `target` ("host:port"); weights travel in chunks of chunk_bytes.
std::unique_ptr<RolloutClient> make_grpc_client(const std::string& target, size_t chunk_bytes = 4 << 20);

}  // namespace r1lab::rollout
