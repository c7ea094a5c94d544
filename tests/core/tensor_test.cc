#include "core/tensor.h"

#include <cmath>

#include "gtest/gtest.h"

namespace r1lab::core {
namespace {

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f)), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(-2.5f)), -2.5f);
  // 1 + 2^-8 lies exactly between two bf16 values: ties go to the even mantissa (1.0).
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 3.0f / 256)), 1.0f + 4.0f / 256);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

TEST(DType, F16RoundTripsAndHandlesExtremes) {
  for (float v : {0.0f, 1.0f, -1.5f, 65504.0f, 6.103515625e-05f, 5.960464477539063e-08f})
    EXPECT_EQ(f16_to_f32(f32_to_f16(v)), v) << v;
  EXPECT_TRUE(std::isinf(f16_to_f32(f32_to_f16(1e6f))));
  EXPECT_EQ(f16_to_f32(f32_to_f16(1.0f + 1.0f / 4096)), 1.0f);  // below half an ulp
}

TEST(DType, ParsesSafetensorsNames) {
  EXPECT_EQ(*dtype_from_name("BF16"), DType::kBF16);
  EXPECT_FALSE(dtype_from_name("F64").ok());
  EXPECT_EQ(dtype_size(DType::kI64), 8u);
}

TEST(Tensor, SlicesAndViewsShareStorage) {
  Tensor t = Tensor::zeros({3, 4});
  for (int i = 0; i < 12; ++i) t.f32()[i] = static_cast<float>(i);
  Tensor col = t.slice(1, 1, 2);  // [3, 2], row stride 4
  EXPECT_EQ(col.shape(), (Shape{3, 2}));
  EXPECT_EQ(col.stride(0), 4);
  EXPECT_FALSE(col.is_contiguous());
  Tensor c = col.clone();
  EXPECT_EQ(c.f32()[0], 1.0f);
  EXPECT_EQ(c.f32()[3], 6.0f);
  Tensor row = t.select(0, 2);
  EXPECT_EQ(row.f32()[0], 8.0f);
  Tensor e = t.slice(0, 0, 1).expand({5, 4});
  EXPECT_EQ(e.stride(0), 0);
  EXPECT_EQ(e.clone().f32()[4 * 4 + 3], 3.0f);
  Tensor u = t.unsqueeze(1);
  EXPECT_EQ(u.shape(), (Shape{3, 1, 4}));
  t.view({4, 3}).f32()[0] = 42.0f;
  EXPECT_EQ(t.f32()[0], 42.0f);
}

// Copies of strided views: every layout for_each_row meets (a row stride, a zero inner stride, a 0-d
// tensor), in every dtype conversion path.
TEST(Tensor, ClonesAndConvertsStridedViews) {
  Tensor t = Tensor::zeros({2, 3, 4});
  for (int i = 0; i < 24; ++i) t.f32()[i] = static_cast<float>(i);
  const Tensor inner = t.slice(1, 1, 2).slice(2, 1, 2);  // [2, 2, 2]
  const float want[8] = {5, 6, 9, 10, 17, 18, 21, 22};
  const Tensor c = inner.clone(), f = inner.to_f32(), b = inner.to(DType::kBF16).to_f32();
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(c.f32()[i], want[i]) << i;
    EXPECT_EQ(f.f32()[i], want[i]) << i;
    EXPECT_EQ(b.f32()[i], want[i]) << i;
  }
  const Tensor rep = t.slice(2, 3, 1).expand({2, 3, 5});  // inner stride 0
  const Tensor rb = rep.to(DType::kBF16);
  const Tensor r = rb.to_f32(), rc = rep.clone();
  for (int i = 0; i < 30; ++i) {
    EXPECT_EQ(r.f32()[i], static_cast<float>(3 + 4 * (i / 5))) << i;
    EXPECT_EQ(rc.f32()[i], r.f32()[i]) << i;
  }
  const Tensor scalar = t.select(0, 1).select(0, 2).select(0, 3);
  EXPECT_EQ(scalar.clone().f32()[0], 23.0f);
  EXPECT_EQ(scalar.to(DType::kF16).to_f32().f32()[0], 23.0f);
  EXPECT_EQ(Tensor::zeros({0, 3}).clone().numel(), 0);
}

TEST(Tensor, ConvertsBetweenDtypes) {
  Tensor t = Tensor::zeros({4});
  for (int i = 0; i < 4; ++i) t.f32()[i] = 0.5f * i - 1.0f;
  for (DType d : {DType::kBF16, DType::kF16}) {
    Tensor back = t.to(d).to_f32();
    for (int i = 0; i < 4; ++i) EXPECT_EQ(back.f32()[i], t.f32()[i]);
  }
}

}  // namespace
}  // namespace r1lab::core
