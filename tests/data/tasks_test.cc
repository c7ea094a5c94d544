#include "data/tasks.h"

#include <set>

#include "gtest/gtest.h"
#include "rewards/rules.h"

namespace r1lab::data {
namespace {

// Every generated problem's reference answer is right by the reward that will judge it.
TEST(Tasks, ReferenceAnswersPassTheirCheckers) {
  rewards::AnswerMatch match({});
  rewards::CountdownReward countdown(/*use_all=*/true);
  for (const char* task : {"arithmetic", "countdown"}) {
    auto problems = make_problems(task, 17, 0, 300);
    ASSERT_TRUE(problems.ok());
    std::set<std::string> distinct;
    for (const Problem& p : *problems) {
      rewards::Sample s;
      s.completion = "<think>t</think><answer>" + p.answer + "</answer>";
      s.reference = p.answer;
      s.meta = p.meta;
      const rewards::Score score = p.task == "countdown" ? countdown.score(s) : match.score(s);
      EXPECT_EQ(score.value, 1.0) << p.question << " -> " << p.answer << " " << score.error;
      distinct.insert(p.question);
    }
    EXPECT_GT(distinct.size(), 280u) << task;
  }
}

TEST(Tasks, ArithmeticAnswersAreTheValues) {
  for (int64_t i = 0; i < 200; ++i) {
    const Problem p = arithmetic_problem({}, 3, i);
    const int64_t a = p.meta["a"], b = p.meta["b"];
    const std::string op = p.meta["op"];
    const int64_t want = op == "+" ? a + b : op == "-" ? a - b : a * b;
    EXPECT_EQ(p.answer, std::to_string(want)) << p.question;
  }
}

TEST(Tasks, SameSeedAndIndexSameProblemDifferentSeedsDiffer) {
  EXPECT_EQ(countdown_problem({}, 5, 42).question, countdown_problem({}, 5, 42).question);
  EXPECT_EQ((*make_problems("countdown", 5, 40, 5))[2].question, countdown_problem({}, 5, 42).question);
  int same = 0;
  for (int64_t i = 0; i < 100; ++i) same += arithmetic_problem({}, 1, i).question == arithmetic_problem({}, 2, i).question;
  EXPECT_LT(same, 5);
  const Problem c = countdown_problem({}, 9, 0);
  EXPECT_GE(c.meta["numbers"].size(), 3u);
  EXPECT_LE(c.meta["numbers"].size(), 4u);
  EXPECT_FALSE(make_problems("poetry", 1, 0, 1).ok());
}

TEST(Tasks, R1ZeroPromptWrapsTheQuestion) {
  const std::string p = r1_zero_prompt("What is 2 + 2?");
  EXPECT_EQ(p.rfind("A conversation between User and Assistant.", 0), 0u);
  EXPECT_NE(p.find("<think> </think> and <answer> </answer> tags"), std::string::npos);
  EXPECT_NE(p.find("User: What is 2 + 2? Assistant:"), std::string::npos);
}

}  // namespace
}  // namespace r1lab::data
