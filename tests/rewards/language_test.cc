// Language consistency: words by Unicode script, code and math left out, target from params or prompt.
#include "rewards/language.h"

#include "gtest/gtest.h"

namespace r1lab::rewards {
namespace {

double consistency(const nlohmann::json& params, const std::string& prompt, const std::string& completion) {
  auto r = RewardRegistry::with_builtin_rules().make("language", params);
  EXPECT_TRUE(r.ok()) << r.status();
  const Score s = (*r)->score({prompt, completion, "", "", {}});
  EXPECT_TRUE(s.error.empty()) << s.error;
  return s.value;
}

TEST(Language, CountsWordsByScript) {
  const WordCounts c = count_words("We add 7 and 5 得到 十二 then карта");
  // Latin: We add and then (4); Han: 得 到 十 二 (4, one per character); Cyrillic: карта (1).
  EXPECT_EQ(c.total, 9);
  ASSERT_EQ(c.by_script.size(), 3u);
  EXPECT_EQ(c.by_script[0].second + c.by_script[1].second, 8);
  EXPECT_EQ(c.by_script[2], (std::pair<std::string, int64_t>{"cyrillic", 1}));
}

TEST(Language, LeavesOutCodeAndMath) {
  EXPECT_EQ(count_words("先 `print(hello world)` 后 $\\frac{abc}{def}$ 和 ```python\nfor x in y: pass\n``` \\(x y z\\)").total, 3);
  EXPECT_EQ(count_words("\\alpha \\beta").total, 0);
}

TEST(Language, FractionInTarget) {
  EXPECT_DOUBLE_EQ(consistency({{"language", "en"}}, "", "<think>one two three four</think><answer>4</answer>"), 1.0);
  EXPECT_DOUBLE_EQ(consistency({{"language", "en"}}, "", "<think>one two 三 四</think>"), 0.5);
  EXPECT_DOUBLE_EQ(consistency({{"language", "zh"}}, "", "<think>一二三 four</think>"), 0.75);
  // Only the reasoning counts unless scope is all.
  EXPECT_DOUBLE_EQ(consistency({{"language", "en"}}, "", "<think>one two</think><answer>三四五六</answer>"), 1.0);
  EXPECT_DOUBLE_EQ(consistency({{"language", "en"}, {"scope", "all"}}, "", "<think>one two</think><answer>三四五六</answer>"),
                   2.0 / 6.0);
  // Japanese accepts kana and kanji.
  EXPECT_DOUBLE_EQ(consistency({{"language", "ja"}}, "", "<think>これは漢字</think>"), 1.0);
  // No words at all is consistent.
  EXPECT_DOUBLE_EQ(consistency({{"language", "en"}}, "", "<think>1 + 2 = 3</think>"), 1.0);
}

TEST(Language, TargetFromThePrompt) {
  EXPECT_DOUBLE_EQ(consistency({}, "Сколько будет два плюс два?", "<think>два плюс два four</think>"), 0.75);
  EXPECT_DOUBLE_EQ(consistency({}, "计算二加二", "<think>二加二 is four</think>"), 0.6);
  EXPECT_DOUBLE_EQ(consistency({}, "What is 2+2?", "<think>two plus two</think>"), 1.0);
  EXPECT_EQ(dominant_script("これは日本語の文です"), "kana");
}

TEST(Language, BadInput) {
  EXPECT_FALSE(RewardRegistry::with_builtin_rules().make("language", {{"language", "klingon"}}).ok());
  EXPECT_FALSE(RewardRegistry::with_builtin_rules().make("language", {{"scope", "answer"}}).ok());
  // Invalid UTF-8 is skipped, not a crash.
  EXPECT_EQ(count_words(std::string("ab \xff\xfe cd \xe4\xb8")).total, 2);
}

}  // namespace
}  // namespace r1lab::rewards
