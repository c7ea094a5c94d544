// The first rule-based rewards of the R1 recipe.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "rewards/reward.h"

namespace r1lab::rewards {

// The text of the last <answer>...</answer> in a completion, trimmed; nullopt when there is none.
std::optional<std::string> extract_answer(std::string_view completion);

// s.rfind(needle, before), by memrchr on the needle's first byte: std::string_view::rfind compares at
// every position, milliseconds on the megabyte completions rewards must stay fast on.
size_t rfind_bytes(std::string_view s, std::string_view needle, size_t before = std::string_view::npos);

// A number written the usual ways: "42", "-3.5", "1,000", "3/4", "1e3", "$42$", "\boxed{42}".
std::optional<double> parse_number(const std::string& text);

// 1 when the completion matches an RE2 pattern, else 0: the whole completion (mode "full", the
// default) or anywhere in it (mode "search"). The default pattern is R1's format: <think> reasoning
// </think> then <answer> answer </answer>, nothing else but whitespace around.
// params: {"pattern": "...", "mode": "full" | "search"}.
class FormatReward final : public RewardFn {
 public:
  static constexpr char kR1Pattern[] = R"(\s*<think>.*?</think>\s*<answer>.*?</answer>\s*)";
  static absl::StatusOr<std::unique_ptr<FormatReward>> make(const std::string& pattern = kR1Pattern,
                                                            bool full_match = true);
  Score score(const Sample& s) const override;
  ~FormatReward() override;

 private:
  struct Impl;
  explicit FormatReward(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Partial credit for R1's tags: each tag that appears exactly once earns 1/N (N tags), so a model
// learning the template gets a signal before it gets the whole format right. Components: "tag:<think>"
// etc. (1 when exactly once). params: {"tags": ["<think>", "</think>", "<answer>", "</answer>"]}.
class TagCountReward final : public RewardFn {
 public:
  explicit TagCountReward(std::vector<std::string> tags) : tags_(std::move(tags)) {}
  Score score(const Sample& s) const override;

 private:
  std::vector<std::string> tags_;
};

// 1 when the extracted answer equals the reference: numerically (relative tolerance) when both are
// numbers, else as text after trimming and collapsing whitespace (optionally ignoring case).
// params: {"tolerance": 1e-6, "ignore_case": false, "require_tags": true}. Without require_tags a
// completion with no <answer> tag is compared whole.
class AnswerMatch final : public RewardFn {
 public:
  struct Options {
    double tolerance = 1e-6;
    bool ignore_case = false;
    bool require_tags = true;
  };
  explicit AnswerMatch(Options o) : opt_(o) {}
  Score score(const Sample& s) const override;

 private:
  Options opt_;
};

// Countdown (as in TinyZero): the answer is an arithmetic expression over the given numbers with
// + - * / and parentheses (an optional "= target" at the end is ignored) that evaluates exactly to the
// target. meta: {"numbers": [...], "target": N}. params: {"use_all": false}: each number at most once
// (default) or exactly once.
class CountdownReward final : public RewardFn {
 public:
  explicit CountdownReward(bool use_all) : use_all_(use_all) {}
  Score score(const Sample& s) const override;

 private:
  bool use_all_;
};

}  // namespace r1lab::rewards
