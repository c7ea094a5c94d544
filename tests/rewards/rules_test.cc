#include "rewards/rules.h"

#include "gtest/gtest.h"

namespace r1lab::rewards {
namespace {

Sample sample(std::string completion, std::string reference = "", nlohmann::json meta = nullptr) {
  Sample s;
  s.completion = std::move(completion);
  s.reference = std::move(reference);
  s.meta = std::move(meta);
  return s;
}

TEST(ExtractAnswer, TakesTheLastTaggedAnswer) {
  EXPECT_EQ(extract_answer("<think>a</think><answer> 42 </answer>"), "42");
  EXPECT_EQ(extract_answer("<answer>1</answer> then <answer>2</answer>"), "2");
  EXPECT_EQ(extract_answer("<answer>unclosed"), std::nullopt);
  EXPECT_EQ(extract_answer("no tags"), std::nullopt);
}

TEST(ParseNumber, ReadsTheUsualSpellings) {
  struct Case {
    const char* text;
    std::optional<double> want;
  } cases[] = {{"42", 42},         {" -3.5 ", -3.5},   {"1,000", 1000},  {"3/4", 0.75},      {"1e3", 1000},
               {"$42$", 42},       {"\\boxed{7}", 7},  {"12.", 12},      {"abc", std::nullopt},
               {"", std::nullopt}, {"1/0", std::nullopt}, {"inf", std::nullopt}, {"0x10", std::nullopt},
               {"4 2", std::nullopt}};
  for (const Case& c : cases) EXPECT_EQ(parse_number(c.text), c.want) << c.text;
}

TEST(FormatReward, R1FormatTable) {
  auto f = FormatReward::make();
  ASSERT_TRUE(f.ok());
  struct Case {
    const char* completion;
    double want;
  } cases[] = {
      {"<think>2+2 is 4</think><answer>4</answer>", 1},
      {"  <think>multi\nline</think>\n<answer>4</answer>\n", 1},
      {"<think></think><answer></answer>", 1},
      {"<answer>4</answer>", 0},                        // no reasoning
      {"<think>x</think>", 0},                          // no answer
      {"<think>x</think><answer>4</answer> trailing", 0},
      {"preamble <think>x</think><answer>4</answer>", 0},
      {"<answer>4</answer><think>x</think>", 0},        // wrong order
  };
  for (const Case& c : cases) EXPECT_EQ((*f)->score(sample(c.completion)).value, c.want) << c.completion;
  auto custom = FormatReward::make(R"(Answer: \d+)");
  ASSERT_TRUE(custom.ok());
  EXPECT_EQ((*custom)->score(sample("Answer: 12")).value, 1);
  EXPECT_FALSE(FormatReward::make("(unclosed").ok());
}

TEST(AnswerMatch, NumericAndTextTable) {
  AnswerMatch m({});
  struct Case {
    const char* completion;
    const char* reference;
    double want;
  } cases[] = {
      {"<answer>42</answer>", "42", 1},        {"<answer>42.0</answer>", "42", 1},
      {"<answer>1,234</answer>", "1234", 1},   {"<answer>0.5</answer>", "1/2", 1},
      {"<answer>43</answer>", "42", 0},        {"<answer>Paris</answer>", "Paris", 1},
      {"<answer> New   York </answer>", "New York", 1},
      {"<answer>paris</answer>", "Paris", 0},  {"42", "42", 0},  // untagged
  };
  for (const Case& c : cases) EXPECT_EQ(m.score(sample(c.completion, c.reference)).value, c.want) << c.completion;
  AnswerMatch loose({1e-6, true, false});
  EXPECT_EQ(loose.score(sample("paris", "Paris")).value, 1);
  EXPECT_EQ(loose.score(sample("42", "42")).value, 1);
}

TEST(CountdownReward, ChecksNumbersAndTarget) {
  const nlohmann::json meta = {{"numbers", {3, 7, 25}}, {"target", 46}};
  CountdownReward at_most(false), exactly(true);
  struct Case {
    const char* answer;
    double at_most_once, exactly_once;
  } cases[] = {
      {"3 * 7 + 25", 1, 1},
      {"25 + 3 * 7 = 46", 1, 1},        // "= target" ignored
      {"(25 + 21)", 0, 0},              // 21 is not given
      {"25 + 7 * 3", 1, 1},
      {"7 * 7 - 3", 0, 0},              // 7 used twice
      {"25 + 25 - 4", 0, 0},
      {"(3 + 7) * 25 / 5", 0, 0},       // 5 not given
      {"25 * 2 - 4", 0, 0},
      {"7 / 0 + 25", 0, 0},             // division by zero
      {"25 + 7 * 3 + (3 - 3)", 0, 0},   // 3 used three times
      {"import os", 0, 0},
      {"", 0, 0},
  };
  for (const Case& c : cases) {
    const std::string completion = std::string("<think>t</think><answer>") + c.answer + "</answer>";
    EXPECT_EQ(at_most.score(sample(completion, "", meta)).value, c.at_most_once) << c.answer;
    EXPECT_EQ(exactly.score(sample(completion, "", meta)).value, c.exactly_once) << c.answer;
  }
  // Fewer numbers than given: fine at most once, not exactly once.
  const nlohmann::json four = {{"numbers", {2, 5, 10, 40}}, {"target", 50}};
  EXPECT_EQ(at_most.score(sample("<answer>40 + 10</answer>", "", four)).value, 1);
  EXPECT_EQ(exactly.score(sample("<answer>40 + 10</answer>", "", four)).value, 0);
  EXPECT_EQ(exactly.score(sample("<answer>(40 + 10) * (5 / 5)</answer>", "", four)).value, 0);
  EXPECT_EQ(exactly.score(sample("<answer>40 + 10 * 5 / 5 - 2 + 2</answer>", "", four)).value, 0);
  EXPECT_EQ(exactly.score(sample("<answer>40 / 2 * 5 - 10 * 5 + 10 * 0</answer>", "", four)).value, 0);
  EXPECT_EQ(exactly.score(sample("<answer>(40 / 2 - 10) * 5</answer>", "", four)).value, 1);
  // Exact fractions: 10 / 4 * 2 = 5.
  const nlohmann::json frac = {{"numbers", {10, 4, 2}}, {"target", 5}};
  EXPECT_EQ(exactly.score(sample("<answer>10 / 4 * 2</answer>", "", frac)).value, 1);
  // Hostile input: deep nesting and huge numbers are wrong answers, not crashes.
  EXPECT_EQ(at_most.score(sample("<answer>" + std::string(10000, '(') + "3" + std::string(10000, ')') + "</answer>",
                                 "", meta))
                .value,
            0);
  EXPECT_EQ(at_most.score(sample("<answer>99999999999999999999 * 3</answer>", "", meta)).value, 0);
  // Missing metadata is an error, not a zero.
  EXPECT_FALSE(at_most.score(sample("<answer>3</answer>")).error.empty());
}

TEST(WeightedSum, CombinesRulesFromARecipeSpec) {
  RewardRegistry reg = RewardRegistry::with_builtin_rules();
  for (const char* name : {"answer_match", "countdown", "format", "math", "choice"}) EXPECT_TRUE(reg.contains(name)) << name;
  EXPECT_FALSE(reg.contains("no_such_rule"));
  auto sum = WeightedSum::from_json(reg, nlohmann::json::parse(R"([
      {"name": "format", "weight": 0.1},
      {"name": "answer_match", "weight": 1.0, "params": {"tolerance": 0}}])"));
  ASSERT_TRUE(sum.ok()) << sum.status();
  Score s = (*sum)->score(sample("<think>t</think><answer>7</answer>", "7"));
  EXPECT_DOUBLE_EQ(s.value, 1.1);
  EXPECT_EQ(s.components.at("format"), 1);
  EXPECT_EQ(s.components.at("answer_match"), 1);
  EXPECT_DOUBLE_EQ((*sum)->score(sample("<answer>7</answer>", "7")).value, 1.0);
  // Bad specs name what is wrong.
  EXPECT_EQ(WeightedSum::from_json(reg, nlohmann::json::parse(R"([{"name": "nope"}])")).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WeightedSum::from_json(reg, nlohmann::json::parse(R"([{"name": "format", "weight": "x"}])"))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(reg.make("answer_match", {{"tolerance", -1}}).ok());
  EXPECT_FALSE(reg.make("format", {{"pattern", "("}}).ok());
  EXPECT_FALSE(WeightedSum::from_json(reg, nlohmann::json::array()).ok());
}

}  // namespace
}  // namespace r1lab::rewards
