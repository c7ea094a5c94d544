// The reward service (r1lab.v1.Reward, proto/r1lab/v1/reward.proto) and RewardClient, the same calls
// in process (make_local_reward_client) or over gRPC (make_grpc_reward_client).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "rewards/reward.h"

namespace r1lab::rewards {

// Named rewards a service offers, each a weighted sum of registry rules.
class RewardSet {
 public:
  // Every built-in rule alone under its own name (default parameters), plus the named sums of `spec`:
  // {"r1_countdown": [{"name": "format", "weight": 0.1}, {"name": "countdown"}], ...}.
  static absl::StatusOr<RewardSet> make(const RewardRegistry& registry, const nlohmann::json& spec);
  // The reward called `name`; nullptr when there is none.
  const RewardFn* find(const std::string& name) const;
  // (name, spec) of every reward.
  std::vector<std::pair<std::string, std::string>> list() const;

 private:
  struct Entry {
    std::shared_ptr<RewardFn> fn;
    std::string spec;
  };
  std::map<std::string, Entry> rewards_;
};

struct RewardInfo {
  std::string name, spec_json;
};

class RewardClient {
 public:
  virtual ~RewardClient() = default;
  // Scores, one per sample in order. INVALID_ARGUMENT for an unknown reward or bad input.
  virtual absl::StatusOr<std::vector<Score>> score(const std::string& reward, const std::vector<Sample>& samples) = 0;
  virtual absl::StatusOr<std::vector<RewardInfo>> list() = 0;
};

// Checks a batch the way the service does (sizes, UTF-8).
absl::Status check_samples(const std::vector<Sample>& samples);

std::unique_ptr<RewardClient> make_local_reward_client(std::shared_ptr<const RewardSet> rewards);
// timeout_s > 0: each call fails with DEADLINE_EXCEEDED after that long.
std::unique_ptr<RewardClient> make_grpc_reward_client(const std::string& target, double timeout_s = 0);

class RewardServer {
 public:
  virtual ~RewardServer() = default;
  virtual int port() const = 0;
  virtual void shutdown() = 0;
};

// Listens on host:port (port 0: any free port; loopback unless told otherwise).
absl::StatusOr<std::unique_ptr<RewardServer>> start_reward_server(std::shared_ptr<const RewardSet> rewards,
                                                                  const std::string& host, int port);

}  // namespace r1lab::rewards
