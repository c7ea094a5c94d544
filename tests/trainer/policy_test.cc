#include "trainer/policy.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>

#include "gtest/gtest.h"
#include "model/safetensors.h"
#include "tests/test_util.h"

namespace r1lab::trainer {
namespace {

using core::Tensor;

double rel_l2(const float* a, const float* b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// The fixture's GRPO batch as TrainSequences: every token after the first is "completion"; the second
// sequence's last 5 tokens are masked in the fixture, so here that sequence is 5 tokens shorter.
std::vector<TrainSequence> fixture_batch(const model::SafetensorsFile& ref) {
  const Tensor ids = ref.tensor("input_ids").to_f32();
  const Tensor old = ref.tensor("old_logprobs"), rf = ref.tensor("ref_logprobs"), adv = ref.tensor("advantages"),
               mask = ref.tensor("mask");
  const int64_t b = ids.size(0), t = ids.size(1);
  std::vector<TrainSequence> out;
  for (int64_t i = 0; i < b; ++i) {
    TrainSequence s;
    s.prompt_len = 1;
    int64_t valid = 0;
    for (int64_t j = 0; j + 1 < t; ++j) valid += mask.f32()[i * (t - 1) + j] > 0;
    for (int64_t j = 0; j <= valid; ++j) s.tokens.push_back(static_cast<int32_t>(ids.f32()[i * t + j]));
    for (int64_t j = 0; j < valid; ++j) {
      s.old_logprobs.push_back(old.f32()[i * (t - 1) + j]);
      s.ref_logprobs.push_back(rf.f32()[i * (t - 1) + j]);
    }
    s.advantage = adv.f32()[i];
    out.push_back(std::move(s));
  }
  return out;
}

// tiny_a on the CPU with its reference file (the fixture's GRPO batch, loss and gradients).
struct TinyA {
  std::unique_ptr<core::Backend> be = core::make_cpu_backend();
  absl::StatusOr<std::unique_ptr<model::Model>> model =
      model::Model::load(testing::fixtures_dir() + "/tiny_a", *be);
  absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> ref =
      model::SafetensorsFile::open(testing::fixtures_dir() + "/tiny_a/reference.safetensors");
  bool ok() const {
    EXPECT_TRUE(model.ok()) << model.status();
    EXPECT_TRUE(ref.ok()) << ref.status();
    return model.ok() && ref.ok();
  }
};

// The trainer's own GRPO path (packing, micro-batches, accumulation, normalisation over the batch)
// reproduces transformers' loss and every gradient, whatever the micro-batch size.
TEST(Policy, GrpoGradientsMatchTheFixtureAtEveryMicroBatchSize) {
  TinyA t;
  ASSERT_TRUE(t.ok());
  auto& m = t.model;
  auto& ref = t.ref;
  const auto batch = fixture_batch(**ref);
  GrpoConfig cfg;  // the fixture's: eps 0.2, beta 0.04, mean per sequence then over sequences
  for (int micro : {1, 2}) {
    const GrpoStepStats st = grpo_gradients(**m, cfg, batch, micro);
    const double want = (*ref)->tensor("grpo_loss").f32()[0];
    EXPECT_LT(std::fabs(st.loss - want) / std::fabs(want), 1e-4) << "micro " << micro << ": " << st.loss << " vs " << want;
    const Tensor grads = (*m)->grads().buffer();
    int checked = 0;
    for (const model::ParamInfo& p : (*m)->grads().infos()) {
      if (!(*ref)->contains("grad." + p.name)) continue;
      const Tensor want_g = (*ref)->tensor("grad." + p.name).to_f32();
      EXPECT_LT(rel_l2(grads.f32() + p.offset, want_g.f32(), want_g.numel()), 1e-3) << p.name << " micro " << micro;
      ++checked;
    }
    EXPECT_GT(checked, 50);
    EXPECT_GT(st.kl, 0.0);
    EXPECT_GT(st.entropy, 0.0);
  }
}

// Old::kPolicy: the ratio is the policy's own logprobs against themselves, exactly 1, whatever the
// sampler returned; the gradient equals kSampler's when the sampler's logprobs are the trainer's own
// recomputation (bitwise: the same pass), and the gap to the sampler's logprobs is reported.
TEST(Policy, RatioAgainstThePolicyIsExactlyOneAndTheSamplerGapIsReported) {
  TinyA t;
  ASSERT_TRUE(t.ok());
  auto& m = t.model;
  auto batch = fixture_batch(**t.ref);
  const auto own = completion_logprobs(**m, batch, 2);
  // A sampler whose logprobs are off by up to 0.3 (rounding, another kernel, a stale version).
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> off(-0.3f, 0.3f);
  double want_max = 0;
  for (size_t i = 0; i < batch.size(); ++i)
    for (size_t k = 0; k < batch[i].old_logprobs.size(); ++k) {
      batch[i].old_logprobs[k] = own[i][k] + off(rng);
      want_max = std::max(want_max, static_cast<double>(std::fabs(batch[i].old_logprobs[k] - own[i][k])));
    }
  GrpoConfig cfg;
  cfg.old = GrpoConfig::Old::kPolicy;
  const GrpoStepStats pol = grpo_gradients(**m, cfg, batch, 2);
  const Tensor g_pol = (*m)->grads().buffer().clone();
  EXPECT_EQ(pol.ratio, 1.0);
  EXPECT_EQ(pol.clip_fraction, 0.0);
  EXPECT_NEAR(pol.logprob_gap_max, want_max, 1e-6);
  EXPECT_GT(pol.logprob_gap_mean, 0.05);

  cfg.old = GrpoConfig::Old::kSampler;
  const GrpoStepStats noisy = grpo_gradients(**m, cfg, batch, 2);
  EXPECT_NE(noisy.ratio, 1.0);
  EXPECT_GT(noisy.clip_fraction, 0.0);

  for (size_t i = 0; i < batch.size(); ++i) batch[i].old_logprobs = own[i];
  const GrpoStepStats matched = grpo_gradients(**m, cfg, batch, 2);
  EXPECT_EQ(matched.ratio, 1.0);
  EXPECT_EQ(matched.logprob_gap_max, 0.0);
  const Tensor g = (*m)->grads().buffer();
  EXPECT_EQ(std::memcmp(g.raw(), g_pol.raw(), g.numel() * sizeof(float)), 0);

  // Without the sampler's logprobs: the policy's own, no gap to report.
  for (auto& s : batch) s.old_logprobs.clear();
  cfg.old = GrpoConfig::Old::kPolicy;
  const GrpoStepStats bare = grpo_gradients(**m, cfg, batch, 2);
  EXPECT_EQ(bare.ratio, 1.0);
  EXPECT_EQ(bare.logprob_gap_max, 0.0);
  EXPECT_EQ(std::memcmp((*m)->grads().buffer().raw(), g_pol.raw(), g.numel() * sizeof(float)), 0);
}

TEST(Policy, GroupAdvantagesByHand) {
  // Group 1: 1, 0, 0, 1 -> mean .5, sample std sqrt(1/3).
  const auto a = group_advantages({1, 0, 0, 1, 2, 2, 2, 2}, 4, true, 0.0);
  const double s = std::sqrt(1.0 / 3.0);
  EXPECT_NEAR(a[0], 0.5 / s, 1e-6);
  EXPECT_NEAR(a[1], -0.5 / s, 1e-6);
  for (int i = 4; i < 8; ++i) EXPECT_EQ(a[i], 0.0f);  // all alike
  const auto d = group_advantages({3, 1}, 2, false);  // Dr. GRPO: no std
  EXPECT_NEAR(d[0], 1.0, 1e-6);
  EXPECT_NEAR(d[1], -1.0, 1e-6);
}

TEST(Policy, LearningRateSchedule) {
  AdamWConfig c;
  c.lr = 1.0;
  c.warmup_steps = 4;
  c.total_steps = 14;
  c.min_lr_ratio = 0.1;
  EXPECT_DOUBLE_EQ(learning_rate(c, 0), 0.25);
  EXPECT_DOUBLE_EQ(learning_rate(c, 3), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(c, 4), 1.0);
  EXPECT_NEAR(learning_rate(c, 9), 0.55, 1e-12);  // half way: 0.1 + 0.9 * 0.5
  EXPECT_NEAR(learning_rate(c, 14), 0.1, 1e-12);
  EXPECT_NEAR(learning_rate(c, 100), 0.1, 1e-12);
}

model::ModelConfig small_config() {
  model::ModelConfig c;
  c.vocab_size = 16;
  c.hidden_size = 16;
  c.intermediate_size = 32;
  c.moe_intermediate_size = 8;
  c.num_hidden_layers = 2;
  c.first_k_dense_replace = 1;
  c.num_attention_heads = 2;
  c.kv_lora_rank = 8;
  c.qk_nope_head_dim = 4;
  c.qk_rope_head_dim = 4;
  c.v_head_dim = 4;
  c.n_routed_experts = 4;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.max_position_embeddings = 32;
  return c;
}

std::vector<TrainSequence> sequences() {
  return {{{1, 2, 3, 4, 5, 6, 7}, 2, {}, {}, 0}, {{1, 9, 8, 7, 6}, 1, {}, {}, 0}, {{3, 3, 3}, 2, {}, {}, 0}};
}

TEST(Policy, AdamWStepByHandAndClipping) {
  auto be = core::make_cpu_backend();
  model::Model m(small_config(), *be);
  m.init_random(1, 0.1f);
  AdamWConfig c;
  c.lr = 0.01;
  c.weight_decay = 0.1;
  c.max_grad_norm = 0.5;
  AdamW opt(m.params(), c);
  Tensor before = m.params().buffer().clone();
  float* g = m.grads().buffer().f32();
  for (int64_t i = 0; i < m.grads().numel(); ++i) g[i] = (i % 7 == 0) ? 1.0f : 0.0f;
  double count = 0;  // trainable elements with a gradient (the router's correction bias is not trained)
  for (const model::ParamInfo& p : m.params().infos())
    for (int64_t i = p.offset; i < p.offset + core::shape_numel(p.shape); ++i) count += p.trainable && i % 7 == 0;
  const double norm = std::sqrt(count);
  const StepStats st = opt.step(m.params(), m.grads());
  EXPECT_NEAR(st.grad_norm, norm, 1e-6 * norm);
  EXPECT_TRUE(st.clipped);
  // First step: m̂ = g', v̂ = g'², so the update is lr·g'/(|g'| + eps) = lr·sign(g') for g' ≠ 0, plus decay
  // on matrices; embed_tokens (a matrix) starts the buffer.
  const float w0 = before.f32()[0], w1 = before.f32()[1];
  EXPECT_NEAR(m.params().buffer().f32()[0], w0 - 0.01 * 0.1 * w0 - 0.01, 1e-6);
  EXPECT_NEAR(m.params().buffer().f32()[1], w1 - 0.01 * 0.1 * w1, 1e-7);
  // A NaN gradient changes nothing.
  Tensor after = m.params().buffer().clone();
  g[3] = std::nanf("");
  EXPECT_TRUE(opt.step(m.params(), m.grads()).skipped);
  EXPECT_EQ(std::memcmp(after.f32(), m.params().buffer().f32(), after.numel() * 4), 0);
  EXPECT_EQ(opt.steps(), 1);
}

// With a bf16 copy to keep (a model's weights for bf16 products), the update writes each updated weight
// there rounded, and leaves the copy of untrained parameters as it was.
TEST(Policy, AdamWKeepsARoundedCopyCurrent) {
  auto be = core::make_cpu_backend();
  model::Model m(small_config(), *be);
  m.init_random(2, 0.1f);
  EXPECT_FALSE(m.rounded_weights().defined()) << "the CPU reference's products take f32 weights";
  AdamWConfig c;
  c.lr = 0.01;
  AdamW opt(m.params(), c);
  float* g = m.grads().buffer().f32();
  for (int64_t i = 0; i < m.grads().numel(); ++i) g[i] = 0.001f * static_cast<float>(i % 13) - 0.005f;
  const int64_t n = m.params().numel();
  Tensor rounded = Tensor::zeros({n}, core::DType::kBF16);
  for (int64_t i = 0; i < n; ++i) rounded.data<uint16_t>()[i] = 0x1234;
  const StepStats st = opt.step(m.params(), m.grads(), 1.0, &rounded);
  EXPECT_FALSE(st.skipped);
  const float* w = m.params().buffer().f32();
  for (const model::ParamInfo& p : m.params().infos())
    for (int64_t i = p.offset; i < p.offset + core::shape_numel(p.shape); ++i)
      ASSERT_EQ(rounded.data<uint16_t>()[i], p.trainable ? core::f32_to_bf16(w[i]) : 0x1234) << p.name << " " << i;
}

// Stopping, saving model and optimizer, and resuming gives bit-identical weights to never stopping.
TEST(Policy, ResumeIsBitExact) {
  const std::string dir = ::testing::TempDir() + "/resume";
  std::filesystem::remove_all(dir);
  auto be = core::make_cpu_backend();
  AdamWConfig c;
  c.lr = 3e-3;
  c.warmup_steps = 2;
  c.total_steps = 6;
  model::Model a(small_config(), *be);
  a.init_random(2, 0.2f);
  AdamW oa(a.params(), c);
  for (int i = 0; i < 3; ++i) sft_step(a, oa, sequences(), 2);
  ASSERT_TRUE(a.save(dir).ok());
  ASSERT_TRUE(oa.save(dir + "/optimizer.safetensors").ok());
  for (int i = 0; i < 3; ++i) sft_step(a, oa, sequences(), 2);
  auto b = model::Model::load(dir, *be);
  ASSERT_TRUE(b.ok()) << b.status();
  AdamW ob((*b)->params(), c);
  ASSERT_TRUE(ob.load(dir + "/optimizer.safetensors").ok());
  EXPECT_EQ(ob.steps(), 3);
  for (int i = 0; i < 3; ++i) sft_step(**b, ob, sequences(), 2);
  EXPECT_EQ(std::memcmp(a.params().buffer().f32(), (*b)->params().buffer().f32(), a.params().numel() * 4), 0);
  AdamW wrong(model::Model(small_config(), *be).params(), c);
  model::ModelConfig bigger = small_config();
  bigger.hidden_size = 32;
  model::Model other(bigger, *be);
  AdamW ow(other.params(), c);
  EXPECT_FALSE(ow.load(dir + "/optimizer.safetensors").ok());
}

// SFT learns the completions (loss falls, argmax accuracy reaches 1); GRPO with a positive advantage
// raises that sample's logprob and with a negative one lowers it.
TEST(Policy, SftLearnsAndGrpoMovesLogprobsWithTheAdvantage) {
  auto be = core::make_cpu_backend();
  model::Model m(small_config(), *be);
  m.init_random(3, 0.1f);
  AdamWConfig c;
  c.lr = 1e-2;
  AdamW opt(m.params(), c);
  const double first = sft_step(m, opt, sequences(), 3).loss;
  SftStepStats last;
  for (int i = 0; i < 150; ++i) last = sft_step(m, opt, sequences(), 2);
  EXPECT_LT(last.loss, 0.1 * first);
  EXPECT_EQ(last.token_accuracy, 1.0);

  for (float adv : {1.0f, -1.0f}) {
    model::Model p(small_config(), *be);
    p.init_random(4, 0.1f);
    std::vector<TrainSequence> batch = {{{1, 2, 3, 4, 5}, 2, {}, {}, adv}};
    batch[0].old_logprobs = completion_logprobs(p, batch, 1)[0];
    double before = 0;
    for (float x : batch[0].old_logprobs) before += x;
    AdamWConfig gc;
    gc.lr = 1e-3;
    AdamW go(p.params(), gc);
    GrpoConfig cfg;
    cfg.kl_beta = 0;
    const GrpoStepStats st = grpo_step(p, go, cfg, batch, 1);
    EXPECT_NEAR(st.ratio, 1.0, 1e-5);
    EXPECT_EQ(st.clip_fraction, 0.0);
    double after = 0;
    const auto now = completion_logprobs(p, batch, 1);
    for (float x : now[0]) after += x;
    if (adv > 0) {
      EXPECT_GT(after, before);
    } else {
      EXPECT_LT(after, before);
    }
  }
}

}  // namespace
}  // namespace r1lab::trainer
