#include "rollout/sampler.h"

#include <cmath>
#include <memory>
#include <utility>
#include <vector>

#include "core/backend.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace r1lab::rollout {
namespace {

// One token from one row of logits on the CPU reference backend.
std::pair<int32_t, float> pick(const std::vector<float>& logits, const SamplingParams& p, float u) {
  static const std::unique_ptr<core::Backend> be = core::make_cpu_backend();
  std::vector<float> row = logits;
  const core::Tensor t = core::Tensor::wrap(row.data(), {1, static_cast<int64_t>(row.size())}, core::DType::kF32);
  std::vector<int32_t> tok;
  std::vector<float> lp;
  sample_tokens(*be, t, {{0, &p, u}}, &tok, &lp);
  return {tok[0], lp[0]};
}

TEST(Sampler, GreedyAndTopOneAgreeAndLogprobIsUnmodified) {
  std::vector<float> logits = {0.1f, 2.0f, -1.0f, 1.9f};
  double z = 0;
  for (float l : logits) z += std::exp(l);
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  SamplingParams top1;
  top1.temperature = 0.7f;
  top1.top_k = 1;
  const auto [tok_g, lp_g] = pick(logits, greedy, 0.9f);
  const auto [tok_k, lp_k] = pick(logits, top1, 0.9f);
  EXPECT_EQ(tok_g, 1);
  EXPECT_EQ(tok_k, 1);
  EXPECT_NEAR(lp_g, 2.0 - std::log(z), 1e-6);
  EXPECT_NEAR(lp_k, lp_g, 1e-7);
}

// The pick is the first token, in vocabulary order, at which the kept mass passes u of the total.
TEST(Sampler, PicksByTheCumulativeMassInVocabularyOrder) {
  const std::vector<float> flat = {0.0f, 0.0f, 0.0f, 0.0f};
  SamplingParams p;
  EXPECT_EQ(pick(flat, p, 0.0f).first, 0);
  EXPECT_EQ(pick(flat, p, 0.3f).first, 1);
  EXPECT_EQ(pick(flat, p, 0.74f).first, 2);
  EXPECT_EQ(pick(flat, p, 0.99f).first, 3);
  // Cut tokens carry no mass: with top-2 of {3: 2.0, 1: 1.0}, 0.5 of the kept mass lands on token 3.
  const std::vector<float> l = {0.0f, 1.0f, -1.0f, 2.0f};
  p.top_k = 2;
  EXPECT_EQ(pick(l, p, 0.1f).first, 1);
  EXPECT_EQ(pick(l, p, 0.5f).first, 3);
}

// Equal logits rank in vocabulary order, so a top-k cut inside a tie keeps the lower ids.
TEST(Sampler, TopKCutsTiesInVocabularyOrder) {
  const std::vector<float> logits = {1.0f, 5.0f, 5.0f, 5.0f, 0.0f, 5.0f};
  SamplingParams p;
  p.top_k = 2;
  int seen[6] = {0, 0, 0, 0, 0, 0};
  for (int i = 0; i < 400; ++i) ++seen[pick(logits, p, sample_uniform(3, i)).first];
  EXPECT_GT(seen[1], 100);
  EXPECT_GT(seen[2], 100);
  EXPECT_EQ(seen[1] + seen[2], 400) << "ids 3 and 5 tie with 1 and 2 but come later";
}

TEST(Sampler, TopPKeepsTheNucleusAndMinPDropsTheTail) {
  std::vector<float> logits = {3.0f, 2.9f, -5.0f, -6.0f};
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_p = 0.9f;
  for (int i = 0; i < 200; ++i) EXPECT_LT(pick(logits, p, sample_uniform(7, i)).first, 2);
  EXPECT_EQ(pick(logits, p, 0.999f).first, 1) << "the nucleus ends at token 1";
  SamplingParams q;
  q.min_p = 0.5f;
  for (int i = 0; i < 200; ++i) EXPECT_LT(pick(logits, q, sample_uniform(7, i)).first, 2);
  // top_p just above the first token's share needs the second token too.
  SamplingParams r;
  r.top_p = 0.53f;  // p(0) = 0.5249
  EXPECT_EQ(pick(logits, r, 0.999f).first, 1);
  r.top_p = 0.52f;
  EXPECT_EQ(pick(logits, r, 0.999f).first, 0);
}

TEST(Sampler, TemperatureSamplingFollowsTheDistribution) {
  std::vector<float> logits = {0.0f, std::log(3.0f)};  // p = 1/4, 3/4
  SamplingParams p;
  int ones = 0;
  for (int i = 0; i < 4000; ++i) ones += pick(logits, p, sample_uniform(3, i)).first;
  EXPECT_NEAR(ones / 4000.0, 0.75, 0.03);
  // A low temperature sharpens it: p ∝ (1, 3^(1/0.25)) = (1, 81).
  p.temperature = 0.25f;
  ones = 0;
  for (int i = 0; i < 4000; ++i) ones += pick(logits, p, sample_uniform(4, i)).first;
  EXPECT_NEAR(ones / 4000.0, 81.0 / 82.0, 0.01);
}

TEST(Sampler, UniformDrawsAreSpreadAndReproducible) {
  double sum = 0;
  for (int i = 0; i < 10000; ++i) {
    const float u = sample_uniform(11, i);
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    sum += u;
  }
  EXPECT_NEAR(sum / 10000, 0.5, 0.01);
  EXPECT_EQ(sample_uniform(11, 5), sample_uniform(11, 5));
  EXPECT_NE(sample_uniform(11, 5), sample_uniform(12, 5));
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
