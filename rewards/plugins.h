// Rewards added without rebuilding r1lab, selectable by name in a recipe like the built-in ones:
//   declarative rule sets in YAML, C-ABI shared libraries (rewards/plugin_abi.h), and external reward
//   servers that implement r1lab.v1.Reward (proto/r1lab/v1/reward.proto) in any language.
//
// A reward config (serve-reward --rewards, reward score --config, a recipe's reward section) lists them:
//   {"plugins": [{"yaml": "my_rules.yaml"},
//                {"library": "build/lib/libmy_reward.so"},
//                {"server": "127.0.0.1:50060", "rewards": ["brevity"], "timeout_s": 30}],
//    "my_reward": [{"name": "format", "weight": 0.1}, {"name": "brevity", "gate": "format"}]}
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "rewards/reward.h"
#include "rewards/service.h"

namespace r1lab::rewards {

// Each rule set of a YAML file becomes a reward named by it:
//   - name: polite
//     combine: mean          # mean of the checks by weight (default) | all | any | sum
//     checks:
//       - {regex: "(?i)thank", weight: 2}   # RE2, found anywhere in the field
//       - {full_match: "\\s*<think>.*"}     # RE2, the whole field
//       - {contains: "therefore"}
//       - {not_contains: "As an AI"}
//       - {min_length: 20, max_length: 4000}  # characters (code points)
//         field: answer                       # completion (default) | answer (<answer> content) | think
// Components: "<name>.<i>" (1 when check i passed).
absl::Status load_yaml_rules(const std::string& path, RewardRegistry& registry);

// The rewards of a shared library (plugin_abi.h), by the names it reports.
absl::Status load_library(const std::string& path, RewardRegistry& registry);

// The rewards of a reward server (all it lists, or `names`), each scored by a Score call to it.
absl::Status add_remote_rewards(const std::string& target, const std::vector<std::string>& names, double timeout_s,
                                RewardRegistry& registry);

// Loads config["plugins"] (paths relative to base_dir) into a copy of the built-in registry, then builds
// the named rewards of the rest of the config.
absl::StatusOr<RewardSet> load_reward_set(const nlohmann::json& config, const std::string& base_dir);
// The same from a JSON or YAML file.
absl::StatusOr<RewardSet> load_reward_set_file(const std::string& path);

}  // namespace r1lab::rewards
