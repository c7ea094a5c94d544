// The CUDA kernels against the CPU reference on fresh random inputs (skipped where there is no GPU).
#include <random>

#include "core/backend.h"
#include "core/cuda/cuda.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace r1lab::core {
namespace {

class CudaOps : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    std::string why;
    if (!cuda::available(&why)) GTEST_SKIP() << "CUDA tests skipped: " << why;
  }
  // Host f32 -> device tensor of the parameter dtype.
  Tensor dev(const Tensor& host) {
    Tensor h = host.to(GetParam());
    Tensor d = cuda::zeros(h.shape(), h.dtype());
    cuda::upload(h, d);
    return d;
  }
  Tensor dev_f32(const Tensor& host) {
    Tensor d = cuda::zeros(host.shape());
    cuda::upload(host, d);
    return d;
  }
  // bf16 stores round to 8 bits of mantissa.
  double tol() const { return GetParam() == DType::kBF16 ? 2e-2 : 1e-5; }
  std::unique_ptr<Backend> cpu_ = make_cpu_backend();
  std::mt19937_64 rng_{99};
};

double max_rel(const Tensor& got_dev, const Tensor& want) {
  Tensor g = cuda::download(got_dev).to_f32();
  double md = 0, mr = 0;
  for (int64_t i = 0; i < want.numel(); ++i) {
    md = std::max(md, std::fabs(static_cast<double>(g.f32()[i]) - want.f32()[i]));
    mr = std::max(mr, std::fabs(static_cast<double>(want.f32()[i])));
  }
  return md / std::max(mr, 1e-12);
}

TEST_P(CudaOps, RmsNormMatchesCpu) {
  for (auto [m, d] : {std::pair<int64_t, int64_t>{7, 64}, {33, 1000}, {2, 7168}}) {
    // Inputs rounded to the device dtype first so both sides see the same values.
    Tensor x = testing::randn({m, d}, rng_).to(GetParam()).to_f32(), w = testing::randn({d}, rng_, 0.2f);
    Tensor dy = testing::randn({m, d}, rng_).to(GetParam()).to_f32();
    Tensor y = Tensor::zeros({m, d}), rstd = Tensor::zeros({m}), dx = Tensor::zeros({m, d}), dw = Tensor::zeros({d});
    cpu_->rmsnorm_forward(x, w, 1e-6f, y, rstd);
    cpu_->rmsnorm_backward(dy, x, w, rstd, dx, dw);
    Tensor gx = dev(x), gw = dev_f32(w), gy = cuda::zeros({m, d}, GetParam()), gr = cuda::zeros({m});
    Tensor gdy = dev(dy), gdx = cuda::zeros({m, d}, GetParam()), gdw = cuda::zeros({d});
    cuda::rmsnorm_forward(gx, gw, 1e-6f, gy, gr);
    cuda::rmsnorm_backward(gdy, gx, gw, gr, gdx, gdw);
    EXPECT_LT(max_rel(gy, y), tol()) << m << "x" << d;
    EXPECT_LT(max_rel(gr, rstd), 1e-5);
    EXPECT_LT(max_rel(gdx, dx), tol());
    EXPECT_LT(max_rel(gdw, dw), GetParam() == DType::kBF16 ? 2e-2 : 1e-4);
  }
}

TEST_P(CudaOps, SiluMulMatchesCpu) {
  const int64_t m = 45, inter = 300;
  Tensor gu = testing::randn({m, 2 * inter}, rng_).to(GetParam()).to_f32();
  Tensor dh = testing::randn({m, inter}, rng_).to(GetParam()).to_f32();
  Tensor h = Tensor::zeros({m, inter}), dgu = Tensor::zeros({m, 2 * inter});
  cpu_->silu_mul_forward(gu, h);
  cpu_->silu_mul_backward(dh, gu, dgu);
  Tensor ggu = dev(gu), gh = cuda::zeros({m, inter}, GetParam()), gdh = dev(dh), gdgu = cuda::zeros({m, 2 * inter}, GetParam());
  cuda::silu_mul_forward(ggu, gh);
  cuda::silu_mul_backward(gdh, ggu, gdgu);
  EXPECT_LT(max_rel(gh, h), tol());
  EXPECT_LT(max_rel(gdgu, dgu), tol());
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaOps, ::testing::Values(DType::kF32, DType::kBF16),
                         [](const ::testing::TestParamInfo<DType>& i) { return std::string(dtype_name(i.param)); });

}  // namespace
}  // namespace r1lab::core
