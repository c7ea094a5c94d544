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

// Equal logits rank in vocabulary order, so a top-k cut inside a tie keeps the lower ids.
TEST(Sampler, TopKCutsTiesInVocabularyOrder) {
  const std::vector<float> logits = {1.0f, 5.0f, 5.0f, 5.0f, 0.0f, 5.0f};
  SamplingParams p;
  p.top_k = 2;
  Sampler s(3);
  int seen[6] = {0, 0, 0, 0, 0, 0};
  for (int i = 0; i < 400; ++i) ++seen[s.sample(logits.data(), 6, p, nullptr)];
  EXPECT_GT(seen[1], 100);
  EXPECT_GT(seen[2], 100);
  EXPECT_EQ(seen[1] + seen[2], 400) << "ids 3 and 5 tie with 1 and 2 but come later";
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

TEST(Sampler, SampleSeedsDifferAcrossIndicesAndSeeds) {
  EXPECT_NE(sample_seed(0, 0), sample_seed(0, 1));
  EXPECT_NE(sample_seed(0, 1), sample_seed(1, 0));
  EXPECT_EQ(sample_seed(5, 3), sample_seed(5, 3));
}

}  // namespace
}  // namespace r1lab::rollout
