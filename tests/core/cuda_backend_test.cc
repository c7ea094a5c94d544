// Every op of the CUDA backend against the CPU reference on fresh random inputs of several shapes,
// forward and backward; repeated runs bitwise identical; the whole model on the GPU against the CPU and
// against the Hugging Face fixture. Skipped, with the reason, where there is no GPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <numeric>
#include <random>

#include "core/backend.h"
#include "core/cuda/cuda.h"
#include "core/latent_rows.h"
#include "gtest/gtest.h"
#include "model/model.h"
#include "rollout/engine.h"
#include "tests/test_util.h"
#include "trainer/optimizer.h"
#include "trainer/parity.h"
#include "trainer/policy.h"

namespace r1lab::core {
namespace {

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!cuda::available(&why)) GTEST_SKIP() << "CUDA tests skipped: " << why;
    cuda::Options o;
    o.poison_empty = true;  // a read of memory before it is written shows as NaN
    auto be = cuda::make_backend(o);
    ASSERT_TRUE(be.ok()) << be.status();
    gpu_ = std::move(*be);
  }
  // A device copy of a host tensor.
  Tensor dev(const Tensor& host) {
    Tensor c = host.clone();
    Tensor d = gpu_->zeros(c.shape(), c.dtype());
    gpu_->upload(c, d);
    return d;
  }
  Tensor host(const Tensor& d) { return gpu_->download(d).to_f32(); }
  // A second backend whose products run in bf16 (made on first use); hopper false: one whose grouped
  // products keep the mma.sync kernels on a Hopper GPU too; invariant: batch-invariant products (gemm
  // bf16_invariant).
  Backend& bf16(bool hopper = true, bool invariant = false) {
    std::unique_ptr<Backend>& be = invariant ? bf16_invariant_ : hopper ? bf16_ : bf16_sync_;
    if (!be) {
      cuda::Options o;
      o.gemm = cuda::Options::GemmPrecision::kBF16;
      o.poison_empty = true;
      o.hopper_products = hopper;
      o.batch_invariant = invariant;
      auto made = cuda::make_backend(o);
      CHECK(made.ok()) << made.status();
      be = std::move(*made);
    }
    return *be;
  }
  // A device copy on `be` of a contiguous host tensor.
  static Tensor on(Backend& be, const Tensor& host) {
    Tensor d = be.zeros(host.shape(), host.dtype());
    be.upload(host, d);
    return d;
  }
  // Group offsets as the grouped products take them (a host I64 tensor; `on` puts it on a device).
  static Tensor bounds(const std::vector<int64_t>& o) {
    Tensor t = Tensor::zeros({static_cast<int64_t>(o.size())}, DType::kI64);
    std::copy(o.begin(), o.end(), t.data<int64_t>());
    return t;
  }
  Tensor randn(const Shape& s, float scale = 1.0f) { return testing::randn(s, rng_, scale); }
  // A paged decode batch: sequences with ctx[s] positions in the cache, n_new[s] of them new this step,
  // in blocks of `block` positions; tables of max_blocks entries a sequence.
  struct PagedGeometry {
    int block;
    std::vector<int32_t> ctx, n_new;
    int64_t max_blocks;
  };
  // Short contexts with prefill chunks; splits over long contexts; a few long sequences.
  static const std::vector<PagedGeometry>& paged_geometries() {
    static const std::vector<PagedGeometry> g = {
        {4, {12, 18, 1}, {3, 1, 1}, 5}, {16, {300, 70, 1, 129}, {1, 1, 1, 2}, 19}, {64, {4000, 5}, {1, 1}, 63}};
    return g;
  }
  // Its inputs as paged_latent_attention takes them (host tensors): the block tables a scrambled
  // permutation of the pool's blocks; n query rows, a pool of `rows` rows.
  struct PagedBatch {
    int64_t n, rows;
    Tensor tables, starts, lens;
  };
  PagedBatch paged_batch(const PagedGeometry& geo) {
    const int64_t seqs = static_cast<int64_t>(geo.ctx.size()), n_blocks = seqs * geo.max_blocks + 1;
    std::vector<int32_t> perm(n_blocks);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng_);
    PagedBatch b;
    b.tables = Tensor::zeros({seqs, geo.max_blocks}, DType::kI32);
    for (int64_t i = 0; i < seqs * geo.max_blocks; ++i) b.tables.data<int32_t>()[i] = perm[i];
    b.starts = Tensor::zeros({seqs + 1}, DType::kI32);
    b.lens = Tensor::zeros({seqs}, DType::kI32);
    for (int s = 0; s < seqs; ++s) {
      b.starts.data<int32_t>()[s + 1] = b.starts.data<int32_t>()[s] + geo.n_new[s];
      b.lens.data<int32_t>()[s] = geo.ctx[s];
    }
    b.n = b.starts.data<int32_t>()[seqs];
    b.rows = n_blocks * geo.block;
    return b;
  }
  // Random bytes [rows, cols] U8 (an fp8 latent pool's rows before they are written).
  Tensor random_bytes(int64_t rows, int64_t cols) {
    Tensor t = Tensor::zeros({rows, cols}, DType::kU8);
    std::uniform_int_distribution<int> u(0, 255);
    for (int64_t i = 0; i < t.numel(); ++i) t.data<uint8_t>()[i] = static_cast<uint8_t>(u(rng_));
    return t;
  }
  // An fp8 latent pool's rows as their values (f32 [rows, r + rd]; the pool on the host or the device).
  Tensor dequantized(const Tensor& pool, int64_t r, int64_t rd) {
    const Tensor h = pool.device() == Device::kCuda ? gpu_->download(pool) : pool;
    const Fp8LatentRow f{r, rd};
    Tensor out = Tensor::zeros({h.size(0), r + rd});
    for (int64_t i = 0; i < h.size(0); ++i)
      dequantize_fp8_latent_row(h.data<uint8_t>() + i * f.bytes(), f, out.f32() + i * (r + rd));
    return out;
  }
  Tensor ids(const Shape& s, int32_t hi) {
    Tensor t = Tensor::zeros(s, DType::kI32);
    std::uniform_int_distribution<int32_t> u(0, hi - 1);
    for (int64_t i = 0; i < t.numel(); ++i) t.data<int32_t>()[i] = u(rng_);
    return t;
  }

  std::unique_ptr<Backend> cpu_ = make_cpu_backend();
  std::unique_ptr<Backend> gpu_;
  std::unique_ptr<Backend> bf16_, bf16_sync_, bf16_invariant_;
  std::mt19937_64 rng_{20261122};
};

// max |got - want| / max |want| (got may live on the device).
double max_rel(Backend& gpu, const Tensor& got, const Tensor& want) {
  Tensor g = got.device() == Device::kCuda ? gpu.download(got).to_f32() : got.to_f32();
  Tensor w = want.to_f32();
  EXPECT_EQ(g.numel(), w.numel());
  double md = 0, mr = 0;
  for (int64_t i = 0; i < w.numel(); ++i) {
    const double d = std::fabs(static_cast<double>(g.f32()[i]) - w.f32()[i]);
    md = std::isnan(d) ? INFINITY : std::max(md, d);
    mr = std::max(mr, std::fabs(static_cast<double>(w.f32()[i])));
  }
  return md / std::max(mr, 1e-30);
}
// ‖got - want‖₂ / ‖want‖₂.
double rel_l2(Backend& gpu, const Tensor& got, const Tensor& want) {
  Tensor g = got.device() == Device::kCuda ? gpu.download(got).to_f32() : got.to_f32();
  Tensor w = want.to_f32();
  double num = 0, den = 0;
  for (int64_t i = 0; i < w.numel(); ++i) {
    const double d = static_cast<double>(g.f32()[i]) - w.f32()[i];
    num += d * d;
    den += static_cast<double>(w.f32()[i]) * w.f32()[i];
  }
  return std::isnan(num) ? INFINITY : std::sqrt(num / std::max(den, 1e-300));
}
#define EXPECT_CLOSE(got, want, tol) EXPECT_LT(max_rel(*gpu_, got, want), tol) << #got

// A host tensor of NaNs: what an output that is only written starts as.
Tensor nans(const Shape& shape) {
  Tensor t = Tensor::empty(shape);
  std::fill_n(t.f32(), t.numel(), std::numeric_limits<float>::quiet_NaN());
  return t;
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && a.dtype() == b.dtype() &&
         std::memcmp(a.raw(), b.raw(), static_cast<size_t>(a.numel()) * dtype_size(a.dtype())) == 0;
}

// The rope-key gradient's sum over heads: a column slice of [M, H, D] into a column slice of [M, D'].
TEST_F(CudaBackendTest, SumHeadsOfStridedSlices) {
  for (auto [m, h, d] : {std::tuple<int64_t, int64_t, int64_t>{300, 16, 32}, {7, 3, 5}, {1, 1, 8}}) {
    Tensor x = randn({m, h, d + 64}), y = randn({m, d + 256});
    const Tensor y0 = y.clone();
    Tensor gx = dev(x), gy = dev(y);
    Tensor yv = y.slice(1, 256, d).unsqueeze(1), gyv = gy.slice(1, 256, d).unsqueeze(1);
    cpu_->sum_heads(x.slice(2, 64, d), yv);
    gpu_->sum_heads(gx.slice(2, 64, d), gyv);
    const std::string what = std::to_string(m) + "x" + std::to_string(h) + "x" + std::to_string(d);
    EXPECT_TRUE(bitwise_equal(gpu_->download(gy), y)) << what << ": the same adds in the same order";
    double worst = 0;  // the CPU's against the sums in double; the columns outside the slice untouched
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < d + 256; ++c) {
        double want = y0.f32()[i * (d + 256) + c];
        if (c >= 256)
          for (int64_t k = 0; k < h; ++k) want += x.f32()[(i * h + k) * (d + 64) + 64 + c - 256];
        worst = std::max(worst, std::fabs(want - y.f32()[i * (d + 256) + c]));
      }
    EXPECT_LT(worst, 1e-4) << what;
  }
}

TEST_F(CudaBackendTest, MemoryOpsOnStridedViews) {
  Tensor a = randn({3, 5, 7, 9}), b = randn({3, 5, 7, 9});
  Tensor ga = dev(a), gb = dev(b);
  EXPECT_TRUE(bitwise_equal(gpu_->download(ga), a));
  // copy and add between strided slices, a broadcast source.
  Tensor src = a.slice(1, 1, 3).slice(3, 2, 5), dst = b.slice(2, 0, 7).slice(1, 2, 3).slice(3, 4, 5);
  Tensor gsrc = ga.slice(1, 1, 3).slice(3, 2, 5), gdst = gb.slice(2, 0, 7).slice(1, 2, 3).slice(3, 4, 5);
  cpu_->copy(src, dst);
  gpu_->copy(gsrc, gdst);
  EXPECT_TRUE(bitwise_equal(gpu_->download(gb), b));
  Tensor row = a.slice(1, 0, 1), grow = ga.slice(1, 0, 1);
  Tensor y = b.slice(1, 1, 4), gy = gb.slice(1, 1, 4);
  cpu_->add(row.expand({3, 4, 7, 9}), y, -0.5f);
  gpu_->add(grow.expand({3, 4, 7, 9}), gy, -0.5f);
  EXPECT_CLOSE(gb, b, 1e-7);
  // The same where groups of 4 elements line up (4 at a time): f32 copies, f32 -> bf16 and bf16 copies,
  // and an add from a broadcast.
  Tensor c = randn({3, 5, 6, 16}), d = randn({3, 5, 6, 16});
  Tensor gc = dev(c), gd = dev(d);
  auto cut = [](const Tensor& t, int64_t at) { return t.slice(1, at, 3).slice(3, 4 * at, 8); };
  Tensor dcut = cut(d, 2), gdcut = cut(gd, 2);
  cpu_->copy(cut(c, 1), dcut);
  gpu_->copy(cut(gc, 1), gdcut);
  EXPECT_TRUE(bitwise_equal(gpu_->download(gd), d));
  Tensor h16 = Tensor::zeros({3, 5, 6, 16}, DType::kBF16), g16 = gpu_->zeros({3, 5, 6, 16}, DType::kBF16);
  Tensor hcut = cut(h16, 1), gcut = cut(g16, 1);
  cpu_->copy(cut(c, 2), hcut);
  gpu_->copy(cut(gc, 2), gcut);
  EXPECT_TRUE(bitwise_equal(gpu_->download(g16), h16));
  Tensor h16b = Tensor::zeros({3, 5, 6, 16}, DType::kBF16), g16b = gpu_->zeros({3, 5, 6, 16}, DType::kBF16);
  Tensor hcut2 = cut(h16b, 2), gcut2 = cut(g16b, 2);
  cpu_->copy(cut(h16, 1), hcut2);
  gpu_->copy(cut(g16, 1), gcut2);
  EXPECT_TRUE(bitwise_equal(gpu_->download(g16b), h16b));
  Tensor lead = c.slice(1, 0, 1).slice(3, 4, 8), glead = gc.slice(1, 0, 1).slice(3, 4, 8);
  Tensor dsum = cut(d, 1), gdsum = cut(gd, 1);
  cpu_->add(lead.expand({3, 3, 6, 8}), dsum, 0.75f);
  gpu_->add(glead.expand({3, 3, 6, 8}), gdsum, 0.75f);
  EXPECT_CLOSE(gd, d, 1e-7);
  Tensor f = Tensor::zeros({1000}), gf = gpu_->zeros({1000}, DType::kF32);
  cpu_->fill(f, 2.5f);
  gpu_->fill(gf, 2.5f);
  EXPECT_TRUE(bitwise_equal(gpu_->download(gf), f));
}

TEST_F(CudaBackendTest, GemmAllTransposesStridedAndScaled) {
  for (auto [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {7, 13, 5}, {64, 96, 200}, {130, 33, 257}}) {
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      // Operands as column slices of wider matrices (row stride > columns).
      Tensor a = randn({ta ? k : m, (ta ? m : k) + 3}).slice(1, 2, ta ? m : k);
      Tensor b = randn({tb ? n : k, (tb ? k : n) + 5}).slice(1, 1, tb ? k : n);
      Tensor c = randn({m, n});
      Tensor ga = dev(a.clone()), gb = dev(b.clone()), gc = dev(c);
      // device strided views of the same data
      Tensor wa = randn({ta ? k : m, (ta ? m : k) + 3}), gwa = dev(wa);
      Tensor va = wa.slice(1, 2, ta ? m : k), gva = gwa.slice(1, 2, ta ? m : k);
      cpu_->gemm(va, ta, b, tb, c, 0.75f, 0.5f);
      gpu_->gemm(gva, ta, gb, tb, gc, 0.75f, 0.5f);
      EXPECT_CLOSE(gc, c, 1e-5) << m << "x" << n << "x" << k << " ta " << ta << " tb " << tb;
    }
  }
}

TEST_F(CudaBackendTest, GemmTensorCorePrecisions) {
  for (auto p : {cuda::Options::GemmPrecision::kTF32, cuda::Options::GemmPrecision::kBF16}) {
    cuda::Options o;
    o.gemm = p;
    auto be = cuda::make_backend(o);
    ASSERT_TRUE(be.ok());
    Tensor a = randn({256, 512}), b = randn({384, 512}), c = Tensor::zeros({256, 384});
    cpu_->gemm(a, false, b, true, c, 1.0f, 0.0f);
    Tensor ga = (*be)->zeros(a.shape(), DType::kF32), gb = (*be)->zeros(b.shape(), DType::kF32),
           gc = (*be)->zeros(c.shape(), DType::kF32);
    (*be)->upload(a, ga);
    (*be)->upload(b, gb);
    (*be)->gemm(ga, false, gb, true, gc, 1.0f, 0.0f);
    const double err = max_rel(**be, gc, c);
    EXPECT_LT(err, 2e-2) << (*be)->name();
    EXPECT_GT(err, 1e-7) << "expected reduced-precision products from " << (*be)->name();
    // Into bf16 (beta 0): the f32 result rounded once, so within half a bf16 step of the f32 result
    // (cuBLAS may sum in another order for another output type).
    Tensor g16 = (*be)->zeros(c.shape(), DType::kBF16);
    (*be)->gemm(ga, false, gb, true, g16, 1.0f, 0.0f);
    const Tensor got = (*be)->download(g16).to_f32(), f32 = (*be)->download(gc);
    for (int64_t i = 0; i < got.numel(); ++i)
      ASSERT_LE(std::fabs(got.f32()[i] - f32.f32()[i]), std::fabs(f32.f32()[i]) * (1.0f / 256) + 1e-6f) << i;
  }
}

TEST_F(CudaBackendTest, GroupedGemmAndWeightGradient) {
  const int64_t g = 5, n = 48, k = 40;
  const std::vector<int64_t> offsets = {0, 7, 7, 30, 31, 64};  // group 1 empty
  const int64_t r = offsets.back();
  for (bool trans : {true, false}) {
    Tensor a = randn({r, k}), w = randn(trans ? Shape{g, n, k} : Shape{g, k, n}), c = randn({r, n});
    Tensor gc = dev(c);
    cpu_->grouped_gemm(a, w, trans, bounds(offsets), c, 0.5f);
    gpu_->grouped_gemm(dev(a), dev(w), trans, dev(bounds(offsets)), gc, 0.5f);
    EXPECT_CLOSE(gc, c, 1e-5) << "trans " << trans;
  }
  Tensor dc = randn({r, n}), a = randn({r, k}), dw = randn({g, n, k});
  Tensor gdw = dev(dw);
  cpu_->grouped_gemm_wgrad(dc, a, bounds(offsets), dw);
  gpu_->grouped_gemm_wgrad(dev(dc), dev(a), dev(bounds(offsets)), gdw);
  EXPECT_CLOSE(gdw, dw, 1e-5);
  // beta 0 overwrites: NaN is not read, the empty group gets zeros.
  Tensor dw0 = Tensor::zeros({g, n, k}), gdw0 = gpu_->zeros({g, n, k}, DType::kF32);
  gpu_->fill(gdw0, NAN);
  cpu_->grouped_gemm_wgrad(dc, a, bounds(offsets), dw0, 0.0f);
  gpu_->grouped_gemm_wgrad(dev(dc), dev(a), dev(bounds(offsets)), gdw0, 0.0f);
  EXPECT_CLOSE(gdw0, dw0, 1e-5);
}

// bf16 products round the f32 operands into bf16 copies first (gemm.cu); grouped products run on the
// tensor-core kernel (widths a multiple of 4) or cuBLAS (odd widths): odd widths (the scalar rounding
// path), strided views, transposes, beta, empty groups, several tiles each way.
TEST_F(CudaBackendTest, Bf16ProductsOnStridedAndGroupedOperands) {
  Backend* be = &bf16();  // the backend under test (up and check use it)
  auto up = [&](const Tensor& t) { return on(*be, t); };
  auto check = [&](const Tensor& got, const Tensor& want, const std::string& what) {
    const double err = max_rel(*be, got, want);
    EXPECT_LT(err, 2e-2) << what;
    EXPECT_GT(err, 1e-7) << what << ": expected reduced-precision products";
  };
  for (int64_t k : {37, 64}) {
    Tensor wide = randn({45, k + 3}), b = randn({k, 29}), c = randn({45, 29});
    Tensor gwide = up(wide), gc = up(c);
    cpu_->gemm(wide.slice(1, 0, k), false, b, false, c, 0.7f, 0.5f);
    be->gemm(gwide.slice(1, 0, k), false, up(b), false, gc, 0.7f, 0.5f);
    check(gc, c, "gemm k " + std::to_string(k));
    Tensor at = randn({k, 45}), bt = randn({29, k}), c2 = Tensor::zeros({45, 29});
    Tensor gc2 = up(c2);
    cpu_->gemm(at, true, bt, true, c2, 1.0f, 0.0f);
    be->gemm(up(at), true, up(bt), true, gc2, 1.0f, 0.0f);
    check(gc2, c2, "gemm transposed k " + std::to_string(k));
  }
  const int64_t g = 6;
  // Groups 1 and 5 empty; the second set's groups span several 128-row tiles, and n = 520 several in the
  // weight gradient. Both kinds of grouped kernel on a Hopper GPU (warpgroup products and mma.sync).
  for (bool hopper : {true, false})
    for (const std::vector<int64_t>& offsets : {std::vector<int64_t>{0, 70, 70, 300, 301, 512, 512},
                                                std::vector<int64_t>{0, 600, 600, 1900, 1901, 3100, 3100}}) {
      be = &bf16(hopper);
      const int64_t r = offsets.back();
      // n = 37 with k-contiguous weights: the warpgroup kernels' unstaged epilogue (rows not whole chunks).
      for (auto [n, k] : {std::pair<int64_t, int64_t>{48, 40}, {200, 264}, {30, 37}, {520, 72}, {37, 40}}) {
        const std::string shape = " n " + std::to_string(n) + " k " + std::to_string(k) + " rows " + std::to_string(r) +
                                  (hopper ? "" : " (mma.sync)");
        for (bool trans : {true, false}) {
          Tensor wide = randn({r, k + 8}), w = randn(trans ? Shape{g, n, k} : Shape{g, k, n}), c = randn({r, n});
          Tensor gwide = up(wide), gc = up(c);
          cpu_->grouped_gemm(wide.slice(1, 0, k), w, trans, bounds(offsets), c, 0.5f);
          be->grouped_gemm(gwide.slice(1, 0, k), up(w), trans, up(bounds(offsets)), gc, 0.5f);
          check(gc, c, (trans ? "grouped, trans_w" : "grouped") + shape);
        }
        Tensor dc = randn({r, n}), a = randn({r, k}), dw = randn({g, n, k});
        Tensor gdw = up(dw);
        cpu_->grouped_gemm_wgrad(dc, a, bounds(offsets), dw);
        be->grouped_gemm_wgrad(up(dc), up(a), up(bounds(offsets)), gdw);
        check(gdw, dw, "grouped weight gradient" + shape);
        // Overwritten (beta 0): NaN is not read, empty groups get zeros.
        Tensor dw0 = Tensor::zeros({g, n, k}), gdw0 = be->zeros({g, n, k}, DType::kF32);
        be->fill(gdw0, NAN);
        cpu_->grouped_gemm_wgrad(dc, a, bounds(offsets), dw0, 0.0f);
        be->grouped_gemm_wgrad(up(dc), up(a), up(bounds(offsets)), gdw0, 0.0f);
        check(gdw0, dw0, "grouped weight gradient, beta 0" + shape);
      }
    }
}

// Batched products on transposed, strided views, in f32 against the CPU, and with bf16 weights: the same
// numbers as the bf16 products make from f32 weights.
TEST_F(CudaBackendTest, GemmBatchedAndBf16WeightOperands) {
  const int64_t heads = 16, k = 64, r = 256;
  for (int64_t m : {1, 37, 256}) {
    Tensor q = randn({m, heads, k + 32}), w = randn({heads, k + 64, r}), out = randn({m, heads, r});
    Tensor qv = q.slice(2, 0, k).transpose(0, 1), wv = w.slice(1, 0, k), ov = out.transpose(0, 1);
    Tensor gq = dev(q), gw = dev(w), gout = dev(out);
    Tensor gov = gout.transpose(0, 1);
    cpu_->gemm_batched(qv, false, wv, false, ov, 1.0f, 0.5f);
    gpu_->gemm_batched(gq.slice(2, 0, k).transpose(0, 1), false, gw.slice(1, 0, k), false, gov, 1.0f, 0.5f);
    EXPECT_CLOSE(gout, out, 1e-5) << "m " << m;
    // Transposed second operand (the un-absorption): out[h] = o[h] · w[h, k:, :]ᵀ.
    Tensor o = randn({m, heads, r}), y = Tensor::zeros({m, heads, 64});
    Tensor yv = y.transpose(0, 1), gy = dev(y);
    Tensor gyv = gy.transpose(0, 1);
    cpu_->gemm_batched(o.transpose(0, 1), false, w.slice(1, k, 64), true, yv);
    gpu_->gemm_batched(dev(o).transpose(0, 1), false, gw.slice(1, k, 64), true, gyv);
    EXPECT_CLOSE(gy, y, 1e-5) << "m " << m << " trans_b";
  }
  Backend& be = bf16();
  EXPECT_EQ(be.weight_dtype(), DType::kBF16);
  EXPECT_EQ(gpu_->weight_dtype(), DType::kF32);
  auto up = [&](const Tensor& t) { return on(be, t); };
  auto to_bf16 = [&](const Tensor& d) {
    Tensor h = be.zeros(d.shape(), DType::kBF16);
    be.copy(d, h);
    return h;
  };
  // copy rounds like the host conversion.
  Tensor x = randn({1000});
  const Tensor xb = be.download(to_bf16(up(x)));
  for (int64_t i = 0; i < 1000; ++i) ASSERT_EQ(xb.data<uint16_t>()[i], f32_to_bf16(x.f32()[i])) << i;
  Tensor a = randn({45, 96}), w = randn({80, 96}), ga = up(a), gw = up(w);
  Tensor c1 = be.zeros({45, 80}, DType::kF32), c2 = be.zeros({45, 80}, DType::kF32);
  be.gemm(ga, false, gw, true, c1);
  be.gemm(ga, false, to_bf16(gw), true, c2);
  EXPECT_TRUE(bitwise_equal(be.download(c1), be.download(c2))) << "gemm with a bf16 weight";
  // Groups large enough for the tensor-core kernel (few rows a group take the weight-streaming kernel,
  // tested apart), which rounds f32 weights as it loads them.
  const Tensor offsets = up(bounds({0, 100, 100, 300}));
  Tensor ea = randn({300, 96}), ew = randn({3, 80, 96}), gea = up(ea), gew = up(ew);
  Tensor e1 = be.zeros({300, 80}, DType::kF32), e2 = be.zeros({300, 80}, DType::kF32);
  be.grouped_gemm(gea, gew, true, offsets, e1);
  be.grouped_gemm(gea, to_bf16(gew), true, offsets, e2);
  EXPECT_TRUE(bitwise_equal(be.download(e1), be.download(e2))) << "grouped_gemm with bf16 weights";
  Tensor bq = randn({45, 4, 24}), bw = randn({4, 24, 80}), gbq = up(bq), gbw = up(bw);
  Tensor b1 = be.zeros({4, 45, 80}, DType::kF32), b2 = be.zeros({4, 45, 80}, DType::kF32);
  be.gemm_batched(gbq.transpose(0, 1), false, gbw, false, b1);
  be.gemm_batched(gbq.transpose(0, 1), false, to_bf16(gbw), false, b2);
  EXPECT_TRUE(bitwise_equal(be.download(b1), be.download(b2))) << "gemm_batched with bf16 weights";
  Tensor want = Tensor::zeros({4, 45, 80});
  cpu_->gemm_batched(bq.transpose(0, 1), false, bw, false, want);
  EXPECT_LT(max_rel(be, b2, want), 2e-2);
  // A bf16 result (one only bf16 products read): the f32 one rounded once, within a last-bit difference.
  Tensor b3 = be.zeros({4, 45, 80}, DType::kBF16);
  be.gemm_batched(gbq.transpose(0, 1), false, to_bf16(gbw), false, b3);
  EXPECT_LT(max_rel(be, b3, be.download(b1)), 8e-3);
  Tensor cb = Tensor::zeros({4, 45, 80}, DType::kBF16);
  cpu_->gemm_batched(bq.transpose(0, 1), false, bw, false, cb);
  EXPECT_TRUE(bitwise_equal(cb, want.to(DType::kBF16)));
}

// Batched bf16 products as a decode step makes them (the absorbed attention: 16 heads of up to a few
// hundred rows): within bf16 tolerance of the CPU, with beta, either orientation of the second operand,
// f32 and bf16 results (c not read where beta is 0).
TEST_F(CudaBackendTest, Bf16BatchedProductsAgainstTheCpu) {
  Backend& be = bf16();
  auto up = [&](const Tensor& t) { return on(be, t); };
  const int64_t heads = 16, k = 64, r = 256;
  for (int64_t m : {1, 37, 256, 300}) {
    const std::string what = "m " + std::to_string(m);
    Tensor q = randn({m, heads, k + 32}), w = randn({heads, k + 64, r}), out = randn({m, heads, r});
    Tensor gw = be.zeros(w.shape(), DType::kBF16);
    be.copy(up(w), gw);
    Tensor gout = up(out), gov = gout.transpose(0, 1);
    Tensor ov = out.transpose(0, 1);
    cpu_->gemm_batched(q.slice(2, 0, k).transpose(0, 1), false, w.slice(1, 0, k), false, ov, 0.5f, 0.25f);
    be.gemm_batched(up(q).slice(2, 0, k).transpose(0, 1), false, gw.slice(1, 0, k), false, gov, 0.5f, 0.25f);
    EXPECT_LT(max_rel(be, gout, out), 2e-2) << what;
    // The un-absorption: y[h] = o[h] · w[h, k:, :]ᵀ into a bf16 result (rounded once), c never read.
    Tensor o = randn({m, heads, r}), y = Tensor::zeros({m, heads, 64});
    Tensor gy = be.zeros({m, heads, 64}, DType::kBF16), gy32 = be.zeros({m, heads, 64}, DType::kF32);
    be.fill(gy32, NAN);
    Tensor yv = y.transpose(0, 1);
    cpu_->gemm_batched(o.transpose(0, 1), false, w.slice(1, k, 64), true, yv);
    Tensor gyv = gy.transpose(0, 1), gy32v = gy32.transpose(0, 1);
    be.gemm_batched(up(o).transpose(0, 1), false, gw.slice(1, k, 64), true, gyv);
    be.gemm_batched(up(o).transpose(0, 1), false, gw.slice(1, k, 64), true, gy32v);
    EXPECT_LT(max_rel(be, gy32, y), 2e-2) << what << " trans_b";
    EXPECT_LT(max_rel(be, gy, be.download(gy32)), 8e-3) << what << " trans_b, bf16";
  }
}

// Few rows a group (MoE decode) take the weight-streaming kernel, more the tensor-core one: the exact
// sums of the bf16-rounded operands, whatever k, with empty groups and beta.
TEST_F(CudaBackendTest, GroupedGemmFewRowsAGroupWithBf16Weights) {
  Backend& be = bf16();
  for (int64_t k : {64, 264, 1024}) {
    const int64_t g = 24, n = 200;
    // Rows a group, the rest of the 24 groups empty: up to 2 a group on average, 16 the most (16 rows at
    // a time); up to 4 on average, 32 the most; 77 in one group (in chunks of 32); then on tensor cores,
    // tiles cut by the group bounds: 10 a group on average (32-row tiles), 58 (64-row tiles), 75 (128).
    for (const std::vector<int64_t>& sizes :
         {std::vector<int64_t>{1, 0, 16, 8, 0, 15}, {32, 0, 1, 27, 0, 30}, {3, 0, 77, 10, 0, 6},
          {40, 0, 121, 33, 0, 46}, {300, 0, 517, 190, 0, 393}, {130, 0, 270, 1, 0, 1399}}) {
      std::vector<int64_t> offsets = {0};
      for (int64_t i = 0; i < g; ++i) offsets.push_back(offsets.back() + (i < 6 ? sizes[i] : 0));
      const int64_t r = offsets.back();
      Tensor wide = randn({r, k + 8}), w = randn({g, n, k}), c = randn({r, n});
      Tensor a = wide.slice(1, 0, k);
      Tensor gwide = on(be, wide), gw = on(be, w), gc = on(be, c), wb = be.zeros(w.shape(), DType::kBF16);
      be.copy(gw, wb);
      Tensor gc0 = be.zeros(c.shape(), DType::kF32);
      be.copy(gc, gc0);
      be.grouped_gemm(gwide.slice(1, 0, k), wb, true, on(be, bounds(offsets)), gc, 0.5f);
      const Tensor got = be.download(gc);
      // bf16 rows (as a norm or the gate writes them for bf16 products) give the same bits: the f32
      // ones are rounded the same way first.
      Tensor ab = be.zeros({r, k}, DType::kBF16);
      be.copy(gwide.slice(1, 0, k), ab);
      be.grouped_gemm(ab, wb, true, on(be, bounds(offsets)), gc0, 0.5f);
      EXPECT_TRUE(bitwise_equal(be.download(gc0), got)) << "bf16 rows, k " << k << ", rows " << r;
      // Into bf16 (beta 0): the f32 sums rounded once, on whichever path the sizes take.
      Tensor c32 = be.zeros(c.shape(), DType::kF32), c16 = be.zeros(c.shape(), DType::kBF16);
      be.grouped_gemm(ab, wb, true, on(be, bounds(offsets)), c32);
      be.grouped_gemm(ab, wb, true, on(be, bounds(offsets)), c16);
      EXPECT_TRUE(bitwise_equal(be.download(c16), be.download(c32).to(DType::kBF16)))
          << "bf16 out, k " << k << ", rows " << r;
      if (k % 8 == 0 && n % 8 == 0) {  // and the weight gradient over bf16 rows
        Tensor dc = randn({r, n}), gdc = on(be, dc);
        Tensor dw1 = be.zeros(w.shape(), DType::kF32), dw2 = be.zeros(w.shape(), DType::kF32);
        be.grouped_gemm_wgrad(gdc, gwide.slice(1, 0, k), on(be, bounds(offsets)), dw1);
        be.grouped_gemm_wgrad(gdc, ab, on(be, bounds(offsets)), dw2);
        EXPECT_TRUE(bitwise_equal(be.download(dw1), be.download(dw2))) << "wgrad over bf16 rows, k " << k;
        // and over a bf16 gradient (rounded once by its producer)
        Tensor dcb = be.zeros({r, n}, DType::kBF16), dw3 = be.zeros(w.shape(), DType::kF32);
        be.copy(gdc, dcb);
        be.grouped_gemm_wgrad(dcb, ab, on(be, bounds(offsets)), dw3);
        EXPECT_TRUE(bitwise_equal(be.download(dw1), be.download(dw3))) << "wgrad of a bf16 gradient, k " << k;
        // and over rows read by index (the experts' tokens where they lie): those rows in order
        if (r > 0) {
          Tensor index = Tensor::zeros({r}, DType::kI32);
          for (int64_t i = 0; i < r; ++i) index.data<int32_t>()[i] = static_cast<int32_t>((i * 7 + 3) % r);
          const Tensor gi = on(be, index);
          Tensor in_order = be.empty({r, k}, DType::kBF16), dw4 = be.zeros(w.shape(), DType::kF32),
                 dw5 = be.zeros(w.shape(), DType::kF32);
          be.gather_rows(ab, gi, in_order);
          be.grouped_gemm_wgrad(dcb, in_order, on(be, bounds(offsets)), dw4, 0.0f);
          be.grouped_gemm_wgrad(dcb, ab, on(be, bounds(offsets)), dw5, 0.0f, &gi);
          EXPECT_TRUE(bitwise_equal(be.download(dw4), be.download(dw5))) << "wgrad over rows by index, k " << k;
        }
      }
      double worst = 0, scale = 0;
      for (int64_t gi = 0; gi < g; ++gi)
        for (int64_t row = offsets[gi]; row < offsets[gi + 1]; ++row)
          for (int64_t j = 0; j < n; ++j) {
            double s = 0;
            for (int64_t p = 0; p < k; ++p)
              s += static_cast<double>(bf16_to_f32(f32_to_bf16(a.f32()[row * (k + 8) + p]))) *
                   bf16_to_f32(f32_to_bf16(w.f32()[(gi * n + j) * k + p]));
            const double want = s + 0.5 * c.f32()[row * n + j];
            worst = std::max(worst, std::fabs(got.f32()[row * n + j] - want));
            scale = std::max(scale, std::fabs(want));
          }
      EXPECT_LT(worst / scale, 1e-5) << "k " << k << ", rows " << offsets.back();
    }
  }
}

// The gated grouped product: the same bits as grouped_gemm then silu_mul_forward into bf16, for row
// tiles of 32, 64 and 128, groups of few rows (the weight-streaming kernel), column tiles cut by n, a
// strided bf16 output; the fused kernel leaves rows outside every group alone.
TEST_F(CudaBackendTest, GroupedGateUpIsGroupedGemmThenSiluMul) {
  for (bool hopper : {true, false}) {
    Backend& be = bf16(hopper);
    for (int64_t k : {64, 264}) {
      for (int64_t n : {96, 256, 100}) {  // 100: outputs not whole 16-byte chunks a row (unstaged)
        const int64_t g = 8;
        for (const std::vector<int64_t>& sizes : {std::vector<int64_t>{1, 0, 3, 2, 0, 4, 1, 0},
                                                  {12, 0, 30, 3, 21, 9, 0, 40},
                                                  {40, 0, 121, 33, 0, 46, 64, 2},
                                                  {300, 0, 517, 190, 0, 393, 5, 77},
                                                  {700, 0, 1300, 520, 900, 611, 3, 1100}}) {
          std::vector<int64_t> offsets = {0};
          for (int64_t i = 0; i < g; ++i) offsets.push_back(offsets.back() + sizes[static_cast<size_t>(i)]);
          const int64_t r = offsets.back() + 3;  // three rows past the last group
          Tensor gx = be.zeros({r, k}, DType::kBF16), gw = be.zeros({g, 2 * n, k}, DType::kBF16);
          be.copy(on(be, randn({r, k})), gx);
          be.copy(on(be, randn({g, 2 * n, k}, 0.2f)), gw);
          const Tensor off = on(be, bounds(offsets));
          Tensor gu = be.zeros({r, 2 * n}, DType::kF32), want = be.zeros({r, n}, DType::kBF16);
          be.grouped_gemm(gx, gw, true, off, gu);
          be.silu_mul_forward(gu, want);
          Tensor sevens = be.zeros({r, n + 8}, DType::kF32), wide = be.zeros({r, n + 8}, DType::kBF16);
          be.fill(sevens, 7.0f);
          be.copy(sevens, wide);
          Tensor got = wide.slice(1, 0, n);
          be.grouped_gate_up(gx, gw, off, got);
          const Tensor w_host = be.download(want).to_f32(), g_host = be.download(got).to_f32();
          const int64_t in = offsets.back() * n;
          EXPECT_EQ(std::memcmp(w_host.f32(), g_host.f32(), static_cast<size_t>(in) * sizeof(float)), 0)
              << "k " << k << ", n " << n << ", rows " << offsets.back();
          const Tensor all = be.download(wide).to_f32();
          if (r > 4 * g) {  // the fused kernel (fewer rows run as the reference composition, which writes all)
            for (int64_t row = offsets.back(); row < r; ++row)
              for (int64_t j = 0; j < n + 8; ++j) ASSERT_EQ(all.f32()[row * (n + 8) + j], 7.0f) << "row " << row;
          }
          for (int64_t row = 0; row < offsets.back(); ++row)
            for (int64_t j = n; j < n + 8; ++j) ASSERT_EQ(all.f32()[row * (n + 8) + j], 7.0f) << "pad of row " << row;
          // With the products kept for backward (bf16, a strided view): the f32 products rounded once,
          // and h as silu_mul_forward makes it from them (what a backward that remakes h gets).
          Tensor gu_wide = be.zeros({r, 2 * n + 8}, DType::kBF16), kept = gu_wide.slice(1, 0, 2 * n);
          Tensor got2 = be.zeros({r, n}, DType::kBF16);
          be.grouped_gate_up(gx, gw, off, got2, &kept);
          Tensor gu16 = be.zeros({r, 2 * n}, DType::kBF16), want2 = be.zeros({r, n}, DType::kBF16);
          be.copy(gu, gu16);
          be.silu_mul_forward(gu16, want2);
          const Tensor h2 = be.download(got2).to_f32(), w2 = be.download(want2).to_f32();
          EXPECT_EQ(std::memcmp(w2.f32(), h2.f32(), static_cast<size_t>(in) * sizeof(float)), 0)
              << "h with the products kept, k " << k << ", n " << n;
          const Tensor want_gu = be.download(gu).to(DType::kBF16), got_gu = be.download(gu_wide);
          for (int64_t row = 0; row < offsets.back(); ++row)
            ASSERT_EQ(std::memcmp(want_gu.data<uint16_t>() + row * 2 * n, got_gu.data<uint16_t>() + row * (2 * n + 8),
                                  static_cast<size_t>(2 * n) * 2),
                      0)
                << "kept products of row " << row << ", k " << k << ", n " << n << ", rows " << offsets.back()
                << (hopper ? "" : " (mma.sync)");
          // gx's rows read by index from a source of other rows (the experts' tokens where they lie, some
          // read by several): the same bits as from gx.
          const int64_t rs = r / 2 + 5;
          Tensor index = Tensor::zeros({r}, DType::kI32), src_rows = be.zeros({rs, k}, DType::kBF16);
          for (int64_t i = 0; i < r; ++i) index.data<int32_t>()[i] = static_cast<int32_t>((i * 11 + 1) % rs);
          be.copy(on(be, randn({rs, k})), src_rows);
          const Tensor gi = on(be, index);
          be.gather_rows(src_rows, gi, gx);
          Tensor h_order = be.zeros({r, n}, DType::kBF16), h_index = be.zeros({r, n}, DType::kBF16);
          Tensor gu_order = be.zeros({r, 2 * n}, DType::kBF16), gu_index = be.zeros({r, 2 * n}, DType::kBF16);
          be.grouped_gate_up(gx, gw, off, h_order, &gu_order);
          be.grouped_gate_up(src_rows, gw, off, h_index, &gu_index, &gi);
          const Tensor ho = be.download(h_order), hi = be.download(h_index);
          const Tensor go = be.download(gu_order), gq = be.download(gu_index);
          EXPECT_EQ(std::memcmp(ho.raw(), hi.raw(), static_cast<size_t>(in) * 2), 0)
              << "rows by index, k " << k << ", n " << n << ", rows " << offsets.back();
          EXPECT_EQ(std::memcmp(go.raw(), gq.raw(), static_cast<size_t>(in) * 4), 0)
              << "kept products, rows by index, k " << k << ", n " << n << ", rows " << offsets.back();
          be.grouped_gate_up(gx, gw, off, h_order);  // h from the f32 sums, without products kept
          be.grouped_gate_up(src_rows, gw, off, h_index, nullptr, &gi);
          EXPECT_EQ(std::memcmp(be.download(h_order).raw(), be.download(h_index).raw(), static_cast<size_t>(in) * 2), 0)
              << "rows by index, no products kept, k " << k << ", n " << n;
        }
      }
    }
  }
}

// The experts' down data gradient ending in the gate's backward: the same bits as grouped_gemm into bf16
// then silu_mul_backward, for groups long enough for the fused kernel's 128- and 64-row tiles and short
// ones (the composition), column tiles cut by n, strided gate_up and dgu (their padding left alone); and
// within bf16 rounding of the CPU reference from the same values.
TEST_F(CudaBackendTest, GroupedSiluBackwardIsGroupedGemmThenSiluBackward) {
  for (bool hopper : {true, false}) {
    Backend& be = bf16(hopper);
    for (int64_t k : {64, 264}) {
      for (int64_t n : {96, 256, 100}) {  // 100: rows not whole 16-byte chunks (the composition)
        const int64_t g = 8;
        for (const std::vector<int64_t>& sizes : {std::vector<int64_t>{12, 0, 30, 3, 21, 9, 0, 40},
                                                  {40, 0, 121, 33, 0, 46, 64, 2},
                                                  {700, 0, 1300, 520, 900, 611, 3, 1100}}) {
          std::vector<int64_t> offsets = {0};
          for (int64_t i = 0; i < g; ++i) offsets.push_back(offsets.back() + sizes[static_cast<size_t>(i)]);
          const int64_t r = offsets.back();
          const Tensor dc_h = randn({r, k}).to(DType::kBF16), w_h = randn({g, k, n}, 0.2f).to(DType::kBF16);
          const Tensor gu_h = randn({r, 2 * n}, 2.0f).to(DType::kBF16);
          Tensor dc = be.zeros({r, k}, DType::kBF16), w = be.zeros({g, k, n}, DType::kBF16);
          be.copy(on(be, dc_h), dc);
          be.copy(on(be, w_h), w);
          Tensor gu_wide = be.zeros({r, 2 * n + 8}, DType::kBF16), gu = gu_wide.slice(1, 0, 2 * n);
          be.copy(on(be, gu_h), gu);
          const Tensor off = on(be, bounds(offsets));
          Tensor dh = be.zeros({r, n}, DType::kBF16), want = be.zeros({r, 2 * n}, DType::kBF16);
          be.grouped_gemm(dc, w, false, off, dh);
          be.silu_mul_backward(dh, gu, want);
          Tensor sevens = be.zeros({r, 2 * n + 8}, DType::kF32), wide = be.zeros({r, 2 * n + 8}, DType::kBF16);
          be.fill(sevens, 7.0f);
          be.copy(sevens, wide);
          Tensor got = wide.slice(1, 0, 2 * n);
          be.grouped_silu_backward(dc, w, off, gu, got);
          const Tensor want_h = be.download(want), got_h = be.download(wide), got_f32 = got_h.to_f32();
          const std::string what = "k " + std::to_string(k) + ", n " + std::to_string(n) + ", rows " +
                                   std::to_string(r) + (hopper ? "" : " (mma.sync)");
          for (int64_t row = 0; row < r; ++row) {
            ASSERT_EQ(std::memcmp(want_h.data<uint16_t>() + row * 2 * n, got_h.data<uint16_t>() + row * (2 * n + 8),
                                  static_cast<size_t>(2 * n) * 2),
                      0)
                << "row " << row << ", " << what;
            for (int64_t j = 2 * n; j < 2 * n + 8; ++j)
              ASSERT_EQ(got_f32.f32()[row * (2 * n + 8) + j], 7.0f) << "pad of row " << row << ", " << what;
          }
          // The CPU reference (f32 throughout) from the same bf16 values.
          Tensor ref = Tensor::zeros({r, 2 * n});
          cpu_->grouped_silu_backward(dc_h.to_f32(), w_h.to_f32(), bounds(offsets), gu_h.to_f32(), ref, nullptr,
                                      nullptr, nullptr, nullptr);
          Tensor got_f = be.zeros({r, 2 * n}, DType::kF32);
          be.copy(got, got_f);
          EXPECT_LT(max_rel(be, got_f, ref), 2e-2) << what;
          // From the combine: the rows of a token gradient by index, scaled by routing weights. The fused
          // kernel against the composition on the same backend: the same bits, but for the order of the
          // dots' sums; and within bf16 rounding of the CPU's. Then the down weights' gradient over those
          // rows by index: the same bits as over them gathered.
          const int64_t tokens = r / 3 + 1;
          Tensor index = Tensor::zeros({r}, DType::kI32);
          for (int64_t i = 0; i < r; ++i) index.data<int32_t>()[i] = static_cast<int32_t>((i * 7 + 3) % tokens);
          const Tensor dy_h = randn({tokens, k}).to(DType::kBF16), scale_h = randn({r});
          Tensor dy = be.zeros({tokens, k}, DType::kBF16);
          be.copy(on(be, dy_h), dy);
          const Tensor gi = on(be, index), gs = on(be, scale_h);
          Tensor dgu1 = be.zeros({r, 2 * n}, DType::kBF16), dgu2 = be.zeros({r, 2 * n}, DType::kBF16);
          Tensor act1 = be.zeros({r, n}, DType::kBF16), act2 = be.zeros({r, n}, DType::kBF16);
          Tensor ds1 = be.zeros({r}, DType::kF32), ds2 = be.zeros({r}, DType::kF32);
          be.grouped_silu_backward(dy, w, off, gu, dgu1, &gi, &gs, &ds1, &act1);
          be.Backend::grouped_silu_backward(dy, w, off, gu, dgu2, &gi, &gs, &ds2, &act2);
          EXPECT_TRUE(bitwise_equal(be.download(dgu1), be.download(dgu2))) << "scaled dgu, " << what;
          EXPECT_TRUE(bitwise_equal(be.download(act1), be.download(act2))) << "scaled act, " << what;
          EXPECT_LT(max_rel(be, ds1, be.download(ds2)), 1e-5) << "dscale, " << what;
          Tensor ref_dgu = Tensor::zeros({r, 2 * n}), ref_act = Tensor::zeros({r, n}), ref_ds = Tensor::zeros({r});
          cpu_->grouped_silu_backward(dy_h.to_f32(), w_h.to_f32(), bounds(offsets), gu_h.to_f32(), ref_dgu, &index,
                                      &scale_h, &ref_ds, &ref_act);
          EXPECT_LT(max_rel(be, dgu1, ref_dgu), 2e-2) << "scaled dgu against the CPU, " << what;
          EXPECT_LT(max_rel(be, act1, ref_act), 1e-2) << "scaled act against the CPU, " << what;
          EXPECT_LT(max_rel(be, ds1, ref_ds), 2e-2) << "dscale against the CPU, " << what;
          if (n % 8 == 0) {
            Tensor in_order = be.empty({r, k}, DType::kBF16), dw1 = be.zeros({g, k, n}, DType::kF32),
                   dw2 = be.zeros({g, k, n}, DType::kF32);
            be.gather_rows(dy, gi, in_order);
            be.grouped_gemm_wgrad(in_order, act1, off, dw1, 0.0f);
            be.grouped_gemm_wgrad(dy, act1, off, dw2, 0.0f, nullptr, &gi);
            EXPECT_TRUE(bitwise_equal(be.download(dw1), be.download(dw2))) << "wgrad over dc's rows by index, " << what;
          }
        }
      }
    }
  }
}

// On a Hopper GPU the grouped products' 128-row and 64-row tiles run on warpgroup products (wgmma, 2
// warpgroups a block or 1): the backend says so in its name, and the products agree with the mma.sync
// kernels' to f32 rounding (the same bf16 operands, f32 sums in another order) at a training step's
// shapes (groups of hundreds of rows: several row tiles, ragged ends) and a decode step's (tens of rows
// a group: 64-row tiles): a forward product of each weight orientation, the gated product and the
// weight gradient. Each kind repeats itself bitwise.
TEST_F(CudaBackendTest, WarpgroupGroupedProductsAgreeWithMmaSync) {
  Backend& hop = bf16(true);
  Backend& old = bf16(false);
  int major = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), cudaSuccess);
  if (major != 9) GTEST_SKIP() << "not a Hopper GPU: the warpgroup products are not used";
  ASSERT_NE(hop.name().find("wgmma"), std::string::npos) << hop.name();
  ASSERT_EQ(old.name().find("wgmma"), std::string::npos) << old.name();
  for (const std::vector<int64_t>& offsets :
       {std::vector<int64_t>{0, 300, 300, 941, 1100, 1229, 1800}, std::vector<int64_t>{0, 31, 31, 95, 129, 160, 240}}) {
    const int64_t g = 6, r = offsets.back() + 5, n = 384, k = 320;
    const Tensor x = randn({r, k}), wt = randn({g, 2 * n, k}, 0.2f), wn = randn({g, k, n}, 0.2f);
    const Tensor dc = randn({r, n});
    auto run = [&](Backend& be) {
      std::vector<Tensor> out;
      const Tensor off = on(be, bounds(offsets));
      Tensor c1 = be.zeros({r, 2 * n}, DType::kF32), c2 = be.zeros({r, n}, DType::kF32);
      be.grouped_gemm(on(be, x), on(be, wt), true, off, c1, 0.0f);
      be.grouped_gemm(on(be, x), on(be, wn), false, off, c2, 0.0f);
      Tensor h = be.zeros({r, n}, DType::kBF16), gu = be.zeros({r, 2 * n}, DType::kBF16);
      Tensor w16 = be.zeros({g, 2 * n, k}, DType::kBF16), x16 = be.zeros({r, k}, DType::kBF16);
      be.copy(on(be, wt), w16);
      be.copy(on(be, x), x16);
      be.grouped_gate_up(x16, w16, off, h, &gu);
      Tensor dw = be.zeros({g, n, k}, DType::kF32);
      be.grouped_gemm_wgrad(on(be, dc), on(be, x), off, dw);
      for (const Tensor& t : {c1, c2, h, gu, dw}) out.push_back(be.download(t).to_f32());
      return out;
    };
    const std::vector<Tensor> a = run(hop), a2 = run(hop), b = run(old);
    const char* names[] = {"grouped_gemm (k-contiguous weights)", "grouped_gemm (n-contiguous weights)",
                           "grouped_gate_up h", "grouped_gate_up products", "grouped_gemm_wgrad"};
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_TRUE(bitwise_equal(a[i], a2[i])) << names[i] << " repeats, " << offsets.back() << " rows";
      const double tol = i == 2 || i == 3 ? 1e-2 : 1e-5;  // bf16 outputs: one rounding step apart at most
      EXPECT_LT(max_rel(hop, a[i], b[i]), tol) << names[i] << ", " << offsets.back() << " rows";
    }
  }
}

// Batch-invariant products (gemm bf16_invariant): a row's result has the same bits whatever rows share
// its product: dense products (both weight orientations, f32 or bf16 weights, beta 0 and 1, windows of
// rows that start inside and across 128-row tiles) and grouped ones (the same rows in groups of few rows
// or many, where the default mode would take other kernels), each within bf16 rounding of the f32
// reference.
TEST_F(CudaBackendTest, BatchInvariantProductsGiveARowTheSameBits) {
  Backend& be = bf16(/*hopper=*/true, /*invariant=*/true);
  const int64_t m = 300, k = 264, n = 200;
  const Tensor a = randn({m, k}), c0 = randn({m, n});
  const std::vector<std::pair<int64_t, int64_t>> windows = {{0, 1}, {5, 7}, {120, 20}, {128, 129}, {299, 1}, {3, 250}};
  for (bool trans_b : {true, false}) {
    const Tensor w = trans_b ? randn({n, k}, 0.1f) : randn({k, n}, 0.1f);
    for (bool w16 : {false, true}) {
      Tensor dw = on(be, w);
      if (w16) {
        Tensor b = be.zeros(w.shape(), DType::kBF16);
        be.copy(dw, b);
        dw = b;
      }
      for (float beta : {0.0f, 1.0f}) {
        Tensor full = on(be, c0);
        be.gemm(on(be, a), false, dw, trans_b, full, 1.0f, beta);
        const Tensor want = be.download(full);
        if (beta == 0.0f) {  // into bf16: the same sums, rounded once
          Tensor c16 = be.zeros({m, n}, DType::kBF16), rounded = be.zeros({m, n}, DType::kBF16);
          be.gemm(on(be, a), false, dw, trans_b, c16, 1.0f, 0.0f);
          be.copy(full, rounded);
          EXPECT_TRUE(bitwise_equal(be.download(c16), be.download(rounded))) << "bf16 c, trans_b " << trans_b;
        }
        Tensor ref = c0.clone();
        cpu_->gemm(a, false, w, trans_b, ref, 1.0f, beta);
        EXPECT_LT(max_rel(be, want, ref), 2e-2) << "trans_b " << trans_b;
        for (auto [r0, rows] : windows) {
          Tensor part = on(be, c0.slice(0, r0, rows).clone());
          be.gemm(on(be, a.slice(0, r0, rows).clone()), false, dw, trans_b, part, 1.0f, beta);
          EXPECT_TRUE(bitwise_equal(be.download(part), want.slice(0, r0, rows).clone()))
              << "rows " << r0 << "+" << rows << ", trans_b " << trans_b << ", bf16 w " << w16 << ", beta " << beta;
        }
      }
    }
  }
  // Grouped: rows 40..43 of the batch form group 2 in a product of 300 rows (groups of 100 on average)
  // and alone (1 row a group on average), as gate/up and plain products.
  const int64_t g = 4, inter = 72;
  const Tensor wg = randn({g, 2 * inter, k}, 0.1f), wd = randn({g, n, k}, 0.1f);
  Tensor gwg = be.zeros(wg.shape(), DType::kBF16), gwd = be.zeros(wd.shape(), DType::kBF16);
  be.copy(on(be, wg), gwg);
  be.copy(on(be, wd), gwd);
  const std::vector<int64_t> big = {0, 40, 40, 44, 300}, small = {0, 0, 0, 4, 4};
  Tensor ha = be.zeros({m, inter}, DType::kBF16), hs = be.zeros({4, inter}, DType::kBF16);
  Tensor ya = be.zeros({m, n}), ys = be.zeros({4, n});
  const Tensor da = on(be, a), ds = on(be, a.slice(0, 40, 4).clone());
  be.grouped_gate_up(da, gwg, on(be, bounds(big)), ha);
  be.grouped_gate_up(ds, gwg, on(be, bounds(small)), hs);
  be.grouped_gemm(da, gwd, true, on(be, bounds(big)), ya);
  be.grouped_gemm(ds, gwd, true, on(be, bounds(small)), ys);
  EXPECT_TRUE(bitwise_equal(be.download(hs), be.download(ha).slice(0, 40, 4).clone())) << "gate/up";
  EXPECT_TRUE(bitwise_equal(be.download(ys), be.download(ya).slice(0, 40, 4).clone())) << "grouped product";
  Tensor ref = Tensor::zeros({4, n});
  cpu_->gemm(a.slice(0, 40, 4).clone(), false, wd.slice(0, 2, 1).view({n, k}), true, ref);
  EXPECT_LT(max_rel(be, ys, ref), 2e-2);
}

TEST_F(CudaBackendTest, RmsNormForwardBackwardF32AndBf16) {
  // Rows of 128·k ≤ 1024 take the one-pass backward (several blocks of rows; a partial last one).
  for (auto [m, d] : {std::pair<int64_t, int64_t>{7, 64}, {33, 1000}, {300, 7168}, {70, 256}, {301, 1024}}) {
    // x as a column slice (the latent part of [c | k_pe]).
    Tensor wide = randn({m, d + 16}), x = wide.slice(1, 0, d), w = randn({d}, 0.2f), dy = randn({m, d});
    Tensor y = Tensor::zeros({m, d}), rstd = Tensor::zeros({m}), dx = randn({m, d}), dw = randn({d});
    const Tensor dx_before = dx.clone(), dw_before = dw.clone();
    Tensor gwide = dev(wide), gx = gwide.slice(1, 0, d), gw = dev(w), gy = gpu_->zeros({m, d}, DType::kF32),
           gr = gpu_->zeros({m}, DType::kF32), gdx = dev(dx), gdw = dev(dw);
    cpu_->rmsnorm_forward(x, w, 1e-6f, y, rstd);
    cpu_->rmsnorm_backward(dy, x, w, rstd, dx, dw);
    gpu_->rmsnorm_forward(gx, gw, 1e-6f, gy, gr);
    gpu_->rmsnorm_backward(dev(dy), gx, gw, gr, gdx, gdw);
    EXPECT_CLOSE(gy, y, 1e-5) << m << "x" << d;
    EXPECT_CLOSE(gr, rstd, 1e-5);
    EXPECT_CLOSE(gdx, dx, 1e-5);
    EXPECT_CLOSE(gdw, dw, 1e-4);
    {
      // With a bf16 copy of the new dx: the same dx and dw, and the copy is dx rounded.
      Tensor gdx2 = dev(dx_before), gdw2 = dev(dw_before), r16 = gpu_->zeros({m, d}, DType::kBF16);
      Tensor want16 = gpu_->zeros({m, d}, DType::kBF16);
      gpu_->rmsnorm_backward(dev(dy), gx, gw, gr, gdx2, gdw2, &r16);
      gpu_->copy(gdx, want16);
      EXPECT_TRUE(bitwise_equal(gpu_->download(gdx2), gpu_->download(gdx))) << m << "x" << d;
      EXPECT_TRUE(bitwise_equal(gpu_->download(gdw2), gpu_->download(gdw))) << m << "x" << d;
      EXPECT_TRUE(bitwise_equal(gpu_->download(r16), gpu_->download(want16))) << m << "x" << d;
    }
    // bf16 activations (f32 math): inputs rounded to bf16 on both sides.
    Tensor xb = x.clone().to(DType::kBF16), dyb = dy.to(DType::kBF16);
    Tensor yr = Tensor::zeros({m, d}), rr = Tensor::zeros({m});
    cpu_->rmsnorm_forward(xb.to_f32(), w, 1e-6f, yr, rr);
    Tensor gyb = gpu_->zeros({m, d}, DType::kBF16);
    gpu_->rmsnorm_forward(dev(xb), gw, 1e-6f, gyb, gr);
    EXPECT_CLOSE(gyb, yr, 1e-2);
    // Backward on bf16 activations: f32 math on the rounded values, dx rounded once.
    Tensor dxr = dx.clone().to(DType::kBF16).to_f32(), dwr = dw.clone();
    cpu_->rmsnorm_backward(dyb.to_f32(), xb.to_f32(), w, rr, dxr, dwr);
    Tensor gdxb = dev(dx.clone().to(DType::kBF16)), gdwb = dev(dw);
    gpu_->rmsnorm_backward(dev(dyb), dev(xb), gw, gr, gdxb, gdwb);
    EXPECT_CLOSE(gdxb, dxr, 1e-2) << m << "x" << d << " bf16";
    EXPECT_CLOSE(gdwb, dwr, 1e-4) << m << "x" << d << " bf16";
    // f32 in, bf16 out (a norm whose output only bf16 products read): the f32 result rounded once, as
    // the CPU reference rounds it; a last-bit difference where the f32 results differ at a tie.
    Tensor yb = Tensor::zeros({m, d}, DType::kBF16), gy2 = gpu_->zeros({m, d}, DType::kBF16);
    cpu_->rmsnorm_forward(x, w, 1e-6f, yb, rstd);
    gpu_->rmsnorm_forward(gx, gw, 1e-6f, gy2, gr);
    EXPECT_TRUE(bitwise_equal(yb, y.clone().to(DType::kBF16)));
    EXPECT_LT(max_rel(*gpu_, gy2, yb), 8e-3);
    EXPECT_CLOSE(gr, rstd, 1e-5);
    // The residual add and the norm in one pass: the same bits as add then rmsnorm on the GPU; the CPU
    // reference is that composition.
    Tensor r = randn({m, d}), hh = randn({m, d}), href = hh.clone(), yref = Tensor::zeros({m, d});
    Tensor gh1 = dev(hh), gh2 = dev(hh), gr2 = dev(r), gya = gpu_->zeros({m, d}, DType::kBF16),
           gyb2 = gpu_->zeros({m, d}, DType::kBF16), gra = gpu_->zeros({m}, DType::kF32),
           grb = gpu_->zeros({m}, DType::kF32);
    gpu_->add_rmsnorm_forward(gr2, gh1, gw, 1e-6f, gya, gra);
    gpu_->add(gr2, gh2);
    gpu_->rmsnorm_forward(gh2, gw, 1e-6f, gyb2, grb);
    EXPECT_TRUE(bitwise_equal(gpu_->download(gh1), gpu_->download(gh2)));
    EXPECT_TRUE(bitwise_equal(gpu_->download(gya), gpu_->download(gyb2)));
    EXPECT_TRUE(bitwise_equal(gpu_->download(gra), gpu_->download(grb)));
    cpu_->add_rmsnorm_forward(r, href, w, 1e-6f, yref, rstd);
    EXPECT_CLOSE(gh1, href, 1e-6);
    EXPECT_LT(max_rel(*gpu_, gya, yref), 8e-3);
    // The inputs kept rounded for backward (x_rounded, h_rounded): the norms' results as without, and the
    // copies the inputs rounded; a backward from the rounded x (f32 dy and dx) is the backward from
    // those values in f32, bit for bit.
    {
      Tensor gy3 = gpu_->zeros({m, d}, DType::kBF16), gr3 = gpu_->zeros({m}, DType::kF32);
      Tensor xr16 = gpu_->zeros({m, d}, DType::kBF16), want_xr = gpu_->zeros({m, d}, DType::kBF16);
      gpu_->rmsnorm_forward(gx, gw, 1e-6f, gy3, gr3, &xr16);
      gpu_->copy(gx, want_xr);
      EXPECT_TRUE(bitwise_equal(gpu_->download(gy3), gpu_->download(gy2))) << m << "x" << d;
      EXPECT_TRUE(bitwise_equal(gpu_->download(gr3), gpu_->download(gr))) << m << "x" << d;
      EXPECT_TRUE(bitwise_equal(gpu_->download(xr16), gpu_->download(want_xr))) << m << "x" << d;
      Tensor gh3 = dev(hh), gya3 = gpu_->zeros({m, d}, DType::kBF16), gra3 = gpu_->zeros({m}, DType::kF32);
      Tensor hr16 = gpu_->zeros({m, d}, DType::kBF16), want_hr = gpu_->zeros({m, d}, DType::kBF16);
      gpu_->add_rmsnorm_forward(gr2, gh3, gw, 1e-6f, gya3, gra3, &hr16);
      gpu_->copy(gh1, want_hr);
      EXPECT_TRUE(bitwise_equal(gpu_->download(gh3), gpu_->download(gh1))) << m << "x" << d;
      EXPECT_TRUE(bitwise_equal(gpu_->download(gya3), gpu_->download(gya))) << m << "x" << d;
      EXPECT_TRUE(bitwise_equal(gpu_->download(hr16), gpu_->download(want_hr))) << m << "x" << d;
      Tensor x_vals = gpu_->zeros({m, d}, DType::kF32);
      gpu_->copy(xr16, x_vals);
      Tensor gdx4 = dev(dx_before), gdw4 = dev(dw_before), gdx5 = dev(dx_before), gdw5 = dev(dw_before);
      gpu_->rmsnorm_backward(dev(dy), xr16, gw, gr, gdx4, gdw4);
      gpu_->rmsnorm_backward(dev(dy), x_vals, gw, gr, gdx5, gdw5);
      EXPECT_TRUE(bitwise_equal(gpu_->download(gdx4), gpu_->download(gdx5))) << m << "x" << d;
      EXPECT_TRUE(bitwise_equal(gpu_->download(gdw4), gpu_->download(gdw5))) << m << "x" << d;
      EXPECT_CLOSE(gdx4, dx, 2e-2);
    }
  }
}

TEST_F(CudaBackendTest, SiluGateForwardBackward) {
  for (auto [m, inter] : {std::pair<int64_t, int64_t>{1, 5}, {45, 300}, {257, 512}}) {
    Tensor gu = randn({m, 2 * inter}, 3.0f), dh = randn({m, inter}), h = Tensor::zeros({m, inter});
    Tensor dgu = randn({m, 2 * inter});
    Tensor gh = gpu_->zeros({m, inter}, DType::kF32), gdgu = dev(dgu);
    cpu_->silu_mul_forward(gu, h);
    cpu_->silu_mul_backward(dh, gu, dgu);
    gpu_->silu_mul_forward(dev(gu), gh);
    gpu_->silu_mul_backward(dev(dh), dev(gu), gdgu);
    EXPECT_CLOSE(gh, h, 1e-5);
    EXPECT_CLOSE(gdgu, dgu, 1e-5);
    // Into bf16 (the gated activation only a bf16 product reads): the f32 result rounded once.
    Tensor hb = Tensor::zeros({m, inter}, DType::kBF16), ghb = gpu_->zeros({m, inter}, DType::kBF16);
    cpu_->silu_mul_forward(gu, hb);
    gpu_->silu_mul_forward(dev(gu), ghb);
    EXPECT_TRUE(bitwise_equal(hb, h.clone().to(DType::kBF16)));
    EXPECT_LT(max_rel(*gpu_, ghb, hb), 8e-3);
    // Products kept in bf16 (the dense MLP's): as their values in f32, bitwise, on both backends.
    for (Backend* be : {cpu_.get(), gpu_.get()}) {
      const Tensor gu16 = gu.clone().to(DType::kBF16), gu_vals = gu16.to_f32();
      const auto put = [&](const Tensor& t) { return be == gpu_.get() ? dev(t) : t; };
      const auto get = [&](const Tensor& t) { return be == gpu_.get() ? be->download(t) : t; };
      Tensor h1 = be->zeros({m, inter}, DType::kBF16), h2 = be->zeros({m, inter}, DType::kBF16);
      be->silu_mul_forward(put(gu16), h1);
      be->silu_mul_forward(put(gu_vals), h2);
      EXPECT_TRUE(bitwise_equal(get(h1), get(h2))) << "silu_mul_forward of bf16 products";
    }
    // The gradient into bf16 (only bf16 products read it): the f32 gradient rounded once.
    Tensor gdgub = gpu_->zeros({m, 2 * inter}, DType::kBF16);
    gpu_->silu_mul_backward(dev(dh), dev(gu), gdgub);
    EXPECT_TRUE(bitwise_equal(gpu_->download(gdgub), gpu_->download(gdgu).to(DType::kBF16)));
    // From products kept in bf16 (dh f32): the same as from those products' f32 values.
    Tensor gub = gpu_->zeros({m, 2 * inter}, DType::kBF16), gdgu3 = gpu_->zeros({m, 2 * inter}, DType::kF32);
    gpu_->copy(dev(gu), gub);
    Tensor gdgu4 = gpu_->zeros({m, 2 * inter}, DType::kF32);
    gpu_->silu_mul_backward(dev(dh), gub, gdgu3);
    gpu_->silu_mul_backward(dev(dh), dev(gu.clone().to(DType::kBF16).to_f32()), gdgu4);
    EXPECT_TRUE(bitwise_equal(gpu_->download(gdgu3), gpu_->download(gdgu4)));
    // With the gated activation remade in the same pass: the same gradient, and h as silu_mul_forward
    // makes it, bitwise (bf16 products, and f32).
    for (const Tensor& g : {gub, dev(gu)}) {
      Tensor gdgu5 = gpu_->zeros({m, 2 * inter}, DType::kF32), gdgu6 = gpu_->zeros({m, 2 * inter}, DType::kF32);
      Tensor h5 = gpu_->zeros({m, inter}, g.dtype()), h6 = gpu_->zeros({m, inter}, g.dtype());
      gpu_->silu_mul_backward(dev(dh), g, gdgu5);
      gpu_->silu_mul_backward(dev(dh), g, gdgu6, &h6);
      gpu_->silu_mul_forward(g, h5);
      EXPECT_TRUE(bitwise_equal(gpu_->download(gdgu5), gpu_->download(gdgu6))) << m << "x" << inter;
      EXPECT_TRUE(bitwise_equal(gpu_->download(h5), gpu_->download(h6))) << m << "x" << inter;
    }
  }
}

TEST_F(CudaBackendTest, EmbeddingForwardBackwardWithRepeatedIds) {
  const int64_t v = 50, d = 72, m = 300;
  Tensor table = randn({v, d}), id = ids({m}, 7), dout = randn({m, d});  // ids 0..6: many repeats
  Tensor out = Tensor::zeros({m, d}), dtable = randn({v, d});
  Tensor gout = gpu_->zeros({m, d}, DType::kF32), gdtable = dev(dtable);
  cpu_->embedding_forward(table, id, out);
  cpu_->embedding_backward(dout, id, dtable);
  gpu_->embedding_forward(dev(table), dev(id), gout);
  gpu_->embedding_backward(dev(dout), dev(id), gdtable);
  EXPECT_TRUE(bitwise_equal(gpu_->download(gout), out));
  EXPECT_CLOSE(gdtable, dtable, 1e-6);
}

TEST_F(CudaBackendTest, RopeBothLayoutsForwardAndInverseOnSlices) {
  const int64_t m = 37, h = 3, d = 16, npos = 64;
  RopeTable t{randn({npos, d / 2}), randn({npos, d / 2})};
  RopeTable gt{dev(t.cos), dev(t.sin)};
  Tensor pos = ids({m}, npos);
  for (bool interleaved : {true, false}) {
    for (bool inverse : {false, true}) {
      Tensor x = randn({m, h, d + 8}), gx = dev(x);
      Tensor xs = x.slice(2, 8, d), gxs = gx.slice(2, 8, d);
      cpu_->rope(xs, pos, t, interleaved, inverse);
      gpu_->rope(gxs, dev(pos), gt, interleaved, inverse);
      EXPECT_CLOSE(gx, x, 1e-6) << interleaved << inverse;
    }
    // Rotated into another tensor (a copy and rope in one pass): the same bits as copy then rope, on
    // the GPU, and as the CPU reference within rounding.
    // Either direction, into f32 or (rounded once) into bf16; from columns 8 on (16-byte aligned: four
    // pairs a thread) and from column 2 (a pair a thread).
    const Tensor& p2 = pos;
    for (int64_t c0 : {8, 2})
      for (bool inverse : {false, true}) {
        Tensor src = randn({m, h, d + 8}), gsrc = dev(src);
        Tensor want = Tensor::zeros({m, h, d}), ga = gpu_->zeros({m, h, d}, DType::kF32),
               gb = gpu_->zeros({m, h, d}, DType::kF32);
        cpu_->rope_from(src.slice(2, c0, d), want, p2, t, interleaved, inverse);
        gpu_->rope_from(gsrc.slice(2, c0, d), ga, dev(p2), gt, interleaved, inverse);
        gpu_->copy(gsrc.slice(2, c0, d), gb);
        gpu_->rope(gb, dev(p2), gt, interleaved, inverse);
        EXPECT_TRUE(bitwise_equal(gpu_->download(ga), gpu_->download(gb))) << interleaved << inverse << c0;
        EXPECT_CLOSE(ga, want, 1e-6) << interleaved << inverse << c0;
        Tensor g16 = gpu_->zeros({m, h, d}, DType::kBF16), want16 = gpu_->zeros({m, h, d}, DType::kBF16);
        gpu_->rope_from(gsrc.slice(2, c0, d), g16, dev(p2), gt, interleaved, inverse);
        gpu_->copy(gb, want16);
        EXPECT_TRUE(bitwise_equal(gpu_->download(g16), gpu_->download(want16)))
            << interleaved << inverse << c0 << " bf16";
        Tensor c16 = Tensor::zeros({m, h, d}, DType::kBF16);
        cpu_->rope_from(src.slice(2, c0, d), c16, p2, t, interleaved, inverse);
        EXPECT_EQ(std::memcmp(c16.raw(), want.to(DType::kBF16).raw(), m * h * d * 2), 0)
            << "the CPU reference, rounded";
      }
  }
}

struct AttnCase {
  int64_t b, t, s, hq, hk, d, dv;
};

TEST_F(CudaBackendTest, AttentionForwardBackwardCausalGqaAndPrefix) {
  for (const AttnCase& c :
       {AttnCase{2, 37, 37, 4, 4, 48, 32}, AttnCase{1, 5, 70, 4, 2, 96, 64}, AttnCase{2, 130, 130, 2, 2, 192, 128},
        AttnCase{1, 1, 1, 1, 1, 8, 8}, AttnCase{3, 64, 96, 6, 3, 40, 24}}) {
    Tensor q = randn({c.b, c.t, c.hq, c.d}), k = randn({c.b, c.s, c.hk, c.d}), v = randn({c.b, c.s, c.hk, c.dv});
    Tensor out = Tensor::zeros({c.b, c.t, c.hq, c.dv}), lse = Tensor::zeros({c.b, c.hq, c.t});
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
    cpu_->attention_forward(q, k, v, scale, out, lse);
    Tensor gq = dev(q), gk = dev(k), gv = dev(v), gout = gpu_->zeros(out.shape(), DType::kF32),
           glse = gpu_->zeros(lse.shape(), DType::kF32);
    gpu_->attention_forward(gq, gk, gv, scale, gout, glse);
    const std::string what = ::testing::PrintToString(std::vector<int64_t>{c.b, c.t, c.s, c.hq, c.hk, c.d, c.dv});
    EXPECT_CLOSE(gout, out, 2e-5) << what;
    EXPECT_CLOSE(glse, lse, 2e-6) << what;
    // Into a bf16 output: the fp32 kernels' result rounded once.
    Tensor gout16 = gpu_->zeros(out.shape(), DType::kBF16);
    gpu_->attention_forward(gq, gk, gv, scale, gout16, glse);
    EXPECT_TRUE(bitwise_equal(gpu_->download(gout16), gpu_->download(gout).to(DType::kBF16))) << what;
    Tensor dout = randn(out.shape()), dq = randn(q.shape()), dk = randn(k.shape()), dv = randn(v.shape());
    Tensor gdq = dev(dq), gdk = dev(dk), gdv = dev(dv);
    const Tensor dq0 = dq.clone(), dk0 = dk.clone(), dv0 = dv.clone();
    cpu_->attention_backward(dout, q, k, v, out, lse, scale, dq, dk, dv);
    gpu_->attention_backward(dev(dout), gq, gk, gv, gout, glse, scale, gdq, gdk, gdv);
    EXPECT_CLOSE(gdq, dq, 5e-5) << what;
    EXPECT_CLOSE(gdk, dk, 5e-5) << what;
    EXPECT_CLOSE(gdv, dv, 5e-5) << what;
    // Overwriting (accumulate false) never reads what is there (NaN here): plus the starting values,
    // the sums above.
    Tensor oq = dev(nans(q.shape())), ok = dev(nans(k.shape())), ov = dev(nans(v.shape()));
    gpu_->attention_backward(dev(dout), gq, gk, gv, gout, glse, scale, oq, ok, ov, /*accumulate=*/false);
    const auto plus = [&](const Tensor& got, const Tensor& base) {
      Tensor h = gpu_->download(got);
      for (int64_t i = 0; i < h.numel(); ++i) h.f32()[i] += base.f32()[i];
      return h;
    };
    EXPECT_CLOSE(plus(oq, dq0), dq, 5e-5) << what << " (overwriting)";
    EXPECT_CLOSE(plus(ok, dk0), dk, 5e-5) << what << " (overwriting)";
    EXPECT_CLOSE(plus(ov, dv0), dv, 5e-5) << what << " (overwriting)";
  }
}

// With reduced-precision products the attention runs on tensor cores (bf16 operands, fp32 accumulation
// and softmax): within the bf16 tolerance of the fixture README (relative L2 < 2e-2).
// Backward takes the warpgroup-product kernels where they are built (hopper: sm_90a, head sizes 64 or 96
// by 64), else mma.sync: both are checked.
TEST_F(CudaBackendTest, TensorCoreAttentionWithinBf16Tolerance) {
  for (bool hopper : {true, false}) {
    cuda::Options o;
    o.gemm = cuda::Options::GemmPrecision::kBF16;
    o.hopper_products = hopper;
    auto tcb = cuda::make_backend(o);
    ASSERT_TRUE(tcb.ok());
    Backend& be = **tcb;
    for (const AttnCase& c :
         {AttnCase{2, 37, 37, 4, 4, 48, 32}, AttnCase{1, 5, 70, 4, 2, 96, 64}, AttnCase{2, 130, 130, 2, 2, 192, 128},
          AttnCase{3, 64, 96, 6, 3, 64, 64}, AttnCase{1, 200, 200, 2, 1, 128, 128}, AttnCase{2, 150, 150, 4, 2, 96, 64},
          AttnCase{1, 100, 228, 2, 1, 96, 64}}) {
      Tensor q = randn({c.b, c.t, c.hq, c.d}), k = randn({c.b, c.s, c.hk, c.d}), v = randn({c.b, c.s, c.hk, c.dv});
      Tensor out = Tensor::zeros({c.b, c.t, c.hq, c.dv}), lse = Tensor::zeros({c.b, c.hq, c.t});
      const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
      cpu_->attention_forward(q, k, v, scale, out, lse);
      auto up = [&](const Tensor& h) {
        Tensor d = be.zeros(h.shape(), DType::kF32);
        be.upload(h, d);
        return d;
      };
      Tensor gq = up(q), gk = up(k), gv = up(v), gout = be.zeros(out.shape(), DType::kF32),
             glse = be.zeros(lse.shape(), DType::kF32);
      be.attention_forward(gq, gk, gv, scale, gout, glse);
      const std::string what = ::testing::PrintToString(std::vector<int64_t>{c.b, c.t, c.s, c.hq, c.hk, c.d, c.dv}) +
                               (hopper ? "" : " (mma.sync)");
      EXPECT_LT(rel_l2(be, gout, out), 2e-2) << what;
      EXPECT_GT(rel_l2(be, gout, out), 1e-5) << what << ": expected bf16 products (the tensor-core kernels)";
      EXPECT_LT(rel_l2(be, glse, lse), 2e-2) << what;
      Tensor dout = randn(out.shape()), dq = randn(q.shape()), dk = randn(k.shape()), dv = randn(v.shape());
      Tensor gdq = up(dq), gdk = up(dk), gdv = up(dv);
      // Compare the increments (the outputs accumulate into random starting values).
      Tensor dq0 = dq.clone(), dk0 = dk.clone(), dv0 = dv.clone();
      cpu_->attention_backward(dout, q, k, v, out, lse, scale, dq, dk, dv);
      be.attention_backward(up(dout), gq, gk, gv, gout, glse, scale, gdq, gdk, gdv);
      auto delta = [&](const Tensor& after, const Tensor& before) {
        Tensor a = after.device() == Device::kCuda ? be.download(after) : after.clone();
        for (int64_t i = 0; i < a.numel(); ++i) a.f32()[i] -= before.f32()[i];
        return a;
      };
      EXPECT_LT(rel_l2(be, delta(gdq, dq0), delta(dq, dq0)), 2e-2) << what;
      EXPECT_LT(rel_l2(be, delta(gdk, dk0), delta(dk, dk0)), 2e-2) << what;
      EXPECT_LT(rel_l2(be, delta(gdv, dv0), delta(dv, dv0)), 2e-2) << what;
      // Overwriting (accumulate false) never reads what is there (NaN here).
      Tensor oq = up(nans(q.shape())), ok = up(nans(k.shape())), ov = up(nans(v.shape()));
      be.attention_backward(up(dout), gq, gk, gv, gout, glse, scale, oq, ok, ov, /*accumulate=*/false);
      EXPECT_LT(rel_l2(be, oq, delta(dq, dq0)), 2e-2) << what << " (overwriting)";
      EXPECT_LT(rel_l2(be, ok, delta(dk, dk0)), 2e-2) << what << " (overwriting)";
      EXPECT_LT(rel_l2(be, ov, delta(dv, dv0)), 2e-2) << what << " (overwriting)";
      {
        // A bf16 dv (overwritten, as a strided view): the f32 dv rounded once; dq and dk the same bits.
        auto nan16 = [&](const Shape& s) {
          Tensor r = be.zeros(s, DType::kBF16);
          be.copy(up(nans(s)), r);
          return r;
        };
        Tensor oq2 = up(nans(q.shape())), ok2 = up(nans(k.shape()));
        Tensor wide = nan16({c.b, c.s, c.hk, 2 * c.dv}), ov16 = wide.slice(3, c.dv, c.dv);
        be.attention_backward(up(dout), gq, gk, gv, gout, glse, scale, oq2, ok2, ov16, /*accumulate=*/false);
        Tensor want16 = be.zeros(v.shape(), DType::kBF16);
        be.copy(ov, want16);
        Tensor got16 = be.zeros(v.shape(), DType::kBF16);
        be.copy(ov16, got16);
        EXPECT_TRUE(bitwise_equal(be.download(got16), be.download(want16))) << what << " (bf16 dv)";
        EXPECT_TRUE(bitwise_equal(be.download(oq2), be.download(oq))) << what << " (bf16 dv)";
        EXPECT_TRUE(bitwise_equal(be.download(ok2), be.download(ok))) << what << " (bf16 dv)";
      }
      // dq and dk in parts (overwritten): dq's first columns into a bf16 strided view, rounded once, dk's
      // into f32, the rest of each into f32 tails: the bits of the whole gradients, on the tensor-core
      // kernels and on the f32 ones (which write them whole and split them), and split inside an 8-column
      // chunk (written whole and split there too).
      be.synchronize();  // the other backend reads what this one made, on a stream of its own
      for (const auto& [x, dh] :
           {std::pair<Backend*, int64_t>{&be, c.d / 16 * 8}, {gpu_.get(), c.d / 16 * 8}, {&be, c.d / 16 * 8 + 3}}) {
        Tensor wq = x->zeros(q.shape(), DType::kF32), wk = x->zeros(k.shape(), DType::kF32);
        Tensor wv = x->zeros(v.shape(), DType::kF32), xdout = x->zeros(dout.shape(), DType::kF32);
        x->upload(dout, xdout);
        x->attention_backward(xdout, gq, gk, gv, gout, glse, scale, wq, wk, wv, /*accumulate=*/false);
        Tensor qwide = x->zeros({c.b, c.t, c.hq, c.d + 8}, DType::kBF16), qhead = qwide.slice(3, 0, dh);
        Tensor qtail = x->zeros({c.b, c.t, c.hq, c.d - dh}, DType::kF32);
        Tensor khead = x->zeros({c.b, c.s, c.hk, dh}, DType::kF32),
               ktail = x->zeros({c.b, c.s, c.hk, c.d - dh}, DType::kF32);
        Tensor pv = x->zeros(v.shape(), DType::kF32);
        x->attention_backward(xdout, gq, gk, gv, gout, glse, scale, qhead, khead, pv, /*accumulate=*/false, &qtail,
                              &ktail);
        Tensor want_qh = x->zeros(qhead.shape(), DType::kBF16), got_qh = x->zeros(qhead.shape(), DType::kBF16);
        x->copy(wq.slice(3, 0, dh), want_qh);
        x->copy(qhead, got_qh);
        const auto part = [&](const Tensor& whole, int64_t from, int64_t n) {
          Tensor r = x->zeros({whole.size(0), whole.size(1), whole.size(2), n}, DType::kF32);
          x->copy(whole.slice(3, from, n), r);
          return x->download(r);
        };
        const std::string kind =
            (x == &be ? " (tensor cores, split " : " (f32 kernels, split ") + std::to_string(dh) + ")";
        EXPECT_TRUE(bitwise_equal(x->download(got_qh), x->download(want_qh))) << what << kind << ": dq's head";
        EXPECT_TRUE(bitwise_equal(x->download(qtail), part(wq, dh, c.d - dh))) << what << kind << ": dq's tail";
        EXPECT_TRUE(bitwise_equal(x->download(khead), part(wk, 0, dh))) << what << kind << ": dk's head";
        EXPECT_TRUE(bitwise_equal(x->download(ktail), part(wk, dh, c.d - dh))) << what << kind << ": dk's tail";
        EXPECT_TRUE(bitwise_equal(x->download(pv), x->download(wv))) << what << kind << ": dv";
      }
      // Keys in two parts (MLA: each head's first columns inside a wider tensor, the rest one row that every
      // head shares, expanded): the bits of the same keys whole, forward and backward, on the tensor-core
      // kernels and the f32 ones (which join them first).
      for (Backend* x : {&be, gpu_.get()}) {
        const int64_t dh = c.d / 16 * 8;
        const Tensor kt_host = randn({c.b, c.s, 1, c.d - dh});
        Tensor kwide = x->zeros({c.b, c.s, c.hk, dh + 8}, DType::kBF16), khead = kwide.slice(3, 0, dh);
        Tensor kshared = x->zeros({c.b, c.s, 1, c.d - dh}, DType::kBF16), kall = x->zeros(k.shape(), DType::kBF16);
        Tensor kx = x->zeros(k.shape(), DType::kF32), ktx = x->zeros(kt_host.shape(), DType::kF32);
        x->upload(k, kx);
        x->upload(kt_host, ktx);
        x->copy(kx.slice(3, 0, dh), khead);
        x->copy(ktx, kshared);
        const Tensor ktail = kshared.expand({c.b, c.s, c.hk, c.d - dh});
        Tensor kall_head = kall.slice(3, 0, dh), kall_tail = kall.slice(3, dh, c.d - dh);
        x->copy(khead, kall_head);
        x->copy(ktail, kall_tail);
        Tensor qx = x->zeros(q.shape(), DType::kF32), vx = x->zeros(v.shape(), DType::kF32);
        Tensor dox = x->zeros(dout.shape(), DType::kF32);
        x->upload(q, qx);
        x->upload(v, vx);
        x->upload(dout, dox);
        const std::string kind = x == &be ? " (tensor cores)" : " (f32 kernels)";
        std::vector<Tensor> got[2];
        for (int parts = 0; parts < 2; ++parts) {
          Tensor o = x->zeros(out.shape(), DType::kF32), l = x->zeros(lse.shape(), DType::kF32);
          x->attention_forward(qx, parts ? khead : kall, vx, scale, o, l, parts ? &ktail : nullptr);
          Tensor gq2 = x->zeros(q.shape(), DType::kF32), gk2 = x->zeros(k.shape(), DType::kF32);
          Tensor gv2 = x->zeros(v.shape(), DType::kF32);
          x->attention_backward(dox, qx, parts ? khead : kall, vx, o, l, scale, gq2, gk2, gv2, /*accumulate=*/false,
                                nullptr, nullptr, parts ? &ktail : nullptr);
          for (const Tensor& t : {o, l, gq2, gk2, gv2}) got[parts].push_back(x->download(t));
        }
        const char* names[] = {"out", "lse", "dq", "dk", "dv"};
        for (size_t i = 0; i < got[0].size(); ++i)
          EXPECT_TRUE(bitwise_equal(got[1][i], got[0][i])) << what << kind << ": keys in parts, " << names[i];
      }
      // bf16 operands (as a model keeps them for bf16 products) give the same bits: f32 ones are rounded
      // the same way first. Values as a strided view (every other head of a wider tensor).
      auto bf = [&](const Tensor& t) {
        Tensor r = be.zeros(t.shape(), DType::kBF16);
        be.copy(t, r);
        return r;
      };
      Tensor vwide = be.zeros({c.b, c.s, 2 * c.hk, c.dv}, DType::kBF16);
      Tensor vb = vwide.slice(2, 0, c.hk);
      be.copy(gv, vb);
      Tensor gout2 = be.zeros(out.shape(), DType::kF32), glse2 = be.zeros(lse.shape(), DType::kF32);
      be.attention_forward(bf(gq), bf(gk), vb, scale, gout2, glse2);
      EXPECT_TRUE(bitwise_equal(be.download(gout2), be.download(gout))) << what;
      EXPECT_TRUE(bitwise_equal(be.download(glse2), be.download(glse))) << what;
      Tensor gdq2 = up(dq0), gdk2 = up(dk0), gdv2 = up(dv0);
      be.attention_backward(up(dout), bf(gq), bf(gk), vb, gout, glse, scale, gdq2, gdk2, gdv2);
      EXPECT_TRUE(bitwise_equal(be.download(gdq2), be.download(gdq))) << what;
      EXPECT_TRUE(bitwise_equal(be.download(gdk2), be.download(gdk))) << what;
      EXPECT_TRUE(bitwise_equal(be.download(gdv2), be.download(gdv))) << what;
      // A bf16 output (what a model keeps where only bf16 products read it): the f32 one rounded once;
      // backward's row sums read it, within bf16 tolerance of the CPU as above.
      Tensor gout16 = be.zeros(out.shape(), DType::kBF16), glse3 = be.zeros(lse.shape(), DType::kF32);
      be.attention_forward(gq, gk, gv, scale, gout16, glse3);
      EXPECT_TRUE(bitwise_equal(be.download(gout16), be.download(gout).to(DType::kBF16))) << what;
      EXPECT_TRUE(bitwise_equal(be.download(glse3), be.download(glse))) << what;
      Tensor gdq3 = up(dq0), gdk3 = up(dk0), gdv3 = up(dv0);
      be.attention_backward(up(dout), gq, gk, gv, gout16, glse3, scale, gdq3, gdk3, gdv3);
      EXPECT_LT(rel_l2(be, delta(gdq3, dq0), delta(dq, dq0)), 2e-2) << what << " (bf16 output)";
      EXPECT_LT(rel_l2(be, delta(gdk3, dk0), delta(dk, dk0)), 2e-2) << what << " (bf16 output)";
      EXPECT_TRUE(bitwise_equal(be.download(gdv3), be.download(gdv))) << what << ": dv does not read the output";
    }
  }
}

TEST_F(CudaBackendTest, PagedLatentAttentionOverScrambledBlocks) {
  struct Geometry {
    int block;
    std::vector<int32_t> ctx, n_new;
    int64_t max_blocks;
  };
  // Sequence 0: 9 cached + 3 new (prefill chunk); 1: decode at 17; 2: a first token. Then long contexts
  // of few query rows, which split the context over blocks (and a split past a short sequence's end).
  const std::vector<Geometry> geometries = {{4, {12, 18, 1}, {3, 1, 1}, 5}, {16, {300, 70, 1, 129}, {1, 1, 1, 2}, 19}};
  for (const Geometry& geo : geometries)
    for (auto [heads, d, dv] : {std::tuple<int64_t, int64_t, int64_t>{4, 80, 64}, {16, 576, 512}, {3, 24, 16}}) {
      const int block = geo.block;
      const std::vector<int32_t>& ctx = geo.ctx;
      const std::vector<int32_t>& n_new = geo.n_new;
      const int64_t seqs = static_cast<int64_t>(ctx.size()), max_blocks = geo.max_blocks,
                    n_blocks = seqs * max_blocks + 1;
      std::vector<int32_t> perm(n_blocks);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng_);
      Tensor tables = Tensor::zeros({seqs, max_blocks}, DType::kI32);
      for (int64_t i = 0; i < seqs * max_blocks; ++i) tables.data<int32_t>()[i] = perm[i];
      Tensor starts = Tensor::zeros({seqs + 1}, DType::kI32), lens = Tensor::zeros({seqs}, DType::kI32);
      for (int s = 0; s < seqs; ++s) {
        starts.data<int32_t>()[s + 1] = starts.data<int32_t>()[s] + n_new[s];
        lens.data<int32_t>()[s] = ctx[s];
      }
      const int64_t n = starts.data<int32_t>()[seqs];
      Tensor pool = randn({n_blocks * block, d}), q = randn({n, heads, d}, 0.3f), out = Tensor::zeros({n, heads, dv});
      cpu_->paged_latent_attention(q, pool, block, tables, starts, lens, 0.1f, out);
      Tensor gout = gpu_->zeros(out.shape(), DType::kF32);
      gpu_->paged_latent_attention(dev(q), dev(pool), block, dev(tables), dev(starts), dev(lens), 0.1f, gout);
      EXPECT_CLOSE(gout, out, 2e-5) << heads << " heads, row " << d << ", block " << block;
    }
  Tensor src = randn({5, 12}), dst = randn({20, 12}), rows = Tensor::zeros({5}, DType::kI32);
  for (int i = 0; i < 5; ++i) rows.data<int32_t>()[i] = 17 - 3 * i;
  Tensor gdst = dev(dst);
  cpu_->scatter_rows(src, rows, dst);
  gpu_->scatter_rows(dev(src), dev(rows), gdst);
  EXPECT_TRUE(bitwise_equal(gpu_->download(gdst), dst));
  // Into a bf16 pool: rounded to nearest even, the same bits on both.
  Tensor dst16 = randn({20, 12}).to(DType::kBF16);
  Tensor gdst16 = dev(dst16);
  cpu_->scatter_rows(src, rows, dst16);
  gpu_->scatter_rows(dev(src), dev(rows), gdst16);
  EXPECT_TRUE(bitwise_equal(gpu_->download(gdst16), dst16));
  // Rows of a warp's width or more (a block a row; 12 above: a thread a value).
  Tensor wide = randn({5, 40}), wide_dst = randn({20, 40}), gwide_dst = dev(wide_dst);
  cpu_->scatter_rows(wide, rows, wide_dst);
  gpu_->scatter_rows(dev(wide), dev(rows), gwide_dst);
  EXPECT_TRUE(bitwise_equal(gpu_->download(gwide_dst), wide_dst));
}

// A bf16 latent pool: the tensor-core decode kernel (16 heads a block, q and the softmax weights in
// bf16) against the reference over the same bf16 values; padded head blocks (3 and 20 heads), splits
// over long contexts, prefill chunks, scrambled blocks.
TEST_F(CudaBackendTest, PagedLatentAttentionOverABf16Pool) {
  for (const PagedGeometry& geo : paged_geometries())
    for (auto [heads, d, dv] : {std::tuple<int64_t, int64_t, int64_t>{4, 80, 64},
                                {16, 288, 256},
                                {20, 288, 256},
                                {3, 160, 128},
                                {16, 576, 512}}) {
      const PagedBatch b = paged_batch(geo);
      const int block = geo.block;
      const int64_t n = b.n;
      const Tensor &tables = b.tables, &starts = b.starts, &lens = b.lens;
      Tensor pool = randn({b.rows, d}).to(DType::kBF16), q = randn({n, heads, d}, 0.3f),
             out = Tensor::zeros({n, heads, dv});
      cpu_->paged_latent_attention(q, pool, block, tables, starts, lens, 0.1f, out);
      Tensor gout = gpu_->zeros(out.shape(), DType::kF32);
      gpu_->paged_latent_attention(dev(q), dev(pool), block, dev(tables), dev(starts), dev(lens), 0.1f, gout);
      EXPECT_CLOSE(gout, out, 2e-2) << heads << " heads, row " << d << ", block " << block;
      // Deterministic: a second run gives the same bits.
      Tensor again = gpu_->zeros(out.shape(), DType::kF32);
      gpu_->paged_latent_attention(dev(q), dev(pool), block, dev(tables), dev(starts), dev(lens), 0.1f, again);
      EXPECT_TRUE(bitwise_equal(gpu_->download(gout), gpu_->download(again)));
      // Into bf16 (for the bf16 product after it): the f32 result rounded once, bit for bit.
      Tensor gb = gpu_->zeros(out.shape(), DType::kBF16);
      gpu_->paged_latent_attention(dev(q), dev(pool), block, dev(tables), dev(starts), dev(lens), 0.1f, gb);
      EXPECT_TRUE(bitwise_equal(gpu_->download(gb), gpu_->download(gout).to(DType::kBF16))) << heads << " heads";
      Tensor cb = Tensor::zeros(out.shape(), DType::kBF16);
      cpu_->paged_latent_attention(q, pool, block, tables, starts, lens, 0.1f, cb);
      EXPECT_TRUE(bitwise_equal(cb, out.to(DType::kBF16)));
    }
}

// A latent cache's new rows in one pass: the same bits as the norm, rope and scatter one after another
// on the GPU, into f32 and bf16 pools; the CPU reference within rounding.
// fp8 latent rows: the device's quantisation is the reference's, byte for byte: tiles of very different
// magnitudes (zeros, tiny, huge), the scales, the rope key in bf16, the padding; rows not named stay.
TEST_F(CudaBackendTest, ScatterFp8LatentsIsTheReferenceQuantisation) {
  for (auto [r, rd] : {std::pair<int64_t, int64_t>{256, 32}, {512, 64}, {64, 8}}) {
    const Fp8LatentRow f{r, rd};
    const int64_t n = 21, rows = 50;
    Tensor src = randn({n, r + rd});
    const float mags[] = {1.0f, 0.0f, 1e-30f, 3e4f, 2e-3f, 1e30f, 448.0f, 7.0f};
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < r; ++j) src.f32()[i * (r + rd) + j] *= mags[(i + j / kFp8LatentTile) % 8];
    Tensor slots = Tensor::zeros({n}, DType::kI32);
    for (int64_t i = 0; i < n; ++i) slots.data<int32_t>()[i] = static_cast<int32_t>((i * 13 + 5) % rows);
    const Tensor base = random_bytes(rows, f.bytes());
    Tensor want = base.clone(), got = dev(base);
    cpu_->scatter_fp8_latents(src, r, slots, want);
    gpu_->scatter_fp8_latents(dev(src), r, dev(slots), got);
    EXPECT_TRUE(bitwise_equal(gpu_->download(got), want)) << "r " << r << ", rope " << rd;
  }
}

// Attention over fp8 latent rows is the tensor-core kernel over their dequantised values: bitwise the
// same as over a bf16 pool holding those values (f32 and bf16 outputs), through splits over long
// contexts, prefill chunks, scrambled blocks and padded head blocks; and within bf16 rounding of the
// reference over the fp8 rows.
TEST_F(CudaBackendTest, PagedLatentAttentionOverFp8Rows) {
  for (const PagedGeometry& geo : paged_geometries())
    for (auto [heads, d, dv] :
         {std::tuple<int64_t, int64_t, int64_t>{16, 288, 256}, {20, 288, 256}, {3, 576, 512}, {4, 80, 64}}) {
      const PagedBatch b = paged_batch(geo);
      const int block = geo.block;
      const int64_t n = b.n, rows = b.rows;
      const Tensor &tables = b.tables, &starts = b.starts, &lens = b.lens;
      const Fp8LatentRow f{dv, d - dv};
      Tensor values = randn({rows, d}), all = Tensor::zeros({rows}, DType::kI32);
      std::iota(all.data<int32_t>(), all.data<int32_t>() + rows, 0);
      Tensor pool8 = Tensor::zeros({rows, f.bytes()}, DType::kU8);
      cpu_->scatter_fp8_latents(values, dv, all, pool8);
      const Tensor pool16 = dequantized(pool8, dv, d - dv).to(DType::kBF16);  // exact
      Tensor q = randn({n, heads, d}, 0.3f), out = Tensor::zeros({n, heads, dv});
      cpu_->paged_latent_attention(q, pool8, block, tables, starts, lens, 0.1f, out);
      for (DType od : {DType::kF32, DType::kBF16}) {
        Tensor g8 = gpu_->zeros(out.shape(), od), g16 = gpu_->zeros(out.shape(), od);
        gpu_->paged_latent_attention(dev(q), dev(pool8), block, dev(tables), dev(starts), dev(lens), 0.1f, g8);
        gpu_->paged_latent_attention(dev(q), dev(pool16), block, dev(tables), dev(starts), dev(lens), 0.1f, g16);
        EXPECT_TRUE(bitwise_equal(gpu_->download(g8), gpu_->download(g16)))
            << heads << " heads, row " << d << ", block " << block << ", out " << dtype_name(od);
        EXPECT_CLOSE(g8, out, 2e-2) << heads << " heads, row " << d << ", block " << block;
      }
    }
}

// Many rows (training's, prefill's) run in smaller blocks that each do several threads' share of a row
// as a decode step's few rows are split: the same bits either way, so that a decode step's norms and a
// trainer's recompute of the same rows agree.
TEST_F(CudaBackendTest, NormsOfManyRowsAreTheBitsOfFewRows) {
  const int64_t m = 2100, k = 2, n_rows = 2 * m;  // above the many-rows threshold; a few of them alone
  for (int64_t d : {1024, 256, 100, 2048}) {
    Tensor x = dev(randn({m, d})), w = dev(randn({d}, 0.2f)), h0 = randn({m, d}), ys = dev(randn({n_rows, d}));
    Tensor weights = dev(randn({m, k})), row_of = Tensor::zeros({m, k}, DType::kI32);
    for (int64_t i = 0; i < m * k; ++i) row_of.data<int32_t>()[i] = static_cast<int32_t>((i * 7919) % n_rows);
    const Tensor grow_of = dev(row_of);
    const std::string what = "d " + std::to_string(d);
    // All rows at once.
    Tensor y = gpu_->zeros({m, d}, DType::kBF16), r = gpu_->zeros({m}, DType::kF32);
    gpu_->rmsnorm_forward(x, w, 1e-6f, y, r);
    Tensor h = dev(h0), ya = gpu_->zeros({m, d}, DType::kBF16), ra = gpu_->zeros({m}, DType::kF32);
    gpu_->add_rmsnorm_forward(x, h, w, 1e-6f, ya, ra);
    Tensor hc = dev(h0), yc = gpu_->zeros({m, d}, DType::kBF16), rc = gpu_->zeros({m}, DType::kF32);
    gpu_->moe_combine_add_rmsnorm(ys, weights, grow_of, x, hc, w, 1e-6f, yc, rc);
    // A few rows at a time, as a decode step has them.
    for (int64_t r0 : {int64_t{0}, int64_t{1013}, m - 5}) {
      const int64_t rows = 5;
      Tensor y1 = gpu_->zeros({rows, d}, DType::kBF16), r1 = gpu_->zeros({rows}, DType::kF32);
      gpu_->rmsnorm_forward(x.slice(0, r0, rows), w, 1e-6f, y1, r1);
      EXPECT_TRUE(bitwise_equal(gpu_->download(y1), gpu_->download(y.slice(0, r0, rows)))) << what;
      EXPECT_TRUE(bitwise_equal(gpu_->download(r1), gpu_->download(r.slice(0, r0, rows)))) << what;
      Tensor h1 = dev(h0.slice(0, r0, rows).clone()), ya1 = gpu_->zeros({rows, d}, DType::kBF16),
             ra1 = gpu_->zeros({rows}, DType::kF32);
      gpu_->add_rmsnorm_forward(x.slice(0, r0, rows), h1, w, 1e-6f, ya1, ra1);
      EXPECT_TRUE(bitwise_equal(gpu_->download(ya1), gpu_->download(ya.slice(0, r0, rows)))) << what << " (add)";
      EXPECT_TRUE(bitwise_equal(gpu_->download(h1), gpu_->download(h.slice(0, r0, rows)))) << what << " (add)";
      Tensor hc1 = dev(h0.slice(0, r0, rows).clone()), yc1 = gpu_->zeros({rows, d}, DType::kBF16),
             rc1 = gpu_->zeros({rows}, DType::kF32);
      gpu_->moe_combine_add_rmsnorm(ys, weights.slice(0, r0, rows), grow_of.slice(0, r0, rows), x.slice(0, r0, rows),
                                    hc1, w, 1e-6f, yc1, rc1);
      EXPECT_TRUE(bitwise_equal(gpu_->download(yc1), gpu_->download(yc.slice(0, r0, rows)))) << what << " (combine)";
      EXPECT_TRUE(bitwise_equal(gpu_->download(rc1), gpu_->download(rc.slice(0, r0, rows)))) << what << " (combine)";
    }
  }
}

TEST_F(CudaBackendTest, StoreLatentsIsNormRopeAndScatter) {
  const int64_t n = 37, r = 256, rd = 32, rows = 100, npos = 64;
  RopeTable t{randn({npos, rd / 2}), randn({npos, rd / 2})};
  RopeTable gt{dev(t.cos), dev(t.sin)};
  Tensor wide = randn({n, r + rd + 8}), w = randn({r}, 0.3f), pos = ids({n}, npos);
  Tensor slots = Tensor::zeros({n}, DType::kI32);
  for (int64_t i = 0; i < n; ++i) slots.data<int32_t>()[i] = static_cast<int32_t>((i * 7) % rows);
  const Tensor ckv = wide.slice(1, 0, r + rd), gckv = dev(wide).slice(1, 0, r + rd);
  for (bool interleaved : {false, true})
    for (DType dt : {DType::kF32, DType::kBF16, DType::kU8}) {
      // U8: fp8 rows (core/latent_rows.h), their bytes the same as the steps' (the fused kernel's values
      // are the same bits, quantised alike), their values within E4M3's rounding of the reference's.
      const bool fp8 = dt == DType::kU8;
      Tensor base = fp8 ? random_bytes(rows, Fp8LatentRow{r, rd}.bytes()) : randn({rows, r + rd}).to(dt);
      Tensor fused = dev(base), steps = dev(base), want = base.clone();
      gpu_->store_latents(gckv, dev(w), 1e-6f, dev(pos), gt, interleaved, dev(slots), fused);
      gpu_->Backend::store_latents(gckv, dev(w), 1e-6f, dev(pos), gt, interleaved, dev(slots), steps);
      EXPECT_TRUE(bitwise_equal(gpu_->download(fused), gpu_->download(steps))) << interleaved << " " << dtype_name(dt);
      cpu_->store_latents(ckv, w, 1e-6f, pos, t, interleaved, slots, want);
      if (fp8) {  // the rows written (the others hold random bytes, NaN codes among them)
        const auto written = [&](const Tensor& pool) {
          const Tensor all = dequantized(pool, r, rd);
          Tensor out = Tensor::zeros({n, r + rd});
          for (int64_t i = 0; i < n; ++i)
            std::copy_n(all.f32() + slots.data<int32_t>()[i] * (r + rd), r + rd, out.f32() + i * (r + rd));
          return out;
        };
        EXPECT_LT(max_rel(*gpu_, written(fused), written(want)), 7e-2) << interleaved;
      } else {
        EXPECT_LT(max_rel(*gpu_, fused, want), dt == DType::kF32 ? 1e-5 : 8e-3) << interleaved;
      }
    }
}

// The decode step's attention inputs in one pass: the same bits as store_latents, rope_from and a copy
// into bf16, on strided queries (the projection's output, heads of nope + rope).
TEST_F(CudaBackendTest, MlaStepInputsIsStoreRopeAndCopy) {
  const int64_t n = 37, r = 256, rd = 32, rows = 100, npos = 64, heads = 16, nope = 64;
  RopeTable t{randn({npos, rd / 2}), randn({npos, rd / 2})};
  RopeTable gt{dev(t.cos), dev(t.sin)};
  Tensor wide = randn({n, r + rd + 8}), w = randn({r}, 0.3f), pos = ids({n}, npos);
  Tensor slots = Tensor::zeros({n}, DType::kI32);
  for (int64_t i = 0; i < n; ++i) slots.data<int32_t>()[i] = static_cast<int32_t>((i * 7) % rows);
  const Tensor gckv = dev(wide).slice(1, 0, r + rd);
  // Queries as the projection leaves them: rows of heads · (nope + rope) and then more.
  const Tensor gwide = dev(randn({n, heads * (nope + rd) + 40}));
  const Tensor gq(gwide.storage(), gwide.byte_offset(), {n, heads, nope + rd}, {gwide.stride(0), nope + rd, 1},
                  DType::kF32);
  for (bool interleaved : {false, true})
    for (DType dt : {DType::kF32, DType::kBF16, DType::kU8}) {
      const Tensor base =
          dt == DType::kU8 ? random_bytes(rows, Fp8LatentRow{r, rd}.bytes()) : randn({rows, r + rd}).to(dt);
      Tensor fused = dev(base), steps = dev(base);
      // q_rot inside a wider row, as the absorbed queries hold it.
      Tensor rot1 = gpu_->zeros({n, heads, r + rd}, DType::kF32), rot2 = gpu_->zeros({n, heads, r + rd}, DType::kF32);
      Tensor qr1 = rot1.slice(2, r, rd), qr2 = rot2.slice(2, r, rd);
      Tensor qn1 = gpu_->zeros({n, heads, nope}, DType::kBF16), qn2 = gpu_->zeros({n, heads, nope}, DType::kBF16);
      gpu_->mla_step_inputs(gckv, dev(w), 1e-6f, dev(pos), gt, interleaved, dev(slots), fused, gq, qr1, qn1);
      gpu_->Backend::mla_step_inputs(gckv, dev(w), 1e-6f, dev(pos), gt, interleaved, dev(slots), steps, gq, qr2, qn2);
      EXPECT_TRUE(bitwise_equal(gpu_->download(fused), gpu_->download(steps))) << interleaved;
      EXPECT_TRUE(bitwise_equal(gpu_->download(rot1), gpu_->download(rot2))) << interleaved;
      EXPECT_TRUE(bitwise_equal(gpu_->download(qn1), gpu_->download(qn2))) << interleaved;
    }
}

TEST_F(CudaBackendTest, MoeRouterAllMethodsForwardBackward) {
  using M = RouterConfig::TopkMethod;
  using S = RouterConfig::Scoring;
  struct Case {
    S scoring;
    M method;
    int e, k, groups, topk_groups;
    bool norm;
  };
  for (const Case& c :
       {Case{S::kSigmoid, M::kNoauxTc, 8, 2, 2, 1, true}, Case{S::kSigmoid, M::kNoauxTc, 256, 8, 8, 4, true},
        Case{S::kSoftmax, M::kGreedy, 64, 6, 1, 1, false},
        Case{S::kSoftmax, M::kGroupLimitedGreedy, 160, 6, 8, 3, false},
        Case{S::kSigmoid, M::kGreedy, 32, 4, 1, 1, true}}) {
    RouterConfig cfg;
    cfg.scoring = c.scoring;
    cfg.method = c.method;
    cfg.n_experts = c.e;
    cfg.top_k = c.k;
    cfg.n_group = c.groups;
    cfg.topk_group = c.topk_groups;
    cfg.norm_topk_prob = c.norm;
    cfg.routed_scaling_factor = 2.5f;
    const int64_t m = 333;
    Tensor logits = randn({m, c.e}, 2.0f), bias = randn({c.e}, 0.1f);
    Tensor idx = Tensor::zeros({m, c.k}, DType::kI32), w = Tensor::zeros({m, c.k}), sc = Tensor::zeros({m, c.e});
    cpu_->moe_route(logits, bias, cfg, idx, w, sc);
    Tensor gidx = gpu_->zeros(idx.shape(), DType::kI32), gw = gpu_->zeros(w.shape(), DType::kF32),
           gsc = gpu_->zeros(sc.shape(), DType::kF32);
    gpu_->moe_route(dev(logits), dev(bias), cfg, gidx, gw, gsc);
    EXPECT_TRUE(bitwise_equal(gpu_->download(gidx), idx)) << c.e << " experts";
    EXPECT_CLOSE(gw, w, 1e-5);
    EXPECT_CLOSE(gsc, sc, 1e-5);
    Tensor dw = randn({m, c.k}), dl = randn({m, c.e}), gdl = dev(dl);
    cpu_->moe_route_backward(dw, sc, idx, cfg, dl);
    gpu_->moe_route_backward(dev(dw), gsc, gidx, cfg, gdl);
    EXPECT_CLOSE(gdl, dl, 1e-5);
  }
}

// The router and the shared experts' gated activation in one pass (moe_route_and_gate, as decode runs
// them over one product's [logits | g | u] rows): the same bits as moe_route then silu_mul_forward, into
// f32, and into bf16 from the products rounded to bf16 (as a training forward keeps them), with
// intermediate sizes the fused kernel takes (multiples of 4) and one it leaves to the two ops.
TEST_F(CudaBackendTest, MoeRouteAndGateIsRouteThenSiluMul) {
  RouterConfig cfg;
  cfg.n_experts = 32;
  cfg.top_k = 4;
  for (const int64_t m : {1, 37, 256}) {
    for (const int64_t inter : {1024, 1100, 2052, 66}) {
      const int64_t e = cfg.n_experts;
      Tensor rows = dev(randn({m, e + 2 * inter}, 2.0f)), bias = dev(randn({e}, 0.1f));
      const Tensor logits = rows.slice(1, 0, e), gu = rows.slice(1, e, 2 * inter);
      for (DType ad : {DType::kF32, DType::kBF16}) {
        Tensor i1 = gpu_->zeros({m, 4}, DType::kI32), w1 = gpu_->zeros({m, 4}), s1 = gpu_->zeros({m, e}),
               h1 = gpu_->zeros({m, inter}, ad);
        Tensor i2 = gpu_->zeros({m, 4}, DType::kI32), w2 = gpu_->zeros({m, 4}), s2 = gpu_->zeros({m, e}),
               h2 = gpu_->zeros({m, inter}, ad);
        gpu_->moe_route_and_gate(logits, bias, cfg, i1, w1, s1, gu, h1);
        gpu_->moe_route(logits, bias, cfg, i2, w2, s2);
        Tensor gu_kept = gpu_->empty({m, 2 * inter}, ad);
        gpu_->copy(gu, gu_kept);
        gpu_->silu_mul_forward(gu_kept, h2);
        for (auto [a, b] : {std::pair{i1, i2}, {w1, w2}, {s1, s2}, {h1, h2}})
          EXPECT_TRUE(bitwise_equal(gpu_->download(a), gpu_->download(b))) << "m " << m << ", inter " << inter;
      }
    }
  }
}

// 800 assignments (each dispatch block counts for itself), then 2800 and 20000 (ranks in chunks of 256
// first, then one scan for the chunks' first rows: over more than one tile of the scan at 20000).
TEST_F(CudaBackendTest, MoeDispatchCombineForwardBackward) {
  for (const int64_t m : {200, 700, 5000}) {
    const int64_t k = 4, h = 40, e = 16;
    Tensor x = randn({m, h}), idx = Tensor::zeros({m, k}, DType::kI32);
    // Distinct experts per token, skewed toward low ids, one expert never used.
    std::uniform_int_distribution<int> u(0, e - 2);
    for (int64_t i = 0; i < m; ++i) {
      std::vector<int> pick;
      while (static_cast<int64_t>(pick.size()) < k) {
        const int v = std::min(u(rng_), u(rng_));
        if (std::find(pick.begin(), pick.end(), v) == pick.end()) pick.push_back(v);
      }
      for (int64_t j = 0; j < k; ++j) idx.data<int32_t>()[i * k + j] = pick[j];
    }
    Tensor row_of = Tensor::zeros({m * k}, DType::kI32), token_of = Tensor::zeros({m * k}, DType::kI32);
    Tensor off, goff;
    cpu_->moe_dispatch(idx, e, row_of, token_of, off);
    Tensor grow = gpu_->empty(row_of.shape(), DType::kI32), gtok = gpu_->empty(token_of.shape(), DType::kI32);
    gpu_->moe_dispatch(dev(idx), e, grow, gtok, goff);
    EXPECT_TRUE(bitwise_equal(gpu_->download(goff), off));
    EXPECT_TRUE(bitwise_equal(gpu_->download(grow), row_of));
    EXPECT_TRUE(bitwise_equal(gpu_->download(gtok), token_of));
    // Rows gathered through token_of, f32 and bf16, move as they are.
    Tensor xs = Tensor::zeros({m * k, h}), gxs = gpu_->empty(xs.shape(), DType::kF32);
    cpu_->gather_rows(x, token_of, xs);
    gpu_->gather_rows(dev(x), gtok, gxs);
    EXPECT_TRUE(bitwise_equal(gpu_->download(gxs), xs));
    Tensor xb = x.clone().to(DType::kBF16), xsb = Tensor::zeros(xs.shape(), DType::kBF16);
    Tensor gxsb = gpu_->empty(xs.shape(), DType::kBF16);
    cpu_->gather_rows(xb, token_of, xsb);
    gpu_->gather_rows(dev(xb), gtok, gxsb);
    EXPECT_TRUE(bitwise_equal(xsb, xs.clone().to(DType::kBF16)));
    EXPECT_TRUE(bitwise_equal(gpu_->download(gxsb), xsb));
    // One value a row (the routing weights' gradients by assignment): a thread a value.
    Tensor vals = randn({m * k, 1}), picked = Tensor::zeros({m * k, 1}), gpicked = gpu_->empty({m * k, 1}, DType::kF32);
    cpu_->gather_rows(vals, row_of, picked);
    gpu_->gather_rows(dev(vals), grow, gpicked);
    EXPECT_TRUE(bitwise_equal(gpu_->download(gpicked), picked));
    Tensor dxs = randn({m * k, h}), dx = randn({m, h}), gdx = dev(dx);
    cpu_->moe_dispatch_backward(dxs, row_of, dx);
    gpu_->moe_dispatch_backward(dev(dxs), grow, gdx);
    EXPECT_CLOSE(gdx, dx, 1e-6);
    // written (accumulate false): the sums alone, the old values (noise) not read
    Tensor fresh = Tensor::zeros({m, h}), gfresh = dev(randn({m, h}));
    cpu_->moe_dispatch_backward(dxs, row_of, fresh);
    gpu_->moe_dispatch_backward(dev(dxs), grow, gfresh, /*accumulate=*/false);
    EXPECT_TRUE(bitwise_equal(gpu_->download(gfresh), fresh));
    // bf16 rows (the experts' input gradients of bf16 products): as their values in f32, bitwise, on both
    // backends.
    const Tensor dxsr = dxs.clone().to(DType::kBF16), dx0 = randn({m, h});
    Tensor c1 = dx0.clone(), c2 = dx0.clone(), g1 = dev(dx0), g2 = dev(dx0),
           gdxsb = gpu_->zeros(dxs.shape(), DType::kBF16);
    gpu_->upload(dxsr, gdxsb);
    cpu_->moe_dispatch_backward(dxsr, row_of, c1);
    cpu_->moe_dispatch_backward(dxsr.to_f32(), row_of, c2);
    gpu_->moe_dispatch_backward(gdxsb, grow, g1);
    gpu_->moe_dispatch_backward(dev(dxsr.to_f32()), grow, g2);
    EXPECT_TRUE(bitwise_equal(c1, c2));
    EXPECT_TRUE(bitwise_equal(gpu_->download(g1), gpu_->download(g2)));
    EXPECT_CLOSE(g1, c1, 1e-6);
    Tensor ys = randn({m * k, h}), w = randn({m, k}), out = randn({m, h}), gout = dev(out);
    cpu_->moe_combine(ys, w, row_of, out);
    gpu_->moe_combine(dev(ys), dev(w), grow, gout);
    EXPECT_CLOSE(gout, out, 1e-6);
    // bf16 expert outputs (bf16 products round them once): as their values in f32, bitwise, both ways.
    const Tensor ysr = ys.clone().to(DType::kBF16);
    Tensor gysb = gpu_->zeros(ys.shape(), DType::kBF16);
    gpu_->upload(ysr, gysb);
    Tensor o1 = dev(out), o2 = dev(out);
    gpu_->moe_combine(gysb, dev(w), grow, o1);
    gpu_->moe_combine(dev(ysr.to_f32()), dev(w), grow, o2);
    EXPECT_TRUE(bitwise_equal(gpu_->download(o1), gpu_->download(o2)));
    Tensor gd1 = gpu_->zeros({m * k, h}, DType::kF32), gd2 = gpu_->zeros({m * k, h}, DType::kF32);
    Tensor gw1 = gpu_->zeros({m, k}, DType::kF32), gw2 = gpu_->zeros({m, k}, DType::kF32);
    const Tensor gdo = dev(randn({m, h}));
    gpu_->moe_combine_backward(gdo, gysb, dev(w), grow, gd1, gw1);
    gpu_->moe_combine_backward(gdo, dev(ysr.to_f32()), dev(w), grow, gd2, gw2);
    EXPECT_TRUE(bitwise_equal(gpu_->download(gw1), gpu_->download(gw2)));
    EXPECT_TRUE(bitwise_equal(gpu_->download(gd1), gpu_->download(gd2)));
    Tensor dout = randn({m, h}), dys = randn({m * k, h}), dwt = randn({m, k}), gdys = dev(dys), gdwt = dev(dwt);
    cpu_->moe_combine_backward(dout, ys, w, row_of, dys, dwt);
    gpu_->moe_combine_backward(dev(dout), dev(ys), dev(w), grow, gdys, gdwt);
    EXPECT_CLOSE(gdys, dys, 1e-6);
    EXPECT_CLOSE(gdwt, dwt, 1e-5);
    // dys into bf16: the f32 gradient rounded once; dweights the same.
    Tensor gdysb = gpu_->zeros({m * k, h}, DType::kBF16), gdwt2 = gpu_->zeros({m, k}, DType::kF32);
    gpu_->moe_combine_backward(dev(dout), dev(ys), dev(w), grow, gdysb, gdwt2);
    EXPECT_TRUE(bitwise_equal(gpu_->download(gdysb), gpu_->download(gdys).to(DType::kBF16)));
    EXPECT_TRUE(bitwise_equal(gpu_->download(gdwt2), gpu_->download(gdwt)));
  }
}

// A MoE layer's end and the next norm in one pass (moe_combine_add_rmsnorm, as decode runs them): the
// same bits as moe_combine then add_rmsnorm_forward, for f32 and bf16 expert rows, bf16 and f32 normed
// outputs, rows a thread keeps in registers or reads twice; and the CPU's composition within f32 rounding.
TEST_F(CudaBackendTest, MoeCombineAddRmsNormIsCombineThenAddNorm) {
  for (int64_t d : {1024, 100, 3000}) {
    const int64_t m = 13, k = 4;
    std::vector<int32_t> perm(m * k);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng_);
    Tensor row_of = Tensor::zeros({m * k}, DType::kI32);
    std::copy(perm.begin(), perm.end(), row_of.data<int32_t>());
    const Tensor ys = randn({m * k, d}), weights = randn({m, k}, 0.5f), x = randn({m, d}), h = randn({m, d}),
                 w = randn({d}, 0.3f);
    for (DType yd : {DType::kF32, DType::kBF16})
      for (DType od : {DType::kF32, DType::kBF16}) {
        Tensor gys = dev(ys.to(yd));
        Tensor h1 = dev(h), h2 = dev(h), y1 = gpu_->zeros({m, d}, od), y2 = gpu_->zeros({m, d}, od);
        Tensor r1 = gpu_->zeros({m}), r2 = gpu_->zeros({m});
        gpu_->moe_combine_add_rmsnorm(gys, dev(weights), dev(row_of), dev(x), h1, dev(w), 1e-6f, y1, r1);
        gpu_->Backend::moe_combine_add_rmsnorm(gys, dev(weights), dev(row_of), dev(x), h2, dev(w), 1e-6f, y2, r2);
        EXPECT_TRUE(bitwise_equal(gpu_->download(h1), gpu_->download(h2))) << "d " << d;
        EXPECT_TRUE(bitwise_equal(gpu_->download(y1), gpu_->download(y2))) << "d " << d;
        EXPECT_TRUE(bitwise_equal(gpu_->download(r1), gpu_->download(r2))) << "d " << d;
        // The new h rounded for a backward (training's fused forward): the same results, and h rounded.
        Tensor h3 = dev(h), y3 = gpu_->zeros({m, d}, od), r3 = gpu_->zeros({m});
        Tensor h16 = gpu_->zeros({m, d}, DType::kBF16), want16 = gpu_->zeros({m, d}, DType::kBF16);
        gpu_->moe_combine_add_rmsnorm(gys, dev(weights), dev(row_of), dev(x), h3, dev(w), 1e-6f, y3, r3, &h16);
        gpu_->copy(h1, want16);
        EXPECT_TRUE(bitwise_equal(gpu_->download(h3), gpu_->download(h1))) << "d " << d;
        EXPECT_TRUE(bitwise_equal(gpu_->download(y3), gpu_->download(y1))) << "d " << d;
        EXPECT_TRUE(bitwise_equal(gpu_->download(h16), gpu_->download(want16))) << "d " << d;
        Tensor ch = h.clone(), cy = Tensor::zeros({m, d}), cr = Tensor::zeros({m});
        cpu_->moe_combine_add_rmsnorm(ys.to(yd), weights, row_of, x, ch, w, 1e-6f, cy, cr);
        EXPECT_CLOSE(h1, ch, 1e-5) << "d " << d;
        EXPECT_CLOSE(y1, cy, od == DType::kF32 ? 1e-5 : 8e-3) << "d " << d;
      }
  }
}

// The clipped-ratio loss's per-token gradient against the CPU reference: ratios inside and far outside
// the clip range on both sides, both signs of advantage, zero coefficients, the KL term on and off, and
// ratio_one.
TEST_F(CudaBackendTest, ClippedRatioGradMatchesCpu) {
  const int64_t n = 1000;
  Tensor lp = randn({n}, 0.5f), rows = randn({n, 4}, 0.5f);
  for (int64_t i = 0; i < n; ++i) {
    float* r = rows.f32() + 4 * i;
    r[0] = lp.f32()[i] + (i % 3 == 0 ? 0.02f * r[0] : r[0]);  // old: near, or far from lp
    r[3] = i % 7 == 0 ? 0.0f : std::fabs(r[3]) + 0.01f;       // coefficient
  }
  for (double beta : {0.0, 0.04}) {
    for (bool one : {false, true}) {
      ClippedRatioLoss loss;
      loss.kl_beta = beta;
      loss.ratio_one = one;
      loss.eps_high = 0.28;
      Tensor want = Tensor::zeros({n}), got = gpu_->zeros({n}, DType::kF32);
      cpu_->clipped_ratio_grad(lp, rows, loss, want);
      gpu_->clipped_ratio_grad(dev(lp), dev(rows), loss, got);
      EXPECT_CLOSE(got, want, 1e-6) << "beta " << beta << " ratio_one " << one;
      int zeros = 0;
      for (int64_t i = 0; i < n; ++i) zeros += want.f32()[i] == 0.0f;
      EXPECT_GT(zeros, n / 7 - 1);  // the zero coefficients at least
      EXPECT_LT(zeros, n / 2);
    }
  }
}

TEST_F(CudaBackendTest, LogprobsForwardBackward) {
  for (auto [m, v] : {std::pair<int64_t, int64_t>{3, 10}, {77, 1024}, {16, 32768}}) {
    Tensor logits = randn({m, v}, 4.0f), tg = ids({m}, static_cast<int32_t>(v));
    for (int j = 0; j < 5; ++j) logits.f32()[j] = -INFINITY;  // masked tokens in row 0 (not its target)
    tg.data<int32_t>()[0] = static_cast<int32_t>(v - 1);
    Tensor lp = Tensor::zeros({m}), lse = Tensor::zeros({m});
    cpu_->logprobs_forward(logits, tg, lp, lse);
    Tensor gl = dev(logits), gtg = dev(tg), glp = gpu_->zeros({m}, DType::kF32), glse = gpu_->zeros({m}, DType::kF32);
    gpu_->logprobs_forward(gl, gtg, glp, glse);
    EXPECT_CLOSE(glp, lp, 1e-5);
    EXPECT_CLOSE(glse, lse, 1e-6);
    Tensor dlp = randn({m}), dl = randn({m, v});
    dlp.f32()[0] = 0.0f;  // a row without gradient is written zero
    Tensor gdl = dev(dl);
    cpu_->logprobs_backward(dlp, logits, tg, lse, dl);
    gpu_->logprobs_backward(dev(dlp), gl, gtg, glse, gdl);
    EXPECT_CLOSE(gdl, dl, 1e-5);
    // Into bf16 (only bf16 products read it): the f32 gradient rounded once.
    Tensor gdlb = gpu_->zeros({m, v}, DType::kBF16);
    gpu_->logprobs_backward(dev(dlp), gl, gtg, glse, gdlb);
    EXPECT_TRUE(bitwise_equal(gpu_->download(gdlb), gpu_->download(gdl).to(DType::kBF16)));
    // Entropy and argmax (over finite logits); row 1 has its maximum twice (the first index wins).
    for (int j = 0; j < 5; ++j) logits.f32()[j] = 0.5f;
    logits.f32()[v + v - 1] = logits.f32()[v + 1] = 100.0f;
    gl = dev(logits);
    cpu_->logprobs_forward(logits, tg, lp, lse);
    gpu_->logprobs_forward(gl, gtg, glp, glse);
    Tensor h = Tensor::zeros({m}), am = Tensor::zeros({m}, DType::kI32);
    Tensor gh = gpu_->zeros({m}, DType::kF32), gam = gpu_->zeros({m}, DType::kI32);
    cpu_->logit_stats(logits, lse, h, am);
    gpu_->logit_stats(gl, glse, gh, gam);
    EXPECT_CLOSE(gh, h, 1e-5);
    EXPECT_EQ(am.data<int32_t>()[1], 1);
    const Tensor gam_host = gpu_->download(gam);
    for (int64_t i = 0; i < m; ++i) EXPECT_EQ(gam_host.data<int32_t>()[i], am.data<int32_t>()[i]) << "row " << i;
  }
}

// Sampling: the same picks as the CPU reference for the same draws (a pick may differ only where the
// f32 and f64 sums put the draw on different sides of a token boundary), every cut, ties at the cuts,
// the exact logprob, and bitwise-repeatable results.
TEST_F(CudaBackendTest, SampleTokensMatchesTheReference) {
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  for (auto [m, v] : {std::pair<int64_t, int64_t>{3, 10}, {24, 1000}, {12, 32768}, {4, 129280}}) {
    Tensor logits = randn({m, v}, 3.0f);
    for (int64_t i = 0; i < m * v; ++i) logits.f32()[i] = std::round(logits.f32()[i] * 8.0f) / 8.0f;  // ties
    const int64_t n = 8 * m;
    Tensor spec = Tensor::zeros({n, kSampleSpecColumns});
    for (int64_t s = 0; s < n; ++s) {
      float* q = spec.f32() + s * kSampleSpecColumns;
      q[kSpecRow] = static_cast<float>(s % m);
      const int kind = static_cast<int>(s % 8);  // greedy, plain, top-k, top-p, min-p, all, k=1, cold
      q[kSpecTemperature] = kind == 0 ? 0.0f : kind == 7 ? 0.05f : 0.5f + unit(rng_);
      q[kSpecTopP] = kind == 3 || kind == 5 ? 0.3f + 0.6f * unit(rng_) : 1.0f;
      q[kSpecTopK] = kind == 2 || kind == 5 ? static_cast<float>(1 + static_cast<int64_t>(unit(rng_) * 50))
                     : kind == 6            ? 1.0f
                                            : 0.0f;
      q[kSpecMinP] = kind == 4 || kind == 5 ? 0.2f * unit(rng_) : 0.0f;
      q[kSpecUniform] = unit(rng_);
    }
    Tensor tok = Tensor::zeros({n}, DType::kI32), lp = Tensor::zeros({n});
    cpu_->sample_tokens(logits, spec, tok, lp);
    Tensor gl = dev(logits), gs = dev(spec);
    Tensor gt = gpu_->zeros({n}, DType::kI32), glp = gpu_->zeros({n}, DType::kF32);
    gpu_->sample_tokens(gl, gs, gt, glp);
    const Tensor got = gpu_->download(gt), got_lp = gpu_->download(glp);
    int64_t same = 0;
    for (int64_t s = 0; s < n; ++s) {
      const int32_t g = got.data<int32_t>()[s], c = tok.data<int32_t>()[s];
      ASSERT_TRUE(g >= 0 && g < v) << "spec " << s;
      const int64_t row = s % m;
      // Its logprob is exact whichever token it is.
      double z = 0;
      const float* l = logits.f32() + row * v;
      const float mx = *std::max_element(l, l + v);
      for (int64_t j = 0; j < v; ++j) z += std::exp(static_cast<double>(l[j]) - mx);
      EXPECT_NEAR(got_lp.f32()[s], l[g] - mx - std::log(z), 1e-4) << "spec " << s;
      if (g == c) {
        ++same;
        continue;
      }
      const float* q = spec.f32() + s * kSampleSpecColumns;
      EXPECT_NE(q[kSpecTemperature], 0.0f) << "greedy differs at spec " << s;
      EXPECT_NE(q[kSpecTopK], 1.0f) << "top-1 differs at spec " << s;
    }
    EXPECT_GE(same, n - std::max<int64_t>(1, n / 50)) << "v = " << v;
    // Bitwise repeatable.
    Tensor gt2 = gpu_->zeros({n}, DType::kI32), glp2 = gpu_->zeros({n}, DType::kF32);
    gpu_->sample_tokens(gl, gs, gt2, glp2);
    EXPECT_TRUE(bitwise_equal(gpu_->download(gt2), got));
    EXPECT_TRUE(bitwise_equal(gpu_->download(glp2), got_lp));
  }
}

// Cuts inside a tie keep the lower ids, on both backends: four equal maxima at ids 3, 5, 7, 9.
TEST_F(CudaBackendTest, SampleTokensCutTiesInVocabularyOrder) {
  const int64_t v = 1000;
  Tensor logits = randn({1, v});
  for (int64_t j : {3, 5, 7, 9}) logits.f32()[j] = 40.0f;
  struct Case {
    float temperature, top_p, top_k, min_p;
    std::vector<int32_t> allowed;
  };
  const std::vector<Case> cases = {{0.0f, 1.0f, 0.0f, 0.0f, {3}},          {1.0f, 1.0f, 2.0f, 0.0f, {3, 5}},
                                   {1.0f, 1.0f, 3.0f, 0.0f, {3, 5, 7}},    {1.0f, 0.3f, 0.0f, 0.0f, {3, 5}},
                                   {1.0f, 0.6f, 0.0f, 0.0f, {3, 5, 7}},    {1.0f, 0.6f, 2.0f, 0.0f, {3, 5}},
                                   {1.0f, 1.0f, 0.0f, 0.5f, {3, 5, 7, 9}}, {1.0f, 0.6f, 0.0f, 0.5f, {3, 5, 7}}};
  const int64_t draws = 32, n = draws * static_cast<int64_t>(cases.size());
  Tensor spec = Tensor::zeros({n, kSampleSpecColumns});
  for (int64_t s = 0; s < n; ++s) {
    const Case& c = cases[static_cast<size_t>(s / draws)];
    float* q = spec.f32() + s * kSampleSpecColumns;
    q[kSpecTemperature] = c.temperature;
    q[kSpecTopP] = c.top_p;
    q[kSpecTopK] = c.top_k;
    q[kSpecMinP] = c.min_p;
    q[kSpecUniform] = (static_cast<float>(s % draws) + 0.5f) / draws;
  }
  Tensor tok = Tensor::zeros({n}, DType::kI32), lp = Tensor::zeros({n});
  cpu_->sample_tokens(logits, spec, tok, lp);
  Tensor gt = gpu_->zeros({n}, DType::kI32), glp = gpu_->zeros({n}, DType::kF32);
  gpu_->sample_tokens(dev(logits), dev(spec), gt, glp);
  const Tensor got = gpu_->download(gt);
  for (int64_t s = 0; s < n; ++s) {
    const Case& c = cases[static_cast<size_t>(s / draws)];
    const int32_t g = got.data<int32_t>()[s];
    EXPECT_EQ(g, tok.data<int32_t>()[s]) << "spec " << s;
    EXPECT_NE(std::find(c.allowed.begin(), c.allowed.end(), g), c.allowed.end()) << "spec " << s << " picked " << g;
    // The draws spread over the allowed set: the last draw of a case lands on its last allowed id.
    if (s % draws == draws - 1) {
      EXPECT_EQ(g, c.allowed.back()) << "spec " << s;
    }
  }
}

TEST_F(CudaBackendTest, OptimizerSumSquaresAndAdamW) {
  const int64_t n = 300000;
  // The last span starts and ends off a 16-byte boundary (the kernels' 4-at-a-time bodies).
  const std::vector<ParamSpan> spans = {{0, 1000, false}, {1000, 200000, true}, {250001, 49998, true}};
  Tensor g = randn({n}), w = randn({n}), m = randn({n}, 0.01f), v = randn({n}, 0.01f);
  for (int64_t i = 0; i < n; ++i) v.f32()[i] = std::fabs(v.f32()[i]);
  const double sq = cpu_->sum_squares(g, spans);
  EXPECT_NEAR(gpu_->sum_squares(dev(g), spans) / sq, 1.0, 1e-12);
  AdamWUpdate u;
  u.lr = 3e-3;
  u.weight_decay = 0.1;
  u.bias_correction1 = 0.19;
  u.bias_correction2 = 0.0975;
  u.grad_scale = 0.5;
  Tensor gw = dev(w), gm = dev(m), gv = dev(v);
  cpu_->adamw_update(w, g, m, v, spans, u);
  gpu_->adamw_update(gw, dev(g), gm, gv, spans, u);
  EXPECT_CLOSE(gw, w, 1e-6);
  EXPECT_CLOSE(gm, m, 1e-6);
  EXPECT_CLOSE(gv, v, 1e-6);
  // With a bf16 copy to keep current: the spans' new weights rounded, the rest of the copy untouched.
  Tensor r0 = randn({n}).to(DType::kBF16), gr = gpu_->zeros({n}, DType::kBF16), cr = r0.clone();
  gpu_->upload(r0, gr);
  Tensor gw2 = dev(w), gm2 = dev(m), gv2 = dev(v);  // the state after the first update
  Tensor w2 = w.clone(), m2 = m.clone(), v2 = v.clone();
  gpu_->adamw_update(gw2, dev(g), gm2, gv2, spans, u, &gr);
  cpu_->adamw_update(w2, g, m2, v2, spans, u, &cr);
  const Tensor want = gpu_->download(gw2).to(DType::kBF16), got = gpu_->download(gr);
  for (int64_t i = 0; i < n; ++i) {
    const bool in = std::any_of(spans.begin(), spans.end(),
                                [&](const ParamSpan& s) { return i >= s.offset && i < s.offset + s.numel; });
    const uint16_t expect = in ? want.data<uint16_t>()[i] : r0.data<uint16_t>()[i];
    ASSERT_EQ(got.data<uint16_t>()[i], expect) << "element " << i << (in ? " (in a span)" : " (outside)");
  }
  for (const ParamSpan& s : spans)
    for (int64_t i = s.offset; i < s.offset + s.numel; ++i)
      ASSERT_EQ(cr.data<uint16_t>()[i], f32_to_bf16(w2.f32()[i])) << "CPU copy, element " << i;
  Tensor bad = g.clone();
  bad.f32()[1500] = NAN;
  EXPECT_TRUE(std::isnan(gpu_->sum_squares(dev(bad), spans)));
}

// ---- the whole model

class CudaModelTest : public CudaBackendTest {
 protected:
  std::string fixture() const { return testing::fixtures_dir() + "/tiny_a"; }
  // The bf16 path: tensor-core products and attention, with uncleared buffers poisoned.
  static absl::StatusOr<std::unique_ptr<Backend>> tensor_core_backend() {
    cuda::Options o;
    o.gemm = cuda::Options::GemmPrecision::kBF16;
    o.poison_empty = true;
    return cuda::make_backend(o);
  }
  // The fixture's config with head dims of the tensor-core attention (64 + 16 = 64/64 is not; 48 + 16 = 64).
  model::ModelConfig tensor_core_config() const {
    auto cfg = model::ModelConfig::from_file(fixture() + "/config.json");
    CHECK(cfg.ok()) << cfg.status();
    cfg->qk_nope_head_dim = 48;
    cfg->v_head_dim = 64;
    return *cfg;
  }
};

// logits and every gradient of one forward/backward: CPU vs GPU, and GPU twice (bitwise).
TEST_F(CudaModelTest, ForwardBackwardMatchesCpuAndRepeatsBitwise) {
  auto cm = model::Model::load(fixture(), *cpu_);
  auto gm = model::Model::load(fixture(), *gpu_);
  ASSERT_TRUE(cm.ok()) << cm.status();
  ASSERT_TRUE(gm.ok()) << gm.status();
  const int64_t b = 3, t = 29, vocab = (*cm)->config().vocab_size;
  Tensor tokens = ids({b, t}, static_cast<int32_t>(vocab));
  Tensor dlogits = randn({b * t, vocab}, 1e-2f);
  model::ForwardState cs;
  Tensor cl = (*cm)->forward(tokens, &cs);
  (*cm)->zero_grads();
  (*cm)->backward(cs, dlogits);
  Tensor runs[2][2];
  for (int r = 0; r < 2; ++r) {
    model::ForwardState gs;
    Tensor gl = (*gm)->forward(tokens, &gs);
    (*gm)->zero_grads();
    (*gm)->backward(gs, dev(dlogits));
    runs[r][0] = gpu_->download(gl);
    runs[r][1] = gpu_->download((*gm)->grads().buffer());
  }
  EXPECT_CLOSE(runs[0][0], cl, 1e-4);
  // Per parameter: relative L2 error of the gradient.
  const Tensor cg = (*cm)->grads().buffer();
  for (const model::ParamInfo& p : (*cm)->params().infos()) {
    const int64_t n = shape_numel(p.shape);
    double num = 0, den = 0;
    for (int64_t i = p.offset; i < p.offset + n; ++i) {
      const double d = static_cast<double>(runs[0][1].f32()[i]) - cg.f32()[i];
      num += d * d;
      den += static_cast<double>(cg.f32()[i]) * cg.f32()[i];
    }
    if (den > 0) {
      EXPECT_LT(std::sqrt(num / den), 1e-4) << p.name;
    }
  }
  EXPECT_TRUE(bitwise_equal(runs[0][0], runs[1][0])) << "logits differ between two identical runs";
  EXPECT_TRUE(bitwise_equal(runs[0][1], runs[1][1])) << "gradients differ between two identical runs";
}

// The bf16 path (tensor-core products and attention) on a whole network: the logits and the gradient of a
// cross-entropy step within relative L2 2e-2 of the fp32 CPU reference (the fixtures' bf16 tolerance). The network is
// the fixture's config made dense: with routed experts, bf16 rounding flips near-tied expert choices of some tokens,
// and a flipped token differs by design, not by error.
TEST_F(CudaModelTest, Bf16PathWithinTolerance) {
  auto tcb = tensor_core_backend();
  ASSERT_TRUE(tcb.ok());
  model::ModelConfig cfg = tensor_core_config();
  cfg.n_routed_experts = 0;
  model::Model cm(cfg, *cpu_), gm(cfg, **tcb);
  cm.init_random(5, 0.05f);
  gm.init_random(5, 0.05f);
  const int64_t b = 2, t = 70, vocab = cfg.vocab_size;
  Tensor tokens = ids({b, t}, static_cast<int32_t>(vocab)), targets = ids({b * t}, static_cast<int32_t>(vocab));
  model::ForwardState cs, gs;
  Tensor cl = cm.forward(tokens, &cs);
  // The gradient a training step feeds back: mean cross-entropy's (softmax - onehot(target)) / tokens.
  Tensor dlogits = Tensor::zeros({b * t, vocab});
  for (int64_t i = 0; i < b * t; ++i) {
    const float* row = cl.f32() + i * vocab;
    float* d = dlogits.f32() + i * vocab;
    const float mx = *std::max_element(row, row + vocab);
    double z = 0;
    for (int64_t j = 0; j < vocab; ++j) z += std::exp(static_cast<double>(row[j] - mx));
    for (int64_t j = 0; j < vocab; ++j)
      d[j] = static_cast<float>(
          (std::exp(static_cast<double>(row[j] - mx)) / z - (j == targets.data<int32_t>()[i] ? 1.0 : 0.0)) /
          static_cast<double>(b * t));
  }
  cm.zero_grads();
  cm.backward(cs, dlogits);
  Tensor gl = gm.forward(tokens, &gs);
  gm.zero_grads();
  Tensor gd = (*tcb)->zeros(dlogits.shape(), DType::kF32);
  (*tcb)->upload(dlogits, gd);
  gm.backward(gs, gd);
  const double el = rel_l2(**tcb, gl, cl);
  EXPECT_LT(el, 2e-2);
  const Tensor cg = cm.grads().buffer(), gg = (*tcb)->download(gm.grads().buffer());
  const double eg = rel_l2(**tcb, gg, cg);
  EXPECT_LT(eg, 2e-2) << "the whole gradient";
  // Per tensor, a small gradient that is a sum over every token with cancelling signs (the norm weights)
  // carries the rounding of its terms relative to a smaller total: up to twice the bound above.
  double worst = 0;
  std::string worst_name;
  for (const model::ParamInfo& p : cm.params().infos()) {
    const int64_t n = shape_numel(p.shape);
    const double e = rel_l2(**tcb, gg.slice(0, p.offset, n), cg.slice(0, p.offset, n));
    if (e > worst) worst = e, worst_name = p.name;
  }
  EXPECT_LT(worst, 4e-2) << worst_name;
  EXPECT_GT(el, 1e-5) << "expected the bf16 path";
  std::printf("bf16 path: logits rel L2 %.2e, gradient rel L2 %.2e, worst tensor %.2e (%s)\n", el, eg, worst,
              worst_name.c_str());
  // An optimizer step that writes the model's bf16 weights as it updates (AdamW::step(model)) gives the
  // next forward the same bits as one after which the forward rounds the parameters itself.
  model::Model gm2(cfg, **tcb);
  gm2.init_random(5, 0.05f);
  Tensor g2 = gm2.grads().buffer();
  (*tcb)->copy(gm.grads().buffer(), g2);
  trainer::AdamWConfig oc;
  oc.lr = 1e-2;
  trainer::AdamW o1(gm.params(), oc), o2(gm2.params(), oc);
  ASSERT_TRUE(gm.rounded_weights().defined());
  o1.step(gm);
  o2.step(gm2.params(), gm2.grads());
  const Tensor l1 = (*tcb)->download(gm.forward(tokens)), l2 = (*tcb)->download(gm2.forward(tokens));
  EXPECT_TRUE(bitwise_equal(l1, l2)) << "logits after a step that kept the bf16 weights current";
  EXPECT_FALSE(bitwise_equal(l1, (*tcb)->download(gl))) << "the step changed nothing";
}

// A forward that keeps less (Model::set_recompute) gives bitwise the same logprobs and gradients on the
// bf16 path too (tensor-core products and attention, routed experts): backward remakes what was dropped
// with the same kernels on the same inputs.
TEST_F(CudaModelTest, RecomputeModesGiveTheSameBits) {
  auto tcb = tensor_core_backend();
  ASSERT_TRUE(tcb.ok());
  model::ModelConfig cfg = tensor_core_config();
  model::Model gm(cfg, **tcb);
  gm.init_random(5, 0.05f);
  const int64_t b = 2, t = 70, m = b * t, vocab = cfg.vocab_size;
  Tensor tokens = ids({b, t}, static_cast<int32_t>(vocab));
  Tensor tg = (*tcb)->zeros({m}, DType::kI32), dlp = (*tcb)->zeros({m});
  (*tcb)->upload(ids({m}, static_cast<int32_t>(vocab)), tg);
  (*tcb)->upload(randn({m}, 1e-2f), dlp);
  Tensor lps[4], grads[4];
  int64_t bytes[4] = {};
  const model::Recompute modes[4] = {model::Recompute::kNone, model::Recompute::kSelective, model::Recompute::kExperts,
                                     model::Recompute::kLayers};
  for (int k = 0; k < 4; ++k) {
    gm.set_recompute(modes[k]);
    model::ForwardState st;
    lps[k] = (*tcb)->download(gm.forward_logprobs(tokens, tg, &st));
    bytes[k] = st.bytes();
    gm.zero_grads();
    gm.backward_logprobs(st, tg, dlp);
    grads[k] = (*tcb)->download(gm.grads().buffer());
  }
  // The head's backward in the forward's pass (Model::forward_logprobs with a gradient): the same bits.
  {
    gm.set_recompute(model::Recompute::kNone);
    model::ForwardState st;
    const model::LogprobGradient gradient = [&](const Tensor& lp, int64_t row0) {
      return dlp.slice(0, row0, lp.numel());
    };
    gm.zero_grads();
    EXPECT_TRUE(bitwise_equal((*tcb)->download(gm.forward_logprobs(tokens, tg, &st, nullptr, &gradient)), lps[0]));
    gm.backward_from_head(st);
    EXPECT_TRUE(bitwise_equal((*tcb)->download(gm.grads().buffer()), grads[0])) << "fused head vs two passes";
  }
  for (int k = 1; k < 4; ++k) {
    EXPECT_TRUE(bitwise_equal(lps[k], lps[0])) << model::recompute_name(modes[k]);
    EXPECT_TRUE(bitwise_equal(grads[k], grads[0])) << model::recompute_name(modes[k]);
    EXPECT_LT(bytes[k], bytes[k - 1]) << model::recompute_name(modes[k]);
  }
  double norm = 0;
  for (int64_t i = 0; i < grads[0].numel(); ++i) norm += std::fabs(grads[0].f32()[i]);
  EXPECT_GT(norm, 0.0);
}

TEST_F(CudaModelTest, PagedDecodeMatchesCpu) {
  auto cm = model::Model::load(fixture(), *cpu_);
  auto gm = model::Model::load(fixture(), *gpu_);
  ASSERT_TRUE(cm.ok() && gm.ok());
  const int block = 4;
  model::LatentCache cc((*cm)->config(), *cpu_, 32, block), gc((*gm)->config(), *gpu_, 32, block);
  // Two sequences: prompts of 7 and 3 tokens, then a decode step for both.
  const std::vector<int32_t> p0 = {5, 17, 99, 3, 400, 8, 61}, p1 = {1000, 2, 77};
  const std::vector<int32_t> t0 = {0, 5, 2}, t1 = {7, 1, 9};
  model::StepBatch prefill;
  prefill.add(p0.data(), 7, 0, t0, block, true);
  prefill.add(p1.data(), 3, 0, t1, block, true);
  const Tensor want_prefill = (*cm)->forward_step(prefill, cc);
  EXPECT_CLOSE(gpu_->download((*gm)->forward_step(prefill, gc)), want_prefill, 1e-4);
  model::StepBatch decode;
  const int32_t n0 = 42, n1 = 600;
  decode.add(&n0, 1, 7, t0, block, true);
  decode.add(&n1, 1, 3, t1, block, true);
  const Tensor want_decode = (*cm)->forward_step(decode, cc);
  EXPECT_CLOSE(gpu_->download((*gm)->forward_step(decode, gc)), want_decode, 1e-4);
  EXPECT_EQ(gc.dtype(), DType::kF32);

  // bf16 products keep the latents in bf16 (half the cache) and decode on tensor cores: the same steps
  // within bf16 rounding of the f32 reference.
  auto bm = model::Model::load(fixture(), bf16());
  ASSERT_TRUE(bm.ok());
  model::LatentCache bc((*bm)->config(), bf16(), 32, block);
  EXPECT_EQ(bc.dtype(), DType::kBF16);
  EXPECT_EQ(bc.bytes() * 2, gc.bytes());
  EXPECT_CLOSE(bf16().download((*bm)->forward_step(prefill, bc)), want_prefill, 3e-2);
  EXPECT_CLOSE(bf16().download((*bm)->forward_step(decode, bc)), want_decode, 3e-2);

  // fp8 rows: the same steps as the CPU reference over fp8 rows, within bf16 rounding (the rows' E4M3
  // values agree but where the two sides' norms round a value across an E4M3 boundary).
  if (model::LatentCache::resolve_dtype((*bm)->config(), bf16(), model::LatentFormat::kFp8).ok()) {
    model::LatentCache fc((*cm)->config(), *cpu_, 32, block, model::LatentFormat::kFp8);
    model::LatentCache fg((*bm)->config(), bf16(), 32, block, model::LatentFormat::kFp8);
    EXPECT_EQ(fg.dtype(), DType::kU8);
    EXPECT_CLOSE(bf16().download((*bm)->forward_step(prefill, fg)), (*cm)->forward_step(prefill, fc), 5e-2);
    EXPECT_CLOSE(bf16().download((*bm)->forward_step(decode, fg)), (*cm)->forward_step(decode, fc), 5e-2);
  }
}

// Decode steps replay captured graphs (Model::forward_step): the same logits as steps run as they come,
// bitwise where the batch fills its bucket, within rounding where pad rows fill it (other kernels may
// take the larger batch), through the warm-up, the capture and replays, with the pad rows' latents kept
// out of every sequence's blocks.
TEST_F(CudaModelTest, DecodeGraphsMatchStepsRunAsTheyCome) {
  Backend& be = bf16();
  auto graphs = model::Model::load(fixture(), be);
  auto eager = model::Model::load(fixture(), be);
  ASSERT_TRUE(graphs.ok() && eager.ok());
  (*eager)->set_step_graphs(false);
  const int block = 4;
  for (int n_seq : {4, 5}) {  // a full bucket; 5 padded to 6
    model::LatentCache cg((*graphs)->config(), be, 64, block), ce((*eager)->config(), be, 64, block);
    std::vector<std::vector<int32_t>> tables(n_seq);
    model::StepBatch prefill;
    std::vector<int32_t> prompt = {5, 17, 99, 3, 400};
    for (int s = 0; s < n_seq; ++s) {
      tables[s] = {3 * s, 3 * s + 1, 3 * s + 2};  // 12 positions a sequence
      prompt[0] = 7 * s + 1;
      prefill.add(prompt.data(), 5, 0, tables[s], block, true);
    }
    (*graphs)->forward_step(prefill, cg);
    (*eager)->forward_step(prefill, ce);
    for (int step = 0; step < 5; ++step) {
      model::StepBatch decode;
      for (int s = 0; s < n_seq; ++s) {
        const int32_t tok = 11 * s + 3 * step + 2;
        decode.add(&tok, 1, 5 + step, tables[s], block, true);
      }
      const Tensor got = be.download((*graphs)->forward_step(decode, cg));
      const Tensor want = be.download((*eager)->forward_step(decode, ce));
      if (n_seq == 4) {
        EXPECT_TRUE(bitwise_equal(got, want)) << "step " << step;
      } else {
        EXPECT_LT(max_rel(be, got, want), 1e-3) << "step " << step;
      }
    }
  }
}

// Batch-invariant products (gemm bf16_invariant) on the whole tensor-core path, routed experts
// included: the rollout engine's rescored logprobs (EngineOptions::rescore_logprobs) equal what the
// trainer recomputes on the GPU bit for bit, in micro-batches that mix groups and lengths, so GRPO's
// sampler-trainer gap is exactly 0 and its ratio starts at 1; with bf16 and with fp8 latent rows (the
// tokens sampled over fp8 rows, their logprobs the trainer's).
TEST_F(CudaModelTest, BatchInvariantRescoredLogprobsAreTheTrainersBitForBit) {
  model::Model gm(tensor_core_config(), bf16(/*hopper=*/true, /*invariant=*/true));
  ASSERT_GT(gm.config().n_routed_experts, 0);
  gm.init_random(9, 0.05f);
  std::vector<rollout::GroupRequest> groups;
  std::mt19937 pick(3);
  for (int i = 0; i < 5; ++i) {
    rollout::GroupRequest r;
    for (int k = 0; k < 5 + 3 * i; ++k) r.prompt.push_back(static_cast<int32_t>(2 + pick() % 1000));
    r.num_samples = 3;
    r.params.temperature = 1.0f;
    r.params.max_new_tokens = 6 + 2 * i;
    r.params.seed = 40 + static_cast<uint64_t>(i);
    groups.push_back(std::move(r));
  }
  for (model::LatentFormat format : {model::LatentFormat::kAuto, model::LatentFormat::kFp8}) {
    SCOPED_TRACE(model::latent_format_name(format));
    rollout::EngineOptions eo;
    eo.num_blocks = 256;
    eo.rescore_logprobs = true;
    eo.latents = format;
    rollout::Engine engine(gm, eo);
    auto got = engine.generate(groups);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->size(), 15u);
    EXPECT_GT(engine.stats().rescored_tokens, 0);
    std::vector<trainer::TrainSequence> batch;
    for (size_t i = 0; i < got->size(); ++i) {
      const rollout::Completion& c = (*got)[i];
      trainer::TrainSequence t;
      t.tokens = groups[c.group].prompt;
      t.prompt_len = static_cast<int32_t>(t.tokens.size());
      t.tokens.insert(t.tokens.end(), c.tokens.begin(), c.tokens.end());
      t.old_logprobs = c.logprobs;
      t.advantage = i % 2 ? 0.5f : -0.5f;
      batch.push_back(std::move(t));
    }
    for (int micro : {4, 15}) {
      const auto want = trainer::completion_logprobs(gm, batch, micro);
      for (size_t i = 0; i < got->size(); ++i) {
        const std::vector<float>& lp = (*got)[i].logprobs;
        ASSERT_EQ(want[i].size(), lp.size());
        for (size_t k = 0; k < lp.size(); ++k)
          EXPECT_EQ(std::memcmp(&want[i][k], &lp[k], 4), 0) << "micro-batch " << micro << ", completion " << i
                                                            << " token " << k << ": " << want[i][k] << " vs " << lp[k];
      }
    }
    trainer::GrpoConfig cfg;
    cfg.old = trainer::GrpoConfig::Old::kSampler;
    cfg.kl_beta = 0.0f;
    const trainer::GrpoStepStats gs = trainer::grpo_gradients(gm, cfg, batch, 4);
    EXPECT_EQ(gs.logprob_gap_max, 0.0);
    EXPECT_EQ(gs.ratio, 1.0);
  }
}

TEST_F(CudaModelTest, HuggingFaceFixtureParity) {
  for (const char* dir : {"tiny_a", "tiny_a_hub_layout"}) {
    // generate.py remakes tiny_a only; the Hub layout is checked where the shared fixtures are present.
    if (std::string(dir) != "tiny_a" && !std::ifstream(testing::fixtures_dir() + "/" + dir + "/config.json")) continue;
    auto rep = trainer::check_parity(testing::fixtures_dir() + "/" + dir, *gpu_, trainer::ParityOptions{});
    ASSERT_TRUE(rep.ok()) << rep.status();
    for (const auto& it : rep->items)
      EXPECT_TRUE(it.pass) << dir << ": " << it.name << " " << it.metric << " " << it.value;
  }
}

}  // namespace
}  // namespace r1lab::core
