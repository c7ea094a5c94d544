#include "trainer/grpo.h"

#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace r1lab::trainer {
namespace {

using core::Tensor;

struct Batch {
  Tensor logp, old, ref, adv, mask;
};

Batch make_batch(std::mt19937_64& rng, float spread) {
  Batch b{testing::randn({3, 5}, rng, 0.5f), Tensor(), Tensor(), testing::randn({3}, rng), Tensor::zeros({3, 5})};
  for (int i = 0; i < 15; ++i) b.logp.f32()[i] = -std::fabs(b.logp.f32()[i]) - 0.1f;
  b.old = b.logp.clone();
  b.ref = b.logp.clone();
  Tensor n1 = testing::randn({3, 5}, rng, spread), n2 = testing::randn({3, 5}, rng, spread);
  for (int i = 0; i < 15; ++i) {
    b.old.f32()[i] += n1.f32()[i];
    b.ref.f32()[i] += n2.f32()[i];
    b.mask.f32()[i] = (i % 5) < 3 + (i / 5) % 3 ? 1.0f : 0.0f;  // ragged lengths 3, 4, 5
  }
  return b;
}

TEST(Grpo, GradientMatchesFiniteDifferencesInBothAggregations) {
  std::mt19937_64 rng(1);
  for (auto agg : {GrpoConfig::Aggregation::kSequenceMean, GrpoConfig::Aggregation::kTokenMean}) {
    for (float spread : {0.05f, 0.5f}) {  // inside and well outside the clip range
      Batch b = make_batch(rng, spread);
      GrpoConfig cfg;
      cfg.aggregation = agg;
      Tensor d = Tensor::zeros({3, 5});
      grpo_loss(cfg, b.logp, b.old, b.ref, b.adv, b.mask, &d);
      testing::expect_directional_grad("grpo", b.logp, d,
                                       [&] { return grpo_loss(cfg, b.logp, b.old, b.ref, b.adv, b.mask, nullptr); },
                                       rng, 1e-3, 5e-3);
      for (int i = 0; i < 15; ++i)
        if (b.mask.f32()[i] == 0.0f) {
          EXPECT_EQ(d.f32()[i], 0.0f) << "masked tokens get no gradient";
        }
    }
  }
}

TEST(Grpo, OnPolicyLossIsMinusTheMeanAdvantageAndKlVanishes) {
  std::mt19937_64 rng(2);
  Batch b = make_batch(rng, 0.0f);
  GrpoConfig cfg;
  const double loss = grpo_loss(cfg, b.logp, b.logp, b.logp, b.adv, b.mask, nullptr);
  const double mean_adv = (b.adv.f32()[0] + b.adv.f32()[1] + b.adv.f32()[2]) / 3.0;
  EXPECT_NEAR(loss, -mean_adv, 1e-6);
}

TEST(Grpo, ClippedTokensStopPushing) {
  // ratio = e^1 far above 1 + ε with a positive advantage: the clipped branch is the minimum, no gradient.
  Tensor logp = Tensor::zeros({1, 1}), old = Tensor::zeros({1, 1}), ref = Tensor::zeros({1, 1});
  Tensor adv = Tensor::zeros({1}), mask = Tensor::zeros({1, 1}), d = Tensor::zeros({1, 1});
  old.f32()[0] = -1.0f;
  ref.f32()[0] = 0.0f;
  adv.f32()[0] = 1.0f;
  mask.f32()[0] = 1.0f;
  GrpoConfig cfg;
  cfg.kl_beta = 0.0f;
  const double loss = grpo_loss(cfg, logp, old, ref, adv, mask, &d);
  EXPECT_NEAR(loss, -1.2, 1e-6);
  EXPECT_EQ(d.f32()[0], 0.0f);
}

}  // namespace
}  // namespace r1lab::trainer
