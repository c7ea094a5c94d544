// Between the engine's types and rollout.proto's messages (used by the server and the gRPC client).
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "r1lab/v1/rollout.pb.h"
#include "rollout/client.h"
#include "rollout/engine.h"

namespace r1lab::rollout {

namespace pb = ::r1lab::v1;

// Fills unset optional fields with their defaults; INVALID_ARGUMENT for values no engine accepts (an
// unknown stop string mode). Range checks are the engine's (Engine::submit).
absl::StatusOr<std::vector<GroupRequest>> groups_from_proto(const pb::GenerateRequest& req);
void groups_to_proto(const std::vector<GroupRequest>& groups, pb::GenerateRequest* req);

void completion_to_proto(const Completion& c, pb::Completion* out);
Completion completion_from_proto(const pb::Completion& c);

pb::DType dtype_to_proto(core::DType d);  // DTYPE_UNSPECIFIED for a dtype weights never have
absl::StatusOr<core::DType> dtype_from_proto(pb::DType d);

void health_to_proto(const Health& h, pb::HealthResponse* out);
Health health_from_proto(const pb::HealthResponse& h);

}  // namespace r1lab::rollout
