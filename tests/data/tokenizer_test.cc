#include "data/tokenizer.h"

#include "data/tasks.h"
#include "gtest/gtest.h"
#include "model/vocabulary.h"
#include "rewards/rules.h"

namespace r1lab::data {
namespace {

TEST(Tokenizer, TemplateAndTagsAreSingleTokens) {
  const Tokenizer t = Tokenizer::builtin();
  const std::string prompt = r1_zero_prompt("What is 47 + 85?");
  auto ids = t.encode(prompt);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(ids->size(), 2u + std::string("What is 47 + 85?").size());
  auto back = t.decode(*ids);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, prompt);
  auto tags = t.encode(" <think>1+2=3</think> <answer>3</answer>");
  ASSERT_TRUE(tags.ok());
  EXPECT_EQ(tags->size(), 1u + 1 + 5 + 1 + 1 + 1 + 1 + 1);
  EXPECT_EQ(t.token((*tags)[1]), "<think>");
}

TEST(Tokenizer, RejectsWhatItCannotEncode) {
  const Tokenizer t = Tokenizer::builtin();
  auto bad = t.encode("caf\xC3\xA9");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("offset 3"), std::string::npos) << bad.status();
  EXPECT_FALSE(t.decode({t.size()}).ok());
  EXPECT_FALSE(Tokenizer::from_json("{}").ok());
  EXPECT_FALSE(Tokenizer::from_json(R"({"model":{"vocab":{"a":0,"b":2}}})").ok());  // gap
}

// tokenizer.json round-trips, and model::Vocabulary (what the rollout worker uses) decodes the same.
TEST(Tokenizer, JsonRoundTripAndVocabularyAgree) {
  const Tokenizer t = Tokenizer::builtin();
  auto again = Tokenizer::from_json(t.to_json());
  ASSERT_TRUE(again.ok()) << again.status();
  auto vocab = model::Vocabulary::from_json(t.to_json());
  ASSERT_TRUE(vocab.ok()) << vocab.status();
  ASSERT_EQ(vocab->size(), t.size());
  const std::string text = r1_zero_prompt("What is 3 + 4?") + " <think>3+4=7</think> <answer>7</answer>";
  auto ids = t.encode(text);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(*again->encode(text), *ids);
  std::vector<int32_t> with_specials = {t.bos()};
  with_specials.insert(with_specials.end(), ids->begin(), ids->end());
  with_specials.push_back(t.eos());
  EXPECT_EQ(*t.decode(with_specials), text);
  EXPECT_EQ(vocab->decode(with_specials), text);
}

TEST(WorkedSolution, RightSolutionsAreRightAndSlipsAreWrong) {
  rewards::AnswerMatch match({});
  auto format = rewards::FormatReward::make();
  ASSERT_TRUE(format.ok());
  TaskOptions o;
  o.arithmetic = {2, 3, "+"};
  auto problems = make_problems("arithmetic", 5, 0, 300, o);
  ASSERT_TRUE(problems.ok());
  int right = 0, wrong = 0;
  for (const Problem& p : *problems) {
    for (bool slip : {false, true}) {
      auto text = worked_solution(p, slip, 11);
      ASSERT_TRUE(text.ok()) << text.status();
      rewards::Sample s;
      s.completion = *text;
      s.reference = p.answer;
      EXPECT_EQ((*format)->score(s).value, 1.0) << *text;
      (match.score(s).value == 1.0 ? right : wrong) += 1;
      if (!slip) {
        EXPECT_EQ(match.score(s).value, 1.0) << p.question << *text;
      }
    }
  }
  EXPECT_EQ(right, 300);
  EXPECT_EQ(wrong, 300);
  Problem p;
  p.task = "arithmetic";
  p.meta = {{"a", 47}, {"b", 85}, {"op", "+"}};
  EXPECT_EQ(*worked_solution(p, false, 0), " <think>7+5=12 4+8+1=13</think> <answer>132</answer>");
  p.meta["op"] = "*";
  EXPECT_FALSE(worked_solution(p, false, 0).ok());
}

}  // namespace
}  // namespace r1lab::data
