// Length and repetition shaping, tag counts, format modes, and gated weighted sums.
#include "rewards/shaping.h"

#include <cmath>

#include "gtest/gtest.h"

namespace r1lab::rewards {
namespace {

std::unique_ptr<RewardFn> make(const std::string& name, const nlohmann::json& params) {
  auto r = RewardRegistry::with_builtin_rules().make(name, params);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? std::move(*r) : nullptr;
}

Sample with_tokens(const std::string& completion, int64_t tokens, const std::string& reference = "") {
  return {"", completion, reference, "", {{"completion_tokens", tokens}}};
}

TEST(Shaping, DapoOverlong) {
  auto r = make("overlong", {{"max_length", 100}, {"cache_length", 20}});
  EXPECT_DOUBLE_EQ(r->score(with_tokens("", 50)).value, 0.0);
  EXPECT_DOUBLE_EQ(r->score(with_tokens("", 80)).value, 0.0);
  EXPECT_DOUBLE_EQ(r->score(with_tokens("", 90)).value, -0.5);
  EXPECT_DOUBLE_EQ(r->score(with_tokens("", 100)).value, -1.0);
  EXPECT_DOUBLE_EQ(r->score(with_tokens("", 1000)).value, -1.0);
  // Without a token count the sample cannot be judged in tokens; characters need none.
  EXPECT_FALSE(r->score({"", "abc", "", "", {}}).error.empty());
  auto chars = make("overlong", {{"max_length", 10}, {"cache_length", 4}, {"unit", "chars"}});
  EXPECT_DOUBLE_EQ(chars->score({"", "12345678", "", "", {}}).value, -0.5);
  EXPECT_DOUBLE_EQ(chars->score({"", "éééééééé", "", "", {}}).value, -0.5);  // code points, not bytes
  EXPECT_FALSE(RewardRegistry::with_builtin_rules().make("overlong", {{"max_length", 10}, {"cache_length", 10}}).ok());
  EXPECT_FALSE(RewardRegistry::with_builtin_rules().make("overlong", {{"unit", "pages"}}).ok());
}

TEST(Shaping, CosineLength) {
  auto r = make("cosine", {{"max_length", 100}, {"accuracy", "answer_match"}});
  const std::string right = "<answer>7</answer>", wrong = "<answer>8</answer>";
  EXPECT_DOUBLE_EQ(r->score(with_tokens(right, 0, "7")).value, 2.0);
  EXPECT_NEAR(r->score(with_tokens(right, 50, "7")).value, 1.5, 1e-12);
  EXPECT_NEAR(r->score(with_tokens(right, 100, "7")).value, 1.0, 1e-12);
  EXPECT_DOUBLE_EQ(r->score(with_tokens(wrong, 0, "7")).value, -10.0);
  EXPECT_NEAR(r->score(with_tokens(wrong, 100, "7")).value, 0.0, 1e-12);
  EXPECT_DOUBLE_EQ(r->score(with_tokens(right, 101, "7")).value, -10.0);
  // Shorter right answers beat longer ones; longer wrong attempts beat shorter ones.
  EXPECT_GT(r->score(with_tokens(right, 10, "7")).value, r->score(with_tokens(right, 60, "7")).value);
  EXPECT_LT(r->score(with_tokens(wrong, 10, "7")).value, r->score(with_tokens(wrong, 60, "7")).value);
  EXPECT_EQ(r->score(with_tokens(right, 10, "7")).components.at("cosine.correct"), 1.0);
  EXPECT_FALSE(RewardRegistry::with_builtin_rules().make("cosine", {{"accuracy", "cosine"}}).ok());
  EXPECT_FALSE(RewardRegistry::with_builtin_rules().make("cosine", {{"accuracy", "nope"}}).ok());
}

TEST(Shaping, Repetition) {
  auto r = make("repetition", {{"n", 2}, {"penalty", -1.0}});
  EXPECT_DOUBLE_EQ(r->score({"", "a b c d e", "", "", {}}).value, 0.0);
  // "a b a b a b": bigrams ab ba ab ba ab -> 2 distinct of 5.
  EXPECT_NEAR(r->score({"", "a b a b a b", "", "", {}}).value, -(1 - 2.0 / 5.0), 1e-12);
  EXPECT_DOUBLE_EQ(r->score({"", "short", "", "", {}}).value, 0.0);
  std::string loop;
  for (int i = 0; i < 1000; ++i) loop += "so the answer is ";
  EXPECT_LT(r->score({"", loop, "", "", {}}).value, -0.99);
  EXPECT_FALSE(RewardRegistry::with_builtin_rules().make("repetition", {{"penalty", 1}}).ok());
}

TEST(Format, TagCountAndSearchMode) {
  auto tags = make("tag_count", {});
  EXPECT_DOUBLE_EQ(tags->score({"", "<think>x</think><answer>1</answer>", "", "", {}}).value, 1.0);
  EXPECT_DOUBLE_EQ(tags->score({"", "<think>x</think> 1", "", "", {}}).value, 0.5);
  const Score twice = tags->score({"", "<think><think>x</think><answer>1</answer>", "", "", {}});
  EXPECT_DOUBLE_EQ(twice.value, 0.75);
  EXPECT_EQ(twice.components.at("tag:<think>"), 0.0);
  auto search = make("format", {{"pattern", "\\\\boxed\\{"}, {"mode", "search"}});
  EXPECT_DOUBLE_EQ(search->score({"", "so \\boxed{3} done", "", "", {}}).value, 1.0);
  auto full = make("format", {{"pattern", "\\\\boxed\\{"}});
  EXPECT_DOUBLE_EQ(full->score({"", "so \\boxed{3} done", "", "", {}}).value, 0.0);
  EXPECT_FALSE(RewardRegistry::with_builtin_rules().make("format", {{"mode", "fuzzy"}}).ok());
  EXPECT_FALSE(RewardRegistry::with_builtin_rules().make("tag_count", {{"tags", {""}}}).ok());
}

TEST(WeightedSumGate, AccuracyCountsOnlyWithFormat) {
  auto sum = WeightedSum::from_json(RewardRegistry::with_builtin_rules(), nlohmann::json::parse(R"([
      {"name": "format", "weight": 0.5},
      {"name": "math", "as": "accuracy", "gate": "format"},
      {"name": "math", "as": "accuracy_any", "weight": 0.25, "params": {"extract": ["boxed"]}}])"));
  ASSERT_TRUE(sum.ok()) << sum.status();
  const Score ok = (*sum)->score({"", "<think>x</think><answer>\\boxed{4}</answer>", "4", "", {}});
  EXPECT_DOUBLE_EQ(ok.value, 0.5 + 1 + 0.25);
  EXPECT_EQ(ok.components.count("gated:accuracy"), 0u);
  const Score unformatted = (*sum)->score({"", "it is \\boxed{4}", "4", "", {}});
  EXPECT_DOUBLE_EQ(unformatted.value, 0.25);
  EXPECT_EQ(unformatted.components.at("accuracy"), 1.0);
  EXPECT_EQ(unformatted.components.at("gated:accuracy"), 1.0);
  const auto reg = RewardRegistry::with_builtin_rules();
  EXPECT_FALSE(WeightedSum::from_json(reg, nlohmann::json::parse(R"([{"name": "math", "gate": "format"}])")).ok());
  EXPECT_FALSE(WeightedSum::from_json(reg, nlohmann::json::parse(R"([{"name": "math"}, {"name": "math"}])")).ok());
  EXPECT_FALSE(WeightedSum::from_json(reg, nlohmann::json::parse(R"([{"name": "math", "wieght": 2}])")).ok());
  EXPECT_TRUE(WeightedSum::from_json(reg, nlohmann::json::parse(
                                              R"([{"name": "format"}, {"name": "math", "gate": {"name": "format", "min": 0.5}}])"))
                  .ok());
}

}  // namespace
}  // namespace r1lab::rewards
