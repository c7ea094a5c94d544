// Rule-based rewards: pure functions of (prompt, completion, reference answer, task metadata), registered
// by name in an explicit registry and combined with weights by a recipe. Thread-safe: score() is const
// and keeps no state.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace r1lab::rewards {

struct Sample {
  std::string prompt;
  std::string completion;  // the generated text
  std::string reference;   // the reference answer ("" when the task has none)
  std::string task;        // "arithmetic", "countdown", ...
  nlohmann::json meta;     // task metadata, e.g. {"numbers": [3, 7, 25], "target": 46}
};

struct Score {
  double value = 0;
  std::map<std::string, double> components;  // named parts (a weighted sum lists each rule)
  std::string error;                          // set when the sample could not be scored (value 0)
};

class RewardFn {
 public:
  virtual ~RewardFn() = default;
  virtual Score score(const Sample& s) const = 0;
};

// Builds a reward from its JSON parameters (INVALID_ARGUMENT naming the bad one).
using RewardFactory = std::function<absl::StatusOr<std::unique_ptr<RewardFn>>(const nlohmann::json& params)>;

class RewardRegistry {
 public:
  // The built-in rules: "format", "answer_match", "countdown".
  static RewardRegistry with_builtin_rules();

  void add(const std::string& name, RewardFactory factory);
  bool contains(const std::string& name) const { return factories_.count(name) > 0; }
  std::vector<std::string> names() const;
  absl::StatusOr<std::unique_ptr<RewardFn>> make(const std::string& name, const nlohmann::json& params) const;

 private:
  std::map<std::string, RewardFactory> factories_;
};

// Σ weight_i · rule_i(sample); components hold each rule's unweighted value under its name (or its
// "as"), and the components a rule reports itself. A rule that reports an error contributes 0 and its
// error is passed on. A gated rule counts only when the rule it names scored at least `min` (say,
// accuracy only when the format passed); when it does not, component "gated:<name>" is 1.
class WeightedSum final : public RewardFn {
 public:
  // spec: [{"name": "format", "weight": 0.1, "params": {...}},
  //        {"name": "math", "as": "accuracy", "gate": "format"},   // or "gate": {"name": "format", "min": 1}
  //        ...]
  static absl::StatusOr<std::unique_ptr<WeightedSum>> from_json(const RewardRegistry& registry,
                                                                const nlohmann::json& spec);
  void add(std::string name, double weight, std::unique_ptr<RewardFn> fn, std::string gate = "",
           double gate_min = 1.0);
  Score score(const Sample& s) const override;

 private:
  struct Term {
    std::string name;
    double weight;
    std::unique_ptr<RewardFn> fn;
    std::string gate;  // "" or the name of an earlier or later term
    double gate_min = 1.0;
  };
  std::vector<Term> terms_;
};

}  // namespace r1lab::rewards
