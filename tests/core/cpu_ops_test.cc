// The CPU reference ops: forward against direct formulas, backward against finite differences.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <set>

#include "core/backend.h"
#include "core/latent_rows.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace r1lab::core {
namespace {

using testing::dot;
using testing::expect_directional_grad;
using testing::randn;

class CpuOps : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be_ = make_cpu_backend();
  std::mt19937_64 rng_{1234};
};

TEST_F(CpuOps, GemmAllTransposesMatchNaiveProducts) {
  const int64_t m = 5, n = 7, k = 9;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      Tensor a = randn(ta ? Shape{k, m} : Shape{m, k}, rng_);
      Tensor b = randn(tb ? Shape{n, k} : Shape{k, n}, rng_);
      Tensor c = randn({m, n}, rng_);
      Tensor c0 = c.clone();
      be_->gemm(a, ta, b, tb, c, 0.5f, 2.0f);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double s = 0;
          for (int64_t p = 0; p < k; ++p)
            s += (ta ? a.f32()[p * m + i] : a.f32()[i * k + p]) * (tb ? b.f32()[j * k + p] : b.f32()[p * n + j]);
          EXPECT_NEAR(c.f32()[i * n + j], 0.5 * s + 2.0 * c0.f32()[i * n + j], 1e-4) << ta << tb;
        }
    }
  }
}

// Into a bf16 c (beta 0): the f32 result, rounded once.
TEST_F(CpuOps, GemmIntoBf16IsTheF32ResultRounded) {
  Tensor a = randn({6, 9}, rng_), b = randn({5, 9}, rng_);
  Tensor c32 = Tensor::zeros({6, 5}), c16 = Tensor::zeros({6, 5}, DType::kBF16), want = Tensor::zeros({6, 5}, DType::kBF16);
  be_->gemm(a, false, b, true, c32, 0.5f);
  be_->gemm(a, false, b, true, c16, 0.5f);
  be_->copy(c32, want);
  EXPECT_EQ(std::memcmp(c16.raw(), want.raw(), 30 * 2), 0);
  EXPECT_NE(std::memcmp(c16.raw(), Tensor::zeros({6, 5}, DType::kBF16).raw(), 30 * 2), 0);
}

TEST_F(CpuOps, GemmReadsAndWritesColumnSlices) {
  Tensor big = randn({4, 10}, rng_);
  Tensor a = big.slice(1, 2, 3);  // [4, 3], row stride 10
  Tensor b = randn({2, 3}, rng_);
  Tensor out = Tensor::zeros({4, 8});
  Tensor c = out.slice(1, 5, 2);
  be_->gemm(a, false, b, true, c);
  Tensor ac = a.clone();
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < 2; ++j) {
      double s = 0;
      for (int64_t p = 0; p < 3; ++p) s += ac.f32()[i * 3 + p] * b.f32()[j * 3 + p];
      EXPECT_NEAR(out.f32()[i * 8 + 5 + j], s, 1e-5);
    }
  EXPECT_EQ(out.f32()[0], 0.0f);  // untouched columns stay
}

// Batched products over transposed views (the MLA absorption's [heads, tokens, d] of a [tokens, heads, d]).
TEST_F(CpuOps, GemmBatchedEqualsOneGemmPerBatchOnStridedViews) {
  const int64_t heads = 3, m = 5, k = 4, n = 6;
  Tensor q = randn({m, heads, k + 2}, rng_), w = randn({heads, n, k}, rng_), out = Tensor::zeros({m, heads, n});
  Tensor out_h = out.transpose(0, 1);
  be_->gemm_batched(q.slice(2, 0, k).transpose(0, 1), false, w, true, out_h, 2.0f, 0.0f);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t p = 0; p < k; ++p) s += q.f32()[(i * heads + h) * (k + 2) + p] * w.f32()[(h * n + j) * k + p];
        EXPECT_NEAR(out.f32()[(i * heads + h) * n + j], 2 * s, 1e-5);
      }
}

TEST_F(CpuOps, CopyConvertsBetweenF32AndBf16) {
  Tensor x = randn({3, 5}, rng_), y = Tensor::zeros({3, 5}, DType::kBF16), back = Tensor::zeros({3, 5});
  x.f32()[0] = 1.00390625f;  // halfway between two bf16 values: rounds to the even one, 1.0
  be_->copy(x, y);
  be_->copy(y, back);
  EXPECT_EQ(back.f32()[0], 1.0f);
  for (int64_t i = 1; i < 15; ++i) {
    EXPECT_EQ(y.data<uint16_t>()[i], f32_to_bf16(x.f32()[i]));
    EXPECT_NEAR(back.f32()[i], x.f32()[i], std::fabs(x.f32()[i]) / 128);
  }
}

// Activations only bf16 products read may be bf16 (the GPU's bf16 path makes them so): the CPU
// reference takes and makes them too, with the f32 result rounded once, and bf16 operands read exactly.
TEST_F(CpuOps, Bf16ActivationsAreTheF32ResultsRounded) {
  const int64_t m = 6, d = 16;
  Tensor x = randn({m, d}, rng_), w = randn({d}, rng_), y = Tensor::zeros({m, d}), rstd = Tensor::zeros({m});
  Tensor yb = Tensor::zeros({m, d}, DType::kBF16), rb = Tensor::zeros({m});
  be_->rmsnorm_forward(x, w, 1e-6f, y, rstd);
  be_->rmsnorm_forward(x, w, 1e-6f, yb, rb);
  Tensor gu = randn({m, 2 * d}, rng_), h = Tensor::zeros({m, d}), hb = Tensor::zeros({m, d}, DType::kBF16);
  be_->silu_mul_forward(gu, h);
  be_->silu_mul_forward(gu, hb);
  for (int64_t i = 0; i < m * d; ++i) {
    EXPECT_EQ(yb.data<uint16_t>()[i], f32_to_bf16(y.f32()[i]));
    EXPECT_EQ(hb.data<uint16_t>()[i], f32_to_bf16(h.f32()[i]));
  }
  EXPECT_EQ(rb.f32()[3], rstd.f32()[3]);
  // A bf16 operand is its values: the same product as from those values in f32.
  Tensor b = randn({5, d}, rng_), c1 = Tensor::zeros({m, 5}), c2 = Tensor::zeros({m, 5});
  be_->gemm(yb, false, b, true, c1);
  be_->gemm(yb.to_f32(), false, b, true, c2);
  for (int64_t i = 0; i < m * 5; ++i) EXPECT_EQ(c1.f32()[i], c2.f32()[i]);
  // Gathered bf16 rows move as they are; the grouped product reads them exactly, gathered where they
  // lie or in order.
  Tensor idx = Tensor::zeros({m, 2}, DType::kI32);
  for (int64_t i = 0; i < 2 * m; ++i) idx.data<int32_t>()[i] = static_cast<int32_t>((i * 5) % 3);
  Tensor row_of = Tensor::zeros({2 * m}, DType::kI32), token_of = Tensor::zeros({2 * m}, DType::kI32), off;
  be_->moe_dispatch(idx, 3, row_of, token_of, off);
  Tensor xs = Tensor::zeros({2 * m, d}, DType::kBF16), xs32 = Tensor::zeros({2 * m, d});
  be_->gather_rows(yb, token_of, xs);
  be_->gather_rows(yb.to_f32(), token_of, xs32);
  for (int64_t i = 0; i < 2 * m * d; ++i) EXPECT_EQ(xs.data<uint16_t>()[i], f32_to_bf16(xs32.f32()[i]));
  Tensor we = randn({3, 4, d}, rng_), o1 = Tensor::zeros({2 * m, 4}), o2 = Tensor::zeros({2 * m, 4});
  Tensor o3 = Tensor::zeros({2 * m, 4});
  be_->grouped_gemm(xs, we, true, off, o1);
  be_->grouped_gemm(xs32, we, true, off, o2);
  be_->grouped_gemm(yb, we, true, off, o3, 0.0f, &token_of);
  for (int64_t i = 0; i < 2 * m * 4; ++i) {
    EXPECT_EQ(o1.f32()[i], o2.f32()[i]);
    EXPECT_EQ(o1.f32()[i], o3.f32()[i]);
  }
}

TEST_F(CpuOps, GroupedGemmEqualsOneGemmPerGroup) {
  const int64_t offsets[] = {0, 3, 3, 7};  // an empty group in the middle
  Tensor bounds = Tensor::zeros({4}, DType::kI64);
  std::copy(std::begin(offsets), std::end(offsets), bounds.data<int64_t>());
  Tensor a = randn({7, 4}, rng_), w = randn({3, 5, 4}, rng_), c = Tensor::zeros({7, 5});
  be_->grouped_gemm(a, w, true, bounds, c);
  for (int g = 0; g < 3; ++g)
    for (int64_t r = offsets[g]; r < offsets[g + 1]; ++r)
      for (int64_t j = 0; j < 5; ++j) {
        double s = 0;
        for (int64_t p = 0; p < 4; ++p) s += a.f32()[r * 4 + p] * w.f32()[(g * 5 + j) * 4 + p];
        EXPECT_NEAR(c.f32()[r * 5 + j], s, 1e-5);
      }
  // Into bf16: the f32 sums rounded once.
  Tensor c16 = Tensor::zeros({7, 5}, DType::kBF16);
  be_->grouped_gemm(a, w, true, bounds, c16);
  const Tensor want16 = c.to(DType::kBF16);
  EXPECT_EQ(std::memcmp(c16.raw(), want16.raw(), 7 * 5 * 2), 0);
  // The weight gradient of c = a · w[g]ᵀ with respect to w under S = Σ dc·c.
  Tensor dc = randn({7, 5}, rng_), dw = Tensor::zeros({3, 5, 4});
  be_->grouped_gemm_wgrad(dc, a, bounds, dw);
  expect_directional_grad("grouped_gemm dw", w, dw, [&] {
    Tensor out = Tensor::zeros({7, 5});
    be_->grouped_gemm(a, w, true, bounds, out);
    return dot(out, dc);
  }, rng_);
  // beta 1 adds to what dw holds; beta 0 overwrites it, the empty group with zeros (NaN is not read).
  Tensor twice = dw.clone(), fresh = Tensor::zeros({3, 5, 4});
  be_->grouped_gemm_wgrad(dc, a, bounds, twice, 1.0f);
  be_->fill(fresh, NAN);
  be_->grouped_gemm_wgrad(dc, a, bounds, fresh, 0.0f);
  for (int64_t i = 0; i < dw.numel(); ++i) {
    EXPECT_EQ(twice.f32()[i], 2.0f * dw.f32()[i]) << i;
    EXPECT_EQ(fresh.f32()[i], dw.f32()[i]) << i;
  }
  // a's rows by index (from a source of other rows, some read twice): the products of those rows in order.
  Tensor src = randn({4, 4}, rng_), index = Tensor::zeros({7}, DType::kI32), in_order = Tensor::zeros({7, 4});
  const int32_t picks[] = {3, 0, 0, 2, 1, 3, 2};
  std::copy(std::begin(picks), std::end(picks), index.data<int32_t>());
  be_->gather_rows(src, index, in_order);
  for (int64_t r = 0; r < 7; ++r)
    for (int64_t p = 0; p < 4; ++p) ASSERT_EQ(in_order.f32()[r * 4 + p], src.f32()[picks[r] * 4 + p]);
  Tensor c1 = Tensor::zeros({7, 5}), c2 = Tensor::zeros({7, 5}), dw1 = Tensor::zeros({3, 5, 4}),
         dw2 = Tensor::zeros({3, 5, 4});
  be_->grouped_gemm(in_order, w, true, bounds, c1);
  be_->grouped_gemm(src, w, true, bounds, c2, 0.0f, &index);
  be_->grouped_gemm_wgrad(dc, in_order, bounds, dw1, 0.0f);
  be_->grouped_gemm_wgrad(dc, src, bounds, dw2, 0.0f, &index);
  EXPECT_EQ(std::memcmp(c1.raw(), c2.raw(), 7 * 5 * 4), 0);
  EXPECT_EQ(std::memcmp(dw1.raw(), dw2.raw(), 3 * 5 * 4 * 4), 0);
  Tensor h1 = Tensor::zeros({7, 2}, DType::kBF16), h2 = Tensor::zeros({7, 2}, DType::kBF16);
  Tensor w4 = randn({3, 4, 4}, rng_);
  be_->grouped_gate_up(in_order, w4, bounds, h1);
  be_->grouped_gate_up(src, w4, bounds, h2, nullptr, &index);
  EXPECT_EQ(std::memcmp(h1.raw(), h2.raw(), 7 * 2 * 2), 0);
}

// The experts' backward from the combine: with the routing weights s, grouped_silu_backward over dc's
// rows by index gives what the combine's backward then the plain one give from the experts' outputs:
// dscale = dc[token] · ys (ys = act · w_downᵀ, never made by the op), dgu from s · dh, and the down
// weights' gradient from dc's rows against s · act equals the one from the scaled rows against act.
TEST_F(CpuOps, GroupedSiluBackwardFromTheCombineNeedsNoOutputs) {
  const int64_t m = 5, h = 6, n = 4, g = 3;
  const int64_t offsets[] = {0, 3, 3, 8};
  Tensor bounds = Tensor::zeros({4}, DType::kI64);
  std::copy(std::begin(offsets), std::end(offsets), bounds.data<int64_t>());
  const int64_t rows = 8;
  Tensor token_of = Tensor::zeros({rows}, DType::kI32);
  const int32_t tokens[] = {4, 0, 2, 1, 0, 3, 4, 2};
  std::copy(std::begin(tokens), std::end(tokens), token_of.data<int32_t>());
  Tensor dy = randn({m, h}, rng_), w_down = randn({g, h, n}, rng_), gu = randn({rows, 2 * n}, rng_);
  Tensor scale = randn({rows}, rng_);
  // What the combine's backward has: the outputs ys = act · w_downᵀ and its gradient s · dy[token].
  Tensor act = Tensor::zeros({rows, n}), ys = Tensor::zeros({rows, h});
  be_->silu_mul_forward(gu, act);
  be_->grouped_gemm(act, w_down, true, bounds, ys);
  Tensor dys = Tensor::zeros({rows, h});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < h; ++j) dys.f32()[r * h + j] = scale.f32()[r] * dy.f32()[tokens[r] * h + j];
  Tensor want_dgu = Tensor::zeros({rows, 2 * n}), want_dw = Tensor::zeros({g, h, n});
  be_->grouped_silu_backward(dys, w_down, bounds, gu, want_dgu, nullptr, nullptr, nullptr, nullptr);
  be_->grouped_gemm_wgrad(dys, act, bounds, want_dw, 0.0f);
  // From dy's rows by index and the scale.
  Tensor dgu = randn({rows, 2 * n}, rng_), dscale = randn({rows}, rng_), scaled = randn({rows, n}, rng_);
  be_->grouped_silu_backward(dy, w_down, bounds, gu, dgu, &token_of, &scale, &dscale, &scaled);
  Tensor dw = randn({g, h, n}, rng_);
  be_->grouped_gemm_wgrad(dy, scaled, bounds, dw, 0.0f, nullptr, &token_of);
  for (int64_t r = 0; r < rows; ++r) {
    double want = 0;
    for (int64_t j = 0; j < h; ++j) want += static_cast<double>(dy.f32()[tokens[r] * h + j]) * ys.f32()[r * h + j];
    EXPECT_NEAR(dscale.f32()[r], want, 1e-4 * (1 + std::fabs(want))) << "row " << r;
    for (int64_t i = 0; i < n; ++i)
      EXPECT_NEAR(scaled.f32()[r * n + i], scale.f32()[r] * act.f32()[r * n + i], 1e-6) << "row " << r;
    for (int64_t i = 0; i < 2 * n; ++i)
      EXPECT_NEAR(dgu.f32()[r * 2 * n + i], want_dgu.f32()[r * 2 * n + i],
                  1e-4 * (1 + std::fabs(want_dgu.f32()[r * 2 * n + i])))
          << "row " << r;
  }
  for (int64_t i = 0; i < g * h * n; ++i)
    EXPECT_NEAR(dw.f32()[i], want_dw.f32()[i], 1e-4 * (1 + std::fabs(want_dw.f32()[i]))) << i;
  // The weights' gradient under S = Σ dy · combine(ys): dscale is its derivative along s.
  expect_directional_grad(
      "scale", scale, dscale,
      [&] {
        double sum = 0;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < h; ++j)
            sum += static_cast<double>(dy.f32()[tokens[r] * h + j]) * scale.f32()[r] * ys.f32()[r * h + j];
        return sum;
      },
      rng_);
}

TEST_F(CpuOps, RmsNormForwardAndBackward) {
  Tensor x = randn({6, 16}, rng_), w = randn({16}, rng_, 0.3f), y = Tensor::zeros({6, 16}), rstd = Tensor::zeros({6});
  for (int i = 0; i < 16; ++i) w.f32()[i] += 1.0f;
  be_->rmsnorm_forward(x, w, 1e-6f, y, rstd);
  double ss = 0;
  for (int i = 0; i < 16; ++i) ss += x.f32()[i] * x.f32()[i];
  EXPECT_NEAR(y.f32()[3], x.f32()[3] / std::sqrt(ss / 16 + 1e-6) * w.f32()[3], 1e-5);
  Tensor dy = randn({6, 16}, rng_), dx = Tensor::zeros({6, 16}), dw = Tensor::zeros({16});
  be_->rmsnorm_backward(dy, x, w, rstd, dx, dw);
  auto s = [&] {
    Tensor o = Tensor::zeros({6, 16}), r = Tensor::zeros({6});
    be_->rmsnorm_forward(x, w, 1e-6f, o, r);
    return dot(o, dy);
  };
  expect_directional_grad("rmsnorm dx", x, dx, s, rng_);
  expect_directional_grad("rmsnorm dw", w, dw, s, rng_);
}

TEST_F(CpuOps, SiluMulBackward) {
  // dgu starts as noise: the gradient is written, not accumulated.
  Tensor gu = randn({5, 12}, rng_), dh = randn({5, 6}, rng_), dgu = randn({5, 12}, rng_);
  be_->silu_mul_backward(dh, gu, dgu);
  expect_directional_grad("silu_mul", gu, dgu, [&] {
    Tensor h = Tensor::zeros({5, 6});
    be_->silu_mul_forward(gu, h);
    return dot(h, dh);
  }, rng_);
}

RopeTable test_table(int positions, int half) {
  RopeTable t{Tensor::zeros({positions, half}), Tensor::zeros({positions, half})};
  for (int p = 0; p < positions; ++p)
    for (int i = 0; i < half; ++i) {
      const double a = p * std::pow(10000.0, -2.0 * i / (2 * half));
      t.cos.f32()[p * half + i] = static_cast<float>(std::cos(a));
      t.sin.f32()[p * half + i] = static_cast<float>(std::sin(a));
    }
  return t;
}

TEST_F(CpuOps, RopeInterleavedIsHalfSplitOnDeinterleavedPairs) {
  const int64_t m = 4, h = 2, d = 8;
  RopeTable table = test_table(16, d / 2);
  Tensor pos = Tensor::zeros({m}, DType::kI32);
  for (int i = 0; i < m; ++i) pos.data<int32_t>()[i] = 3 * i + 1;
  Tensor x = randn({m, h, d}, rng_);
  // Deinterleave: y[j] = x[2j], y[j + d/2] = x[2j + 1].
  Tensor y = Tensor::zeros({m, h, d});
  for (int64_t r = 0; r < m * h; ++r)
    for (int64_t j = 0; j < d / 2; ++j) {
      y.f32()[r * d + j] = x.f32()[r * d + 2 * j];
      y.f32()[r * d + j + d / 2] = x.f32()[r * d + 2 * j + 1];
    }
  be_->rope(x, pos, table, true, false);
  be_->rope(y, pos, table, false, false);
  for (int64_t r = 0; r < m * h; ++r)
    for (int64_t j = 0; j < d / 2; ++j) {
      EXPECT_NEAR(x.f32()[r * d + 2 * j], y.f32()[r * d + j], 1e-6);
      EXPECT_NEAR(x.f32()[r * d + 2 * j + 1], y.f32()[r * d + j + d / 2], 1e-6);
    }
}

TEST_F(CpuOps, RopeInverseIsTheTranspose) {
  const int64_t m = 3, h = 2, d = 6;
  RopeTable table = test_table(8, d / 2);
  for (int i = 0; i < table.cos.numel(); ++i) {  // a YaRN-like attention factor folded in
    table.cos.f32()[i] *= 1.3f;
    table.sin.f32()[i] *= 1.3f;
  }
  Tensor pos = Tensor::zeros({m}, DType::kI32);
  for (int i = 0; i < m; ++i) pos.data<int32_t>()[i] = 2 + i;
  for (bool inter : {false, true}) {
    Tensor x = randn({m, h, d}, rng_), y = randn({m, h, d}, rng_);
    Tensor rx = x.clone(), ry = y.clone();
    be_->rope(rx, pos, table, inter, false);
    be_->rope(ry, pos, table, inter, true);
    EXPECT_NEAR(dot(rx, y), dot(x, ry), 1e-4) << "<R x, y> = <x, Rᵀ y>";
  }
}

struct AttnCase {
  int64_t b, t, s, hq, hk, d, dv;
};

class CpuAttention : public CpuOps, public ::testing::WithParamInterface<AttnCase> {};

TEST_P(CpuAttention, ForwardMatchesSoftmaxAndBackwardMatchesFiniteDifferences) {
  const AttnCase c = GetParam();
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  Tensor q = randn({c.b, c.t, c.hq, c.d}, rng_), k = randn({c.b, c.s, c.hk, c.d}, rng_);
  Tensor v = randn({c.b, c.s, c.hk, c.dv}, rng_);
  Tensor out = Tensor::zeros({c.b, c.t, c.hq, c.dv}), lse = Tensor::zeros({c.b, c.hq, c.t});
  be_->attention_forward(q, k, v, scale, out, lse);
  // Direct check of one output row: the last query of the last batch and head.
  {
    const int64_t bi = c.b - 1, h = c.hq - 1, t = c.t - 1, kh = h / (c.hq / c.hk), last = c.s - c.t + t;
    std::vector<double> p(static_cast<size_t>(last + 1));
    double z = 0;
    for (int64_t s = 0; s <= last; ++s) {
      double a = 0;
      for (int64_t i = 0; i < c.d; ++i)
        a += q.f32()[((bi * c.t + t) * c.hq + h) * c.d + i] * k.f32()[((bi * c.s + s) * c.hk + kh) * c.d + i];
      p[s] = std::exp(a * scale);
      z += p[s];
    }
    for (int64_t i = 0; i < c.dv; ++i) {
      double o = 0;
      for (int64_t s = 0; s <= last; ++s) o += p[s] / z * v.f32()[((bi * c.s + s) * c.hk + kh) * c.dv + i];
      EXPECT_NEAR(out.f32()[((bi * c.t + t) * c.hq + h) * c.dv + i], o, 1e-5);
    }
  }
  Tensor dout = randn(out.shape(), rng_);
  Tensor dq = Tensor::zeros(q.shape()), dk = Tensor::zeros(k.shape()), dv = Tensor::zeros(v.shape());
  be_->attention_backward(dout, q, k, v, out, lse, scale, dq, dk, dv);
  auto s = [&] {
    Tensor o = Tensor::zeros(out.shape()), l = Tensor::zeros(lse.shape());
    be_->attention_forward(q, k, v, scale, o, l);
    return dot(o, dout);
  };
  expect_directional_grad("attention dq", q, dq, s, rng_);
  expect_directional_grad("attention dk", k, dk, s, rng_);
  expect_directional_grad("attention dv", v, dv, s, rng_);
  // A bf16 output: the f32 one rounded once; backward reads it as it is (the rounded output's row sums).
  Tensor out16 = Tensor::zeros(out.shape(), DType::kBF16), lse16 = Tensor::zeros(lse.shape());
  be_->attention_forward(q, k, v, scale, out16, lse16);
  const Tensor want16 = out.clone().to(DType::kBF16);
  EXPECT_EQ(std::memcmp(out16.raw(), want16.raw(), static_cast<size_t>(out.numel()) * 2), 0);
  Tensor dq16 = Tensor::zeros(q.shape()), dk16 = Tensor::zeros(k.shape()), dv16 = Tensor::zeros(v.shape());
  Tensor dq_r = Tensor::zeros(q.shape()), dk_r = Tensor::zeros(k.shape()), dv_r = Tensor::zeros(v.shape());
  be_->attention_backward(dout, q, k, v, out16, lse16, scale, dq16, dk16, dv16);
  be_->attention_backward(dout, q, k, v, out16.to_f32(), lse16, scale, dq_r, dk_r, dv_r);
  for (const auto& [got, want] : {std::pair{&dq16, &dq_r}, {&dk16, &dk_r}, {&dv16, &dv_r}})
    EXPECT_EQ(std::memcmp(got->raw(), want->raw(), static_cast<size_t>(got->numel()) * 4), 0);
  // Overwriting (accumulate false) never reads what is there (NaN here): the sums into zeros above.
  auto nans = [](const Tensor& like) {
    Tensor t = Tensor::empty(like.shape());
    std::fill_n(t.f32(), t.numel(), std::numeric_limits<float>::quiet_NaN());
    return t;
  };
  Tensor dq_o = nans(q), dk_o = nans(k), dv_o = nans(v);
  be_->attention_backward(dout, q, k, v, out, lse, scale, dq_o, dk_o, dv_o, /*accumulate=*/false);
  for (const auto& [got, want] : {std::pair{&dq_o, &dq}, {&dk_o, &dk}, {&dv_o, &dv}})
    EXPECT_EQ(std::memcmp(got->raw(), want->raw(), static_cast<size_t>(got->numel()) * 4), 0);
  // dq and dk in parts (overwritten): dq's first 8 columns of each head rounded into bf16, dk's in f32,
  // the rest of each into f32 tails; the whole gradients' values.
  if (c.d > 8) {
    Tensor qh = Tensor::zeros({c.b, c.t, c.hq, 8}, DType::kBF16), qt = nans(Tensor::zeros({c.b, c.t, c.hq, c.d - 8}));
    Tensor kh = nans(Tensor::zeros({c.b, c.s, c.hk, 8})), kt = nans(Tensor::zeros({c.b, c.s, c.hk, c.d - 8}));
    Tensor dv_p = nans(v);
    be_->attention_backward(dout, q, k, v, out, lse, scale, qh, kh, dv_p, /*accumulate=*/false, &qt, &kt);
    const Tensor qh32 = qh.to_f32();
    for (int64_t r = 0; r < c.b * c.t * c.hq; ++r)
      for (int64_t i = 0; i < c.d; ++i) {
        const float want = dq.f32()[r * c.d + i];
        if (i < 8)
          EXPECT_EQ(qh32.f32()[r * 8 + i], bf16_to_f32(f32_to_bf16(want)));
        else
          EXPECT_EQ(qt.f32()[r * (c.d - 8) + i - 8], want);
      }
    for (int64_t r = 0; r < c.b * c.s * c.hk; ++r)
      for (int64_t i = 0; i < c.d; ++i)
        EXPECT_EQ(i < 8 ? kh.f32()[r * 8 + i] : kt.f32()[r * (c.d - 8) + i - 8], dk.f32()[r * c.d + i]);
    EXPECT_EQ(std::memcmp(dv_p.raw(), dv.raw(), static_cast<size_t>(dv.numel()) * 4), 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuAttention,
                         ::testing::Values(AttnCase{2, 5, 5, 3, 3, 8, 6},    // training: T = S
                                           AttnCase{1, 3, 7, 4, 1, 10, 6},   // latent decode: one kv head, S > T
                                           AttnCase{2, 1, 6, 4, 2, 4, 4}));  // grouped heads, one query

struct RouteCase {
  RouterConfig::Scoring scoring;
  RouterConfig::TopkMethod method;
  int n_group, topk_group;
  bool norm;
};

class CpuRouter : public CpuOps, public ::testing::WithParamInterface<RouteCase> {};

TEST_P(CpuRouter, WeightsDifferentiateThroughScores) {
  const RouteCase c = GetParam();
  RouterConfig rc;
  rc.scoring = c.scoring;
  rc.method = c.method;
  rc.n_experts = 8;
  rc.top_k = 3;
  rc.n_group = c.n_group;
  rc.topk_group = c.topk_group;
  rc.norm_topk_prob = c.norm;
  rc.routed_scaling_factor = 2.5f;
  const int64_t m = 6;
  Tensor logits = randn({m, 8}, rng_), bias = randn({8}, rng_, 0.1f);
  Tensor idx = Tensor::zeros({m, 3}, DType::kI32), w = Tensor::zeros({m, 3}), scores = Tensor::zeros({m, 8});
  be_->moe_route(logits, bias, rc, idx, w, scores);
  for (int64_t i = 0; i < m; ++i) {
    double sum = 0;
    for (int k = 0; k < 3; ++k) sum += w.f32()[i * 3 + k];
    if (c.norm) {
      EXPECT_NEAR(sum, 2.5, 1e-5);
    }
    if (c.method != RouterConfig::TopkMethod::kGreedy && c.n_group > 1) {
      std::set<int> groups;
      for (int k = 0; k < 3; ++k) groups.insert(idx.data<int32_t>()[i * 3 + k] / (8 / c.n_group));
      EXPECT_LE(static_cast<int>(groups.size()), c.topk_group) << "experts from outside the chosen groups";
    }
  }
  Tensor dw = randn({m, 3}, rng_), dlogits = Tensor::zeros({m, 8});
  be_->moe_route_backward(dw, scores, idx, rc, dlogits);
  expect_directional_grad("router", logits, dlogits, [&] {
    Tensor i2 = Tensor::zeros({m, 3}, DType::kI32), w2 = Tensor::zeros({m, 3}), s2 = Tensor::zeros({m, 8});
    be_->moe_route(logits, bias, rc, i2, w2, s2);
    return dot(w2, dw);
  }, rng_, 1e-4);
}

using S = RouterConfig::Scoring;
using M = RouterConfig::TopkMethod;
INSTANTIATE_TEST_SUITE_P(Configs, CpuRouter,
                         ::testing::Values(RouteCase{S::kSigmoid, M::kNoauxTc, 2, 1, true},
                                           RouteCase{S::kSigmoid, M::kNoauxTc, 4, 2, false},
                                           RouteCase{S::kSoftmax, M::kGroupLimitedGreedy, 4, 2, true},
                                           RouteCase{S::kSoftmax, M::kGreedy, 1, 1, false}));

TEST_F(CpuOps, RouterLimitsSelectionToTheBestGroupsAndUsesBiasForSelectionOnly) {
  RouterConfig rc;
  rc.n_experts = 4;
  rc.top_k = 2;
  rc.n_group = 2;
  rc.topk_group = 1;
  rc.norm_topk_prob = false;
  // Expert 0 alone is the best; group 1 (experts 2, 3) has the best top-2 sum.
  Tensor logits = Tensor::zeros({1, 4});
  const float l[4] = {3.0f, -3.0f, 1.0f, 1.0f};
  std::copy(l, l + 4, logits.f32());
  Tensor idx = Tensor::zeros({1, 2}, DType::kI32), w = Tensor::zeros({1, 2}), s = Tensor::zeros({1, 4});
  be_->moe_route(logits, Tensor(), rc, idx, w, s);
  std::set<int> chosen = {idx.data<int32_t>()[0], idx.data<int32_t>()[1]};
  EXPECT_EQ(chosen, (std::set<int>{2, 3}));
  // A bias on expert 1 moves group 0 ahead, but weights stay the unbiased scores.
  Tensor bias = Tensor::zeros({4});
  bias.f32()[1] = 2.0f;
  be_->moe_route(logits, bias, rc, idx, w, s);
  chosen = {idx.data<int32_t>()[0], idx.data<int32_t>()[1]};
  EXPECT_EQ(chosen, (std::set<int>{0, 1}));
  for (int k = 0; k < 2; ++k) EXPECT_FLOAT_EQ(w.f32()[k], s.f32()[idx.data<int32_t>()[k]]);
}

TEST_F(CpuOps, DispatchCombineIsTheWeightedSumAndDifferentiates) {
  const int64_t m = 5, k = 2, h = 4, e = 3;
  Tensor x = randn({m, h}, rng_), w = randn({m, k}, rng_);
  Tensor idx = Tensor::zeros({m, k}, DType::kI32);
  for (int64_t i = 0; i < m * k; ++i) idx.data<int32_t>()[i] = static_cast<int32_t>((i * 7 + 1) % e);
  Tensor row_of = Tensor::zeros({m * k}, DType::kI32), token_of = Tensor::zeros({m * k}, DType::kI32);
  Tensor bounds;
  be_->moe_dispatch(idx, static_cast<int>(e), row_of, token_of, bounds);
  ASSERT_EQ(bounds.numel(), e + 1);
  ASSERT_EQ(bounds.dtype(), DType::kI64);
  const int64_t* offsets = bounds.data<int64_t>();
  EXPECT_EQ(offsets[e], m * k);
  int64_t last = -1;  // rows of one expert in assignment order
  for (int64_t a = 0; a < m * k; ++a) {
    const int64_t r = row_of.data<int32_t>()[a];
    EXPECT_GE(r, offsets[idx.data<int32_t>()[a]]);
    EXPECT_LT(r, offsets[idx.data<int32_t>()[a] + 1]);
    EXPECT_EQ(token_of.data<int32_t>()[r], a / k);
    if (idx.data<int32_t>()[a] == 1) {
      EXPECT_GT(r, last);
      last = r;
    }
  }
  Tensor xs = Tensor::zeros({m * k, h});
  be_->gather_rows(x, token_of, xs);
  Tensor out = Tensor::zeros({m, h});
  be_->moe_combine(xs, w, row_of, out);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < h; ++j)
      EXPECT_NEAR(out.f32()[i * h + j], (w.f32()[i * k] + w.f32()[i * k + 1]) * x.f32()[i * h + j], 1e-5);
  // dys and dw start as noise: they are written, not accumulated.
  Tensor dout = randn({m, h}, rng_), dys = randn({m * k, h}, rng_), dw = randn({m, k}, rng_);
  be_->moe_combine_backward(dout, xs, w, row_of, dys, dw);
  Tensor dx = Tensor::zeros({m, h}), written = randn({m, h}, rng_);  // noise: written, not read
  be_->moe_dispatch_backward(dys, row_of, dx);
  be_->moe_dispatch_backward(dys, row_of, written, /*accumulate=*/false);
  EXPECT_EQ(std::memcmp(written.raw(), dx.raw(), static_cast<size_t>(m * h) * 4), 0);
  auto s = [&] {
    Tensor xs2 = Tensor::zeros({m * k, h}), r2 = Tensor::zeros({m * k}, DType::kI32), o = Tensor::zeros({m, h});
    Tensor t2 = Tensor::zeros({m * k}, DType::kI32), off;
    be_->moe_dispatch(idx, static_cast<int>(e), r2, t2, off);
    be_->gather_rows(x, t2, xs2);
    be_->moe_combine(xs2, w, r2, o);
    return dot(o, dout);
  };
  expect_directional_grad("combine dweights", w, dw, s, rng_);
  expect_directional_grad("dispatch dx", x, dx, s, rng_);
}

TEST_F(CpuOps, LogprobsAndEmbeddings) {
  const int64_t m = 4, v = 11;
  Tensor logits = randn({m, v}, rng_), targets = Tensor::zeros({m}, DType::kI32);
  for (int i = 0; i < m; ++i) targets.data<int32_t>()[i] = (i * 5) % v;
  Tensor lp = Tensor::zeros({m}), lse = Tensor::zeros({m});
  be_->logprobs_forward(logits, targets, lp, lse);
  double z = 0;
  for (int j = 0; j < v; ++j) z += std::exp(logits.f32()[j]);
  EXPECT_NEAR(lp.f32()[0], logits.f32()[0] - std::log(z), 1e-5);
  // dlogits starts as noise (it is written, not accumulated), and one row's dlp is 0.
  Tensor dlp = randn({m}, rng_), dlogits = randn({m, v}, rng_);
  dlp.f32()[1] = 0.0f;
  be_->logprobs_backward(dlp, logits, targets, lse, dlogits);
  for (int j = 0; j < v; ++j) EXPECT_EQ(dlogits.f32()[v + j], 0.0f);
  expect_directional_grad("logprobs", logits, dlogits, [&] {
    Tensor a = Tensor::zeros({m}), b = Tensor::zeros({m});
    be_->logprobs_forward(logits, targets, a, b);
    return dot(a, dlp);
  }, rng_);
  // Entropy and argmax: a uniform row has entropy log V and its first index; a one-hot-like row entropy ~0.
  Tensor lg2 = Tensor::zeros({3, v}), lse2 = Tensor::zeros({3}), h = Tensor::zeros({3});
  Tensor am = Tensor::zeros({3}, DType::kI32), tg2 = Tensor::zeros({3}, DType::kI32);
  lg2.f32()[v + 6] = 60.0f;
  for (int j = 0; j < v; ++j) lg2.f32()[2 * v + j] = logits.f32()[j];
  Tensor lp2 = Tensor::zeros({3});
  be_->logprobs_forward(lg2, tg2, lp2, lse2);
  be_->logit_stats(lg2, lse2, h, am);
  EXPECT_NEAR(h.f32()[0], std::log(static_cast<double>(v)), 1e-6);
  EXPECT_EQ(am.data<int32_t>()[0], 0);
  EXPECT_NEAR(h.f32()[1], 0.0, 1e-6);
  EXPECT_EQ(am.data<int32_t>()[1], 6);
  double want_h = 0;
  for (int j = 0; j < v; ++j) {
    const double p = std::exp(logits.f32()[j]) / z;
    want_h -= p * std::log(p);
  }
  EXPECT_NEAR(h.f32()[2], want_h, 1e-5);
  EXPECT_EQ(am.data<int32_t>()[2], std::max_element(logits.f32(), logits.f32() + v) - logits.f32());
  // Embedding backward accumulates repeated ids.
  Tensor table = randn({v, 3}, rng_), ids = Tensor::zeros({3}, DType::kI32), out = Tensor::zeros({3, 3});
  ids.data<int32_t>()[0] = 2;
  ids.data<int32_t>()[1] = 7;
  ids.data<int32_t>()[2] = 2;
  be_->embedding_forward(table, ids, out);
  EXPECT_EQ(out.f32()[3], table.f32()[7 * 3]);
  Tensor dt = Tensor::zeros({v, 3}), dout = Tensor::zeros({3, 3});
  be_->fill(dout, 1.0f);
  be_->embedding_backward(dout, ids, dt);
  EXPECT_EQ(dt.f32()[2 * 3], 2.0f);
  EXPECT_EQ(dt.f32()[7 * 3], 1.0f);
  EXPECT_EQ(dt.f32()[0], 0.0f);
}

// Paged latent attention equals dense multi-query attention over the same rows laid out contiguously,
// for sequences with different context lengths and numbers of new tokens, in scattered blocks.
TEST_F(CpuOps, PagedLatentAttentionMatchesDenseAttention) {
  const int64_t heads = 3, d = 10, dv = 6, block = 4, n_blocks = 9;
  const std::vector<int32_t> ctx = {7, 1, 12}, new_tokens = {3, 1, 12};
  const std::vector<std::vector<int32_t>> tables = {{4, 0}, {8}, {2, 7, 5}};
  Tensor pool = randn({n_blocks * block, d}, rng_);
  std::vector<int32_t> starts = {0};
  for (int32_t n : new_tokens) starts.push_back(starts.back() + n);
  const int64_t n = starts.back();
  Tensor q = randn({n, heads, d}, rng_);
  Tensor out = Tensor::zeros({n, heads, dv});
  Tensor table = Tensor::zeros({3, 3}, DType::kI32);
  for (int s = 0; s < 3; ++s)
    for (size_t b = 0; b < tables[s].size(); ++b) table.data<int32_t>()[s * 3 + b] = tables[s][b];
  be_->scatter_rows(Tensor::zeros({0, d}), Tensor::zeros({0}, DType::kI32), pool);  // no rows: no-op
  be_->paged_latent_attention(q, pool, static_cast<int>(block), table,
                              Tensor::wrap(starts.data(), {4}, DType::kI32),
                              Tensor::wrap(const_cast<int32_t*>(ctx.data()), {3}, DType::kI32), 0.3f, out);
  for (int s = 0; s < 3; ++s) {
    // The sequence's rows gathered into [1, S, 1, d].
    Tensor kv = Tensor::zeros({1, ctx[s], 1, d});
    for (int p = 0; p < ctx[s]; ++p)
      for (int64_t j = 0; j < d; ++j)
        kv.f32()[p * d + j] = pool.f32()[(tables[s][p / block] * block + p % block) * d + j];
    Tensor qs = q.slice(0, starts[s], new_tokens[s]).clone().unsqueeze(0);
    Tensor want = Tensor::zeros({1, new_tokens[s], heads, dv}), lse = Tensor::zeros({1, heads, new_tokens[s]});
    be_->attention_forward(qs, kv, kv.slice(3, 0, dv), 0.3f, want, lse);
    for (int64_t i = 0; i < want.numel(); ++i)
      EXPECT_NEAR(out.f32()[starts[s] * heads * dv + i], want.f32()[i], 1e-5) << "sequence " << s;
  }
}

TEST_F(CpuOps, ScatterRowsWritesTheNamedRows) {
  Tensor dst = Tensor::zeros({5, 3});
  Tensor src = randn({2, 3}, rng_);
  std::vector<int32_t> rows = {4, 1};
  be_->scatter_rows(src, Tensor::wrap(rows.data(), {2}, DType::kI32), dst);
  for (int64_t j = 0; j < 3; ++j) {
    EXPECT_EQ(dst.f32()[4 * 3 + j], src.f32()[j]);
    EXPECT_EQ(dst.f32()[1 * 3 + j], src.f32()[3 + j]);
    EXPECT_EQ(dst.f32()[0 * 3 + j], 0.0f);
  }
  // A bf16 pool: rows rounded to nearest even, and attention over it reads exactly those values.
  Tensor dst16 = Tensor::zeros({5, 3}, DType::kBF16);
  be_->scatter_rows(src, Tensor::wrap(rows.data(), {2}, DType::kI32), dst16);
  const Tensor back = dst16.to_f32();
  for (int64_t j = 0; j < 3; ++j) {
    EXPECT_EQ(dst16.data<uint16_t>()[4 * 3 + j], f32_to_bf16(src.f32()[j]));
    EXPECT_EQ(back.f32()[1 * 3 + j], bf16_to_f32(f32_to_bf16(src.f32()[3 + j])));
  }
  std::vector<int32_t> table = {1, 0}, starts = {0, 1}, ctx = {4};
  Tensor q = randn({1, 2, 3}, rng_), a = Tensor::zeros({1, 2, 2}), b = Tensor::zeros({1, 2, 2});
  be_->paged_latent_attention(q, dst16, 2, Tensor::wrap(table.data(), {1, 2}, DType::kI32),
                              Tensor::wrap(starts.data(), {2}, DType::kI32), Tensor::wrap(ctx.data(), {1}, DType::kI32),
                              0.5f, a);
  Tensor pool = Tensor::zeros({5, 3});
  for (int64_t i = 0; i < 15; ++i) pool.f32()[i] = back.f32()[i];
  be_->paged_latent_attention(q, pool, 2, Tensor::wrap(table.data(), {1, 2}, DType::kI32),
                              Tensor::wrap(starts.data(), {2}, DType::kI32), Tensor::wrap(ctx.data(), {1}, DType::kI32),
                              0.5f, b);
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(a.f32()[i], b.f32()[i]);
}

TEST(Fp8, E4M3ConversionRoundsToNearestEvenAndSaturates) {
  // Every finite code decodes and encodes back to itself (0x80, -0, to itself too).
  for (int b = 0; b < 256; ++b) {
    if ((b & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(e4m3_to_f32(static_cast<uint8_t>(b))));
      continue;
    }
    EXPECT_EQ(f32_to_e4m3(e4m3_to_f32(static_cast<uint8_t>(b))), b) << b;
  }
  EXPECT_EQ(e4m3_to_f32(0x7e), 448.0f);
  EXPECT_EQ(e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(e4m3_to_f32(0x08), std::ldexp(1.0f, -6));
  // Between two neighbours: nearer one wins; the midpoint goes to the even code.
  for (int b = 0; b < 0x7e; ++b) {
    const float lo = e4m3_to_f32(static_cast<uint8_t>(b)), hi = e4m3_to_f32(static_cast<uint8_t>(b + 1));
    const float mid = 0.5f * (lo + hi);
    EXPECT_EQ(f32_to_e4m3(mid), (b % 2 == 0) ? b : b + 1) << b;
    EXPECT_EQ(f32_to_e4m3(std::nextafter(mid, lo)), b) << b;
    EXPECT_EQ(f32_to_e4m3(std::nextafter(mid, hi)), b + 1) << b;
    EXPECT_EQ(f32_to_e4m3(-std::nextafter(mid, hi)), 0x80 | (b + 1)) << b;
  }
  EXPECT_EQ(f32_to_e4m3(460.0f), 0x7e);
  EXPECT_EQ(f32_to_e4m3(1e9f), 0x7e);
  EXPECT_EQ(f32_to_e4m3(-INFINITY), 0xfe);
  EXPECT_EQ(f32_to_e4m3(NAN) & 0x7f, 0x7f);
  EXPECT_EQ(f32_to_e4m3(1e-9f), 0x00);
}

TEST(Fp8, TileScaleIsTheSmallestPowerOfTwoThatFits) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> mant(0.5f, 1.0f);
  std::uniform_int_distribution<int> ex(-60, 60);
  for (int i = 0; i < 20000; ++i) {
    const float amax = std::ldexp(mant(rng), ex(rng));
    const int k = fp8_scale_exponent(amax);
    EXPECT_LE(amax, kE4M3Max * std::ldexp(1.0f, k)) << amax;
    EXPECT_GT(amax, kE4M3Max * std::ldexp(1.0f, k - 1)) << amax;
    EXPECT_EQ(exp2_int(k), std::ldexp(1.0f, k));
  }
  EXPECT_EQ(fp8_scale_exponent(448.0f), 0);
  EXPECT_EQ(fp8_scale_exponent(std::nextafter(448.0f, 1e9f)), 1);
  EXPECT_EQ(fp8_scale_exponent(0.0f), 0);
  EXPECT_EQ(fp8_scale_exponent(INFINITY), 0);
  EXPECT_EQ(fp8_scale_exponent(1e-40f), -126);
}

TEST(Fp8, LatentRowsKeepTheLatentToE4M3PrecisionAndTheRopeKeyInBf16) {
  const Fp8LatentRow f{128, 16};
  EXPECT_EQ(f.bytes(), 128 + 32 + 8 + 8);  // padded to 16 bytes
  EXPECT_EQ((Fp8LatentRow{512, 64}.bytes()), 672);
  EXPECT_EQ((Fp8LatentRow{256, 32}.bytes()), 336);
  EXPECT_FALSE(Fp8LatentRow::fits(16, 4));
  EXPECT_FALSE(Fp8LatentRow::fits(64, 4));
  EXPECT_TRUE(Fp8LatentRow::fits(64, 8));
  std::mt19937_64 rng(9);
  Tensor src = randn({3, f.r + f.rd}, rng);
  src.f32()[5] = 0;  // a zero; and a tile of widely spread magnitudes
  for (int i = 64; i < 128; ++i) src.f32()[i] *= std::ldexp(1.0f, i % 20 - 10);
  for (int i = 0; i < 64; ++i) src.f32()[2 * (f.r + f.rd) + i] = 0;  // a tile of zeros
  Tensor pool = Tensor::zeros({5, f.bytes()}, DType::kU8);
  std::memset(pool.raw(), 0xab, static_cast<size_t>(pool.numel()));
  std::vector<int32_t> rows = {4, 0, 2};
  auto be = make_cpu_backend();
  be->scatter_fp8_latents(src, f.r, Tensor::wrap(rows.data(), {3}, DType::kI32), pool);
  EXPECT_EQ(pool.data<uint8_t>()[1 * f.bytes()], 0xab) << "a row not named is untouched";
  for (int i = 0; i < 3; ++i) {
    const uint8_t* row = pool.data<uint8_t>() + rows[i] * f.bytes();
    for (int64_t b = f.scales_offset() + 4 * f.tiles(); b < f.bytes(); ++b) EXPECT_EQ(row[b], 0) << "pad byte " << b;
    std::vector<float> back(static_cast<size_t>(f.r + f.rd));
    dequantize_fp8_latent_row(row, f, back.data());
    const float* want = src.f32() + i * (f.r + f.rd);
    for (int64_t t = 0; t < f.tiles(); ++t) {
      float amax = 0;
      for (int j = 0; j < kFp8LatentTile; ++j) amax = std::max(amax, std::fabs(want[t * kFp8LatentTile + j]));
      float scale;
      std::memcpy(&scale, row + f.scales_offset() + 4 * t, 4);
      EXPECT_EQ(scale, exp2_int(fp8_scale_exponent(amax)));
      for (int j = 0; j < kFp8LatentTile; ++j) {
        const int64_t c = t * kFp8LatentTile + j;
        // Half a unit in the last place: 2^-4 relative for normals, 2^-10 · scale absolute below them.
        EXPECT_LE(std::fabs(back[c] - want[c]), std::max(std::fabs(want[c]) / 16, std::ldexp(scale, -10)))
            << "row " << i << " value " << c;
        EXPECT_EQ(back[c], e4m3_to_f32(f32_to_e4m3(want[c] / scale)) * scale);
      }
    }
    for (int64_t j = 0; j < f.rd; ++j) EXPECT_EQ(back[f.r + j], bf16_to_f32(f32_to_bf16(want[f.r + j])));
  }
}

TEST_F(CpuOps, PagedLatentAttentionOverFp8RowsIsAttentionOverTheirValues) {
  const int64_t heads = 4, r = 64, rd = 8, d = r + rd, block = 4, n_rows = 16;
  const Fp8LatentRow f{r, rd};
  Tensor rows = randn({n_rows, d}, rng_);
  std::vector<int32_t> slots(n_rows);
  for (int64_t i = 0; i < n_rows; ++i) slots[i] = static_cast<int32_t>((i * 5) % n_rows);  // shuffled
  Tensor pool8 = Tensor::zeros({n_rows, f.bytes()}, DType::kU8);
  be_->scatter_fp8_latents(rows, r, Tensor::wrap(slots.data(), {n_rows}, DType::kI32), pool8);
  Tensor values = Tensor::zeros({n_rows, d}), exact = Tensor::zeros({n_rows, d});
  for (int64_t i = 0; i < n_rows; ++i) {
    dequantize_fp8_latent_row(pool8.data<uint8_t>() + slots[i] * f.bytes(), f, values.f32() + slots[i] * d);
    std::memcpy(exact.f32() + slots[i] * d, rows.f32() + i * d, sizeof(float) * d);
  }
  std::vector<int32_t> table = {3, 1, 0, 2}, starts = {0, 2}, ctx = {15};
  Tensor q = randn({2, heads, d}, rng_);
  const auto attend = [&](const Tensor& pool, DType out_dtype) {
    Tensor out = Tensor::zeros({2, heads, r}, out_dtype);
    be_->paged_latent_attention(q, pool, static_cast<int>(block), Tensor::wrap(table.data(), {1, 4}, DType::kI32),
                                Tensor::wrap(starts.data(), {2}, DType::kI32),
                                Tensor::wrap(ctx.data(), {1}, DType::kI32), 0.2f, out);
    return out.to_f32();
  };
  const Tensor a = attend(pool8, DType::kF32), b = attend(values, DType::kF32), c = attend(exact, DType::kF32);
  const Tensor a16 = attend(pool8, DType::kBF16);
  double err = 0, norm = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    ASSERT_EQ(a.f32()[i], b.f32()[i]) << i;  // exactly the attention over the dequantised rows
    EXPECT_EQ(a16.f32()[i], bf16_to_f32(f32_to_bf16(a.f32()[i])));
    err += (a.f32()[i] - c.f32()[i]) * (a.f32()[i] - c.f32()[i]);
    norm += c.f32()[i] * c.f32()[i];
  }
  // And near the attention over the rows before quantisation (E4M3 keeps about 4 significant bits).
  EXPECT_LT(std::sqrt(err / norm), 0.05);
  EXPECT_GT(err, 0.0);
}

}  // namespace
}  // namespace r1lab::core
