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

// The backend's per-token gradient (what the trainer runs inside the LM head's pass) is the loss's own,
// bit for bit, given each token's (old, ref, advantage, coefficient): both aggregations, inside and far
// outside the clip range, with and without the KL term.
TEST(Grpo, BackendGradientIsTheLossGradient) {
  std::mt19937_64 rng(3);
  auto be = core::make_cpu_backend();
  for (auto agg : {GrpoConfig::Aggregation::kSequenceMean, GrpoConfig::Aggregation::kTokenMean}) {
    for (float spread : {0.05f, 0.5f}) {
      for (float beta : {0.0f, 0.04f}) {
        Batch b = make_batch(rng, spread);
        GrpoConfig cfg;
        cfg.aggregation = agg;
        cfg.kl_beta = beta;
        Tensor d = Tensor::zeros({3, 5});
        grpo_loss(cfg, b.logp, b.old, b.ref, b.adv, b.mask, &d);
        double call_tokens = 0;
        for (int i = 0; i < 15; ++i) call_tokens += b.mask.f32()[i];
        Tensor rows = Tensor::zeros({15, 4}), got = Tensor::zeros({15});
        for (int s = 0; s < 3; ++s) {
          double seq = 0;
          for (int j = 0; j < 5; ++j) seq += b.mask.f32()[s * 5 + j];
          const double w = grpo_token_weight(cfg, seq, call_tokens, 3, {});
          for (int j = 0; j < 5; ++j) {
            float* r = rows.f32() + 4 * (s * 5 + j);
            r[0] = b.old.f32()[s * 5 + j];
            r[1] = b.ref.f32()[s * 5 + j];
            r[2] = b.adv.f32()[s];
            r[3] = static_cast<float>(w * b.mask.f32()[s * 5 + j]);
          }
        }
        be->clipped_ratio_grad(b.logp.view({15}), rows, clipped_ratio_loss(cfg), got);
        int nonzero = 0;
        for (int i = 0; i < 15; ++i) {
          EXPECT_EQ(got.f32()[i], d.f32()[i]) << "token " << i << " spread " << spread << " beta " << beta;
          nonzero += d.f32()[i] != 0.0f;
        }
        EXPECT_GT(nonzero, 0);
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
