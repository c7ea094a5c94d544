#include "rollout/sampler.h"

#include <cmath>

#include "core/backend.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace r1lab::rollout {
namespace {

TEST(Sampler, GreedyAndTopOneAgreeAndLogprobIsUnmodified) {
  std::vector<float> logits = {0.1f, 2.0f, -1.0f, 1.9f};
  double z = 0;
  for (float l : logits) z += std::exp(l);
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  SamplingParams top1;
  top1.temperature = 0.7f;
  top1.top_k = 1;
  Sampler s(1);
  float lp_g = 0, lp_k = 0;
  EXPECT_EQ(s.sample(logits.data(), 4, greedy, &lp_g), 1);
  EXPECT_EQ(s.sample(logits.data(), 4, top1, &lp_k), 1);
  EXPECT_NEAR(lp_g, 2.0 - std::log(z), 1e-6);
  EXPECT_NEAR(lp_k, lp_g, 1e-7);
}

TEST(Sampler, TopPKeepsTheNucleusAndMinPDropsTheTail) {
  std::vector<float> logits = {3.0f, 2.9f, -5.0f, -6.0f};
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_p = 0.9f;
  Sampler s(7);
  for (int i = 0; i < 200; ++i) EXPECT_LT(s.sample(logits.data(), 4, p, nullptr), 2);
  SamplingParams q;
  q.min_p = 0.5f;
  for (int i = 0; i < 200; ++i) EXPECT_LT(s.sample(logits.data(), 4, q, nullptr), 2);
}

TEST(Sampler, TemperatureSamplingFollowsTheDistribution) {
  std::vector<float> logits = {0.0f, std::log(3.0f)};  // p = 1/4, 3/4
  SamplingParams p;
  Sampler s(3);
  int ones = 0;
  for (int i = 0; i < 4000; ++i) ones += s.sample(logits.data(), 2, p, nullptr);
  EXPECT_NEAR(ones / 4000.0, 0.75, 0.03);
}

TEST(Sampler, RejectsBadParameters) {
  SamplingParams p;
  p.top_p = 0.0f;
  EXPECT_FALSE(validate(p).ok());
  p = SamplingParams();
  p.temperature = -1.0f;
  EXPECT_FALSE(validate(p).ok());
  p = SamplingParams();
  p.max_new_tokens = 0;
  EXPECT_FALSE(validate(p).ok());
}

TEST(Generate, SameSeedSameTokensWhateverElseIsInTheBatch) {
  auto be = core::make_cpu_backend();
  auto m = model::Model::load(testing::fixtures_dir() + "/tiny_a", *be);
  ASSERT_TRUE(m.ok()) << m.status();
  SamplingParams p;
  p.temperature = 1.0f;
  p.max_new_tokens = 6;
  p.seed = 42;
  auto alone = generate(**m, {{5, 6, 7}}, p);
  auto batched = generate(**m, {{5, 6, 7}, {9, 9, 9}}, p);
  ASSERT_TRUE(alone.ok() && batched.ok());
  EXPECT_EQ((*alone)[0].tokens, (*batched)[0].tokens);
  EXPECT_EQ((*alone)[0].tokens.size(), 6u);
  EXPECT_EQ((*alone)[0].finish_reason, "length");
  for (size_t i = 0; i < 6; ++i) EXPECT_NEAR((*alone)[0].logprobs[i], (*batched)[0].logprobs[i], 1e-4);
}

TEST(Generate, RejectsBadPrompts) {
  auto be = core::make_cpu_backend();
  auto m = model::Model::load(testing::fixtures_dir() + "/tiny_a", *be);
  ASSERT_TRUE(m.ok());
  SamplingParams p;
  EXPECT_EQ(generate(**m, {{}}, p).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(generate(**m, {{1, 2}, {1}}, p).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(generate(**m, {{-1}}, p).status().code(), absl::StatusCode::kInvalidArgument);
  p.max_new_tokens = 5000;
  EXPECT_EQ(generate(**m, {{1}}, p).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace r1lab::rollout
