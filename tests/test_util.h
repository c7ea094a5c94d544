// Helpers shared by the test suites: random tensors and finite-difference gradient checks.
#pragma once

#include <cmath>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "gtest/gtest.h"

namespace r1lab::testing {

inline core::Tensor randn(const core::Shape& shape, std::mt19937_64& rng, float scale = 1.0f) {
  core::Tensor t = core::Tensor::zeros(shape);
  std::normal_distribution<float> n(0.0f, scale);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(rng);
  return t;
}

inline double dot(const core::Tensor& a, const core::Tensor& b) {
  core::Tensor x = a.to_f32(), y = b.to_f32();
  double s = 0;
  for (int64_t i = 0; i < x.numel(); ++i) s += static_cast<double>(x.f32()[i]) * y.f32()[i];
  return s;
}

// Checks an analytic gradient by a central difference along a random direction u:
//   (S(x + εu) - S(x - εu)) / 2ε  ≈  grad · u.
// `scalar` recomputes the scalar objective from the current contents of x (perturbed in place).
inline void expect_directional_grad(const std::string& what, core::Tensor x, const core::Tensor& grad,
                                    const std::function<double()>& scalar, std::mt19937_64& rng,
                                    double eps = 1e-3, double rel_tol = 1e-2) {
  core::Tensor u = randn(x.shape(), rng);
  core::Tensor saved = x.clone();
  auto set = [&](double s) {
    for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = saved.f32()[i] + static_cast<float>(s) * u.f32()[i];
  };
  set(eps);
  const double plus = scalar();
  set(-eps);
  const double minus = scalar();
  set(0);
  const double numeric = (plus - minus) / (2 * eps);
  const double analytic = dot(grad, u);
  const double scale = std::max({std::fabs(numeric), std::fabs(analytic), 1e-6});
  EXPECT_LT(std::fabs(numeric - analytic) / scale, rel_tol)
      << what << ": numeric " << numeric << " vs analytic " << analytic;
}

// Where the Hugging Face fixtures live (R1LAB_FIXTURES overrides the build-time default).
inline std::string fixtures_dir() {
  if (const char* e = std::getenv("R1LAB_FIXTURES")) return e;
  return R1LAB_FIXTURES_DIR;
}

}  // namespace r1lab::testing
