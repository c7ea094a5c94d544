// The rollout worker: a gRPC server (r1lab.v1.Rollout, proto/r1lab/v1/rollout.proto) over an Engine.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/model.h"
#include "model/vocabulary.h"
#include "rollout/engine.h"

namespace r1lab::rollout {

struct ServerOptions {
  std::string host = "127.0.0.1";  // loopback unless told otherwise
  int port = 50051;                // 0: any free port (see RolloutServer::port)
  EngineOptions engine;
};

class RolloutServer {
 public:
  virtual ~RolloutServer() = default;
  virtual int port() const = 0;
  virtual Engine& engine() = 0;
  // Stops accepting calls, cancels those running, stops the engine.
  virtual void shutdown() = 0;
  virtual void wait() = 0;
};

// Loads nothing: serves `model` (and `vocab`, optional; both must outlive the server). model_dir is
// reported by Health.
absl::StatusOr<std::unique_ptr<RolloutServer>> start_rollout_server(model::Model& model,
                                                                    const model::Vocabulary* vocab,
                                                                    std::string model_dir,
                                                                    const ServerOptions& options);

}  // namespace r1lab::rollout
