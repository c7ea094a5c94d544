#include "trainer/cross_entropy.h"

#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace r1lab::trainer {
namespace {

using core::Tensor;

TEST(CrossEntropy, MatchesTheDefinitionAndItsGradient) {
  auto be = core::make_cpu_backend();
  std::mt19937_64 rng(4);
  const int64_t m = 6, v = 9;
  Tensor logits = testing::randn({m, v}, rng), targets = Tensor::zeros({m}, core::DType::kI32);
  Tensor w = Tensor::zeros({m});
  for (int i = 0; i < m; ++i) {
    targets.data<int32_t>()[i] = (3 * i + 1) % v;
    w.f32()[i] = i < 2 ? 0.0f : 1.0f;  // a masked prompt
  }
  Tensor d = Tensor::zeros({m, v});
  const double loss = cross_entropy(*be, logits, targets, w, &d);
  double want = 0;
  for (int i = 2; i < m; ++i) {
    double z = 0;
    for (int j = 0; j < v; ++j) z += std::exp(logits.f32()[i * v + j]);
    want -= logits.f32()[i * v + targets.data<int32_t>()[i]] - std::log(z);
  }
  EXPECT_NEAR(loss, want / 4, 1e-5);
  for (int j = 0; j < v; ++j) EXPECT_EQ(d.f32()[j], 0.0f) << "masked rows get no gradient";
  testing::expect_directional_grad("cross_entropy", logits, d,
                                   [&] { return cross_entropy(*be, logits, targets, w, nullptr); }, rng);
}

}  // namespace
}  // namespace r1lab::trainer
