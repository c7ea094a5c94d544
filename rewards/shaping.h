// Reward shaping on the length and repetitiveness of a completion.
//
// Length is counted in tokens (meta "completion_tokens", which the trainer sets), characters or words,
// as the params say.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "rewards/reward.h"

namespace r1lab::rewards {

enum class LengthUnit { kTokens, kChars, kWords };
// The completion's length in `unit`; INVALID_ARGUMENT when tokens are asked for and meta has no
// non-negative integer "completion_tokens".
absl::StatusOr<double> completion_length(const Sample& s, LengthUnit unit);

// DAPO's soft overlong punishment: 0 up to max_length - cache_length, then falling linearly to -1 at
// max_length, -1 beyond. params: {"max_length": 4096, "cache_length": 512, "unit": "tokens"}.
class OverlongReward final : public RewardFn {
 public:
  static absl::StatusOr<std::unique_ptr<OverlongReward>> make(const nlohmann::json& params);
  Score score(const Sample& s) const override;

 private:
  double max_length_ = 4096, cache_length_ = 512;
  LengthUnit unit_ = LengthUnit::kTokens;
};

// Cosine length scaling ("Demystifying Long Chain-of-Thought Reasoning in LLMs", Yeo et al. 2025): a
// correct answer earns from correct_short (length 0) down to correct_long (at max_length); a wrong one
// from wrong_short up to wrong_long, so short right answers and long wrong attempts are preferred;
// beyond max_length: exceed. Correctness comes from a built-in accuracy reward (value >= 1).
// params: {"accuracy": {"name": "math", "params": {...}}, "max_length": 4096, "unit": "tokens",
//          "correct_short": 2.0, "correct_long": 1.0, "wrong_short": -10.0, "wrong_long": 0.0,
//          "exceed": -10.0}. Components: "cosine.correct".
class CosineLengthReward final : public RewardFn {
 public:
  static absl::StatusOr<std::unique_ptr<CosineLengthReward>> make(const nlohmann::json& params);
  Score score(const Sample& s) const override;

 private:
  std::unique_ptr<RewardFn> accuracy_;
  double max_length_ = 4096;
  LengthUnit unit_ = LengthUnit::kTokens;
  double correct_short_ = 2.0, correct_long_ = 1.0, wrong_short_ = -10.0, wrong_long_ = 0.0, exceed_ = -10.0;
};

// N-gram repetition penalty: penalty · (1 - distinct n-grams / n-grams) over the words of the
// completion (0 for text without repeats, down to `penalty` for text that only repeats).
// params: {"n": 3, "penalty": -1.0}.
class RepetitionReward final : public RewardFn {
 public:
  static absl::StatusOr<std::unique_ptr<RepetitionReward>> make(const nlohmann::json& params);
  Score score(const Sample& s) const override;

 private:
  int n_ = 3;
  double penalty_ = -1.0;
};

}  // namespace r1lab::rewards
