// The network on random small configs: finite-difference gradients for what the fixtures do not cover,
// and latent-cache decoding against the full forward.
#include "model/model.h"

#include <cstring>
#include <random>

#include "core/backend.h"
#include "core/latent_rows.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace r1lab::model {
namespace {

using core::Tensor;

struct Variant {
  const char* name;
  void (*apply)(ModelConfig&);
};

ModelConfig small_config() {
  ModelConfig c;
  c.vocab_size = 48;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.moe_intermediate_size = 16;
  c.num_hidden_layers = 3;
  c.first_k_dense_replace = 1;
  c.num_attention_heads = 2;
  c.q_lora_rank = 24;
  c.kv_lora_rank = 16;
  c.qk_nope_head_dim = 8;
  c.qk_rope_head_dim = 4;
  c.v_head_dim = 8;
  c.n_routed_experts = 8;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.n_group = 2;
  c.topk_group = 1;
  c.routed_scaling_factor = 2.5;
  c.max_position_embeddings = 64;
  return c;
}

const Variant kVariants[] = {
    {"fixture_like", [](ModelConfig&) {}},
    {"no_q_lora", [](ModelConfig& c) { c.q_lora_rank = 0; }},
    {"yarn", [](ModelConfig& c) {
       c.rope.type = "yarn";
       c.rope.factor = 4.0;
       c.rope.original_max_position_embeddings = 16;
       c.rope.mscale = 1.0;
       c.rope.mscale_all_dim = 0.707;
       c.rope.beta_fast = 8;
     }},
    {"no_norm_topk", [](ModelConfig& c) { c.norm_topk_prob = false; }},
    {"softmax_group_limited", [](ModelConfig& c) {
       c.scoring_func = "softmax";
       c.topk_method = "group_limited_greedy";
       c.n_group = 4;
       c.topk_group = 2;
     }},
    {"several_groups", [](ModelConfig& c) {
       c.n_group = 4;
       c.topk_group = 2;
       c.num_experts_per_tok = 3;
     }},
    {"greedy_no_shared", [](ModelConfig& c) {
       c.topk_method = "greedy";
       c.n_group = 1;
       c.n_shared_experts = 0;
     }},
    {"tied_half_split_rope", [](ModelConfig& c) {
       c.tie_word_embeddings = true;
       c.rope_interleave = false;
     }},
};

class ModelVariant : public ::testing::TestWithParam<Variant> {
 protected:
  void SetUp() override {
    cfg_ = small_config();
    GetParam().apply(cfg_);
    ASSERT_TRUE(cfg_.validate().ok()) << cfg_.validate();
    model_ = std::make_unique<Model>(cfg_, *be_);
    model_->init_random(7, 0.2f);
    // Non-trivial norms and router bias, as in the fixtures.
    std::mt19937_64 rng(3);
    for (const ParamInfo& p : model_->params().infos()) {
      if (p.name.find("norm") != std::string::npos || p.name.find("correction_bias") != std::string::npos) {
        Tensor t = model_->params().get(p.name);
        Tensor n = testing::randn(p.shape, rng, 0.1f);
        for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] += n.f32()[i];
      }
    }
  }
  Tensor tokens(int64_t b, int64_t t, uint64_t seed) {
    std::mt19937_64 rng(seed);
    Tensor ids = Tensor::zeros({b, t}, core::DType::kI32);
    for (int64_t i = 0; i < b * t; ++i) ids.data<int32_t>()[i] = static_cast<int32_t>(rng() % cfg_.vocab_size);
    return ids;
  }
  std::unique_ptr<core::Backend> be_ = core::make_cpu_backend();
  ModelConfig cfg_;
  std::unique_ptr<Model> model_;
};

// S = Σ c ⊙ logits with fixed random c; every parameter tensor's gradient against finite differences.
TEST_P(ModelVariant, BackwardMatchesFiniteDifferences) {
  const int64_t b = 2, t = 7;
  Tensor ids = tokens(b, t, 11);
  std::mt19937_64 rng(5);
  Tensor c = testing::randn({b * t, cfg_.vocab_size}, rng);
  ForwardState state;
  Tensor logits = model_->forward(ids, &state);
  model_->zero_grads();
  model_->backward(state, c);
  // Expert selection is piecewise constant: a step that changes it measures a jump, not a slope, so
  // the step shrinks until the routing on both sides equals the unperturbed routing.
  auto routing = [](const ForwardState& s) {
    std::vector<int32_t> r;
    for (const LayerActs& l : s.layers)
      if (l.moe.idx.defined()) r.insert(r.end(), l.moe.idx.data<int32_t>(), l.moe.idx.data<int32_t>() + l.moe.idx.numel());
    return r;
  };
  const std::vector<int32_t> base_routing = routing(state);
  int checked = 0;
  for (const ParamInfo& p : model_->params().infos()) {
    if (!p.trainable) continue;
    Tensor x = model_->params().get(p.name);
    Tensor u = testing::randn(p.shape, rng), saved = x.clone();
    auto at = [&](double eps, std::vector<int32_t>* r) {
      for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = saved.f32()[i] + static_cast<float>(eps) * u.f32()[i];
      ForwardState s;
      const double v = testing::dot(model_->forward(ids, &s), c);
      *r = routing(s);
      return v;
    };
    double numeric = 0;
    bool stable = false;
    for (double eps = 2e-3; eps > 1e-5 && !stable; eps /= 4) {
      std::vector<int32_t> rp, rm;
      const double plus = at(eps, &rp), minus = at(-eps, &rm);
      stable = rp == base_routing && rm == base_routing;
      numeric = (plus - minus) / (2 * eps);
    }
    std::vector<int32_t> unused;
    at(0, &unused);
    ASSERT_TRUE(stable) << p.name << ": routing changes under every step tried";
    const double analytic = testing::dot(model_->grads().get(p.name), u);
    EXPECT_LT(std::fabs(numeric - analytic) / std::max({std::fabs(numeric), std::fabs(analytic), 1e-3}), 2e-2)
        << p.name << ": numeric " << numeric << " vs analytic " << analytic;
    ++checked;
  }
  EXPECT_GT(checked, 20);
}

// The chunked log-probability head (no [B*T, V] logits) equals the full logits followed by log-softmax:
// the log-probabilities and every parameter's gradient, over chunks that do not divide the rows.
TEST_P(ModelVariant, ChunkedLogprobHeadEqualsFullLogits) {
  const int64_t b = 2, t = 7, m = b * t;
  Tensor ids = tokens(b, t, 13), tg = tokens(1, m, 17).view({m});
  std::mt19937_64 rng(9);
  Tensor dlp = testing::randn({m}, rng);
  ForwardState full;
  Tensor logits = model_->forward(ids, &full);
  Tensor lp = Tensor::zeros({m}), lse = Tensor::zeros({m}), dlogits = Tensor::zeros({m, cfg_.vocab_size});
  be_->logprobs_forward(logits, tg, lp, lse);
  be_->logprobs_backward(dlp, logits, tg, lse, dlogits);
  model_->zero_grads();
  model_->backward(full, dlogits);
  const Tensor want = model_->grads().buffer().clone();
  model_->set_head_chunk_rows(5);
  ForwardState chunked;
  HeadStats stats;
  Tensor lp2 = model_->forward_logprobs(ids, tg, &chunked, &stats);
  model_->zero_grads();
  model_->backward_logprobs(chunked, tg, dlp);
  const Tensor got = model_->grads().buffer();
  Tensor h_full = Tensor::zeros({m}), am_full = Tensor::zeros({m}, core::DType::kI32);
  be_->logit_stats(logits, lse, h_full, am_full);
  for (int64_t i = 0; i < m; ++i) {
    EXPECT_NEAR(lp2.f32()[i], lp.f32()[i], 1e-5) << "row " << i;
    EXPECT_NEAR(stats.entropy.f32()[i], h_full.f32()[i], 1e-5) << "row " << i;
    EXPECT_EQ(stats.argmax.data<int32_t>()[i], am_full.data<int32_t>()[i]) << "row " << i;
  }
  double diff = 0, scale = 0;
  for (int64_t i = 0; i < want.numel(); ++i) {
    diff = std::max(diff, static_cast<double>(std::fabs(got.f32()[i] - want.f32()[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(want.f32()[i])));
  }
  EXPECT_GT(scale, 0.0);
  EXPECT_LE(diff, 1e-5 * scale);
  // The head's backward in the forward's own pass (the gradient known per chunk): the same bits as the
  // two passes, the chunks' log-probabilities handed to the gradient as they come.
  ForwardState fused;
  std::vector<int64_t> seen;
  const LogprobGradient gradient = [&](const Tensor& lp_c, int64_t row0) {
    for (int64_t i = 0; i < lp_c.numel(); ++i) EXPECT_EQ(lp_c.f32()[i], lp2.f32()[row0 + i]) << "row " << row0 + i;
    seen.push_back(row0);
    return dlp.slice(0, row0, lp_c.numel());
  };
  model_->zero_grads();
  Tensor lp3 = model_->forward_logprobs(ids, tg, &fused, nullptr, &gradient);
  model_->backward_from_head(fused);
  EXPECT_EQ(seen, (std::vector<int64_t>{0, 5, 10}));
  EXPECT_EQ(std::memcmp(lp3.raw(), lp2.raw(), m * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(model_->grads().buffer().raw(), got.raw(), got.numel() * sizeof(float)), 0)
      << "fused head vs two passes";
}

// A forward that keeps less (Model::set_recompute) gives bitwise the same log-probabilities and
// gradients: backward remakes what was dropped with the same ops on the same inputs. Each mode keeps
// fewer bytes than the one before it.
TEST_P(ModelVariant, RecomputeGivesTheSameGradients) {
  const int64_t b = 2, t = 9, m = b * t;
  Tensor ids = tokens(b, t, 19), tg = tokens(1, m, 23).view({m});
  std::mt19937_64 rng(29);
  Tensor dlp = testing::randn({m}, rng);
  std::vector<Tensor> lps, grads;
  std::vector<int64_t> bytes;
  for (Recompute r : {Recompute::kNone, Recompute::kSelective, Recompute::kExperts, Recompute::kLayers}) {
    SCOPED_TRACE(recompute_name(r));
    model_->set_recompute(r);
    ForwardState st;
    lps.push_back(model_->forward_logprobs(ids, tg, &st).clone());
    EXPECT_EQ(st.recompute, r);
    bytes.push_back(st.bytes());
    ASSERT_EQ(static_cast<int>(st.layers.size()), cfg_.num_hidden_layers);
    const LayerActs& last = st.layers.back();
    EXPECT_EQ(last.ln2.defined(), r == Recompute::kNone);
    EXPECT_EQ(last.attn.kv.defined(), r == Recompute::kNone);
    EXPECT_EQ(last.ln1.defined(), r == Recompute::kNone);
    EXPECT_EQ(last.moe.token_of.defined(), r != Recompute::kLayers);  // the grouping is kept
    // The routed experts' outputs and activations are never kept (backward needs neither).
    EXPECT_FALSE(last.moe.ys.defined());
    EXPECT_FALSE(last.moe.experts.act.defined());
    EXPECT_FALSE(last.moe.shared.act.defined());  // the gated activations are remade from gate_up
    EXPECT_FALSE(st.layers.front().mlp.act.defined());
    EXPECT_EQ(last.moe.experts.gate_up.defined(), r == Recompute::kNone || r == Recompute::kSelective);
    EXPECT_EQ(st.layers.front().mlp.gate_up.defined(), last.moe.experts.gate_up.defined());  // the dense layer
    EXPECT_EQ(last.attn.ckv.defined(), r != Recompute::kLayers);
    // What backward does depends on the state, not on the setting now.
    model_->set_recompute(Recompute::kNone);
    model_->zero_grads();
    model_->backward_logprobs(st, tg, dlp);
    grads.push_back(model_->grads().buffer().clone());
  }
  for (size_t k = 1; k < lps.size(); ++k) {
    EXPECT_EQ(0, std::memcmp(lps[k].raw(), lps[0].raw(), static_cast<size_t>(m) * sizeof(float))) << "mode " << k;
    EXPECT_EQ(0, std::memcmp(grads[k].raw(), grads[0].raw(), static_cast<size_t>(grads[0].numel()) * sizeof(float)))
        << "mode " << k;
    EXPECT_LT(bytes[k], bytes[k - 1]) << "mode " << k;
  }
  EXPECT_GT(testing::dot(grads[0], grads[0]), 0.0);
  EXPECT_FALSE(recompute_from_name("some").ok());
  EXPECT_EQ(*recompute_from_name("layers"), Recompute::kLayers);
}

// zero_grads leaves the matrix weights' gradients for the next backward to write rather than add to:
// over stale values (NaN here), the gradients equal those of a backward into cleared gradients, groups
// of experts without tokens included; a second backward adds (micro-batches); grads() asked for before
// any backward clears them.
TEST_P(ModelVariant, FirstBackwardAfterZeroGradsWritesTheMatrixGradients) {
  const int64_t b = 2, t = 9, m = b * t;
  Tensor ids = tokens(b, t, 31), tg = tokens(1, m, 37).view({m});
  std::mt19937_64 rng(41);
  Tensor dlp = testing::randn({m}, rng);
  const auto backward = [&] {
    ForwardState st;
    model_->forward_logprobs(ids, tg, &st);
    model_->backward_logprobs(st, tg, dlp);
  };
  const auto equal = [](const Tensor& x, const Tensor& y, const char* what) {
    int64_t differ = 0;
    for (int64_t i = 0; i < x.numel(); ++i) differ += !(x.f32()[i] == y.f32()[i]);  // +0 and -0 are equal
    EXPECT_EQ(differ, 0) << what << ": " << differ << " of " << x.numel() << " gradients differ";
  };
  Tensor all = model_->grads().buffer();
  // Reference: every gradient cleared (grads() clears what zero_grads left), then backward adds.
  model_->zero_grads();
  be_->fill(all, 0.0f);  // the buffer as it is now, whatever grads() cleared
  model_->grads();
  backward();
  const Tensor once = model_->grads().buffer().clone();
  backward();
  const Tensor twice = model_->grads().buffer().clone();
  // Over stale values.
  be_->fill(all, NAN);
  model_->zero_grads();
  backward();
  equal(model_->grads().buffer(), once, "first backward");
  backward();
  equal(model_->grads().buffer(), twice, "second backward");
  // grads() before any backward: zeros.
  be_->fill(all, NAN);
  model_->zero_grads();
  const Tensor cleared = model_->grads().buffer();
  for (int64_t i = 0; i < cleared.numel(); ++i) ASSERT_EQ(cleared.f32()[i], 0.0f) << i;
  EXPECT_GT(testing::dot(once, once), 0.0);
}

// Running sequences through the paged latent cache — in shuffled pool blocks, in prompt chunks of
// different sizes, then token by token, two sequences of different lengths in one step — gives the full
// forward's logits at every position.
TEST_P(ModelVariant, PagedLatentCacheEqualsFullForward) {
  const int64_t b = 2, t = 12;
  const int block_size = 4;
  Tensor ids = tokens(b, t, 13);
  Tensor full = model_->forward(ids);  // [b*t, V]
  LatentCache cache(cfg_, *be_, 8, block_size);
  // Sequence 0 in blocks {5, 0, 3}, sequence 1 in {2, 7, 1}.
  const std::vector<std::vector<int32_t>> table = {{5, 0, 3}, {2, 7, 1}};
  const int32_t* tok = ids.data<int32_t>();
  // Sequence 0 advances by 5, 1, 1, ...; sequence 1 by 2, 3, 1, 1, ...
  const std::vector<std::vector<int64_t>> chunks = {{5, 1, 1, 1, 1, 1, 1, 1}, {2, 3, 1, 1, 1, 1, 1, 1, 1, 1}};
  int64_t len[2] = {0, 0};
  size_t next[2] = {0, 0};
  while (len[0] < t || len[1] < t) {
    StepBatch step;
    std::vector<std::pair<int64_t, int64_t>> rows;  // (sequence, position) of each logit row
    for (int64_t s = 0; s < b; ++s) {
      if (len[s] >= t) continue;
      const int64_t n = chunks[s][next[s]++];
      step.add(tok + s * t + len[s], n, len[s], table[s], block_size, true);
      len[s] += n;
      rows.emplace_back(s, len[s] - 1);
    }
    Tensor got = model_->forward_step(step, cache);
    ASSERT_EQ(got.size(0), static_cast<int64_t>(rows.size()));
    for (size_t r = 0; r < rows.size(); ++r)
      for (int64_t v = 0; v < cfg_.vocab_size; ++v) {
        const float want = full.f32()[(rows[r].first * t + rows[r].second) * cfg_.vocab_size + v];
        ASSERT_NEAR(got.f32()[static_cast<int64_t>(r) * cfg_.vocab_size + v], want, 1e-4 * (1 + std::fabs(want)))
            << "sequence " << rows[r].first << " position " << rows[r].second;
      }
  }
}

// A step's logits for a token are bit-identical whatever else is in the step: the property that makes a
// batched rollout equal to each sequence decoded alone.
TEST_P(ModelVariant, PagedStepIsIndependentOfBatchComposition) {
  const int block_size = 4;
  Tensor ids = tokens(2, 6, 5);
  const int32_t* tok = ids.data<int32_t>();
  LatentCache alone(cfg_, *be_, 4, block_size), mixed(cfg_, *be_, 4, block_size);
  StepBatch a;
  a.add(tok, 6, 0, {0, 1}, block_size, true);
  Tensor la = model_->forward_step(a, alone);
  StepBatch m;
  m.add(tok + 6, 3, 0, {2}, block_size, true);
  m.add(tok, 6, 0, {3, 0}, block_size, true);
  Tensor lm = model_->forward_step(m, mixed);
  for (int64_t v = 0; v < cfg_.vocab_size; ++v) ASSERT_EQ(la.f32()[v], lm.f32()[cfg_.vocab_size + v]) << v;
}

INSTANTIATE_TEST_SUITE_P(Configs, ModelVariant, ::testing::ValuesIn(kVariants),
                         [](const ::testing::TestParamInfo<Variant>& i) { return std::string(i.param.name); });

// fp8 latent rows: decode through them tracks the full forward (to E4M3's precision in the attention's
// keys and values: its 3 mantissa bits against bf16's 8 make errors about 32 times bf16 rows'), a token's
// logits still do not depend on what else is in its step, and a model whose latent does not fit the
// format is told so.
TEST(LatentCacheFp8, DecodeTracksTheFullForwardAndIsIndependentOfTheBatch) {
  ModelConfig cfg = small_config();
  cfg.kv_lora_rank = 64;
  cfg.qk_rope_head_dim = 8;
  ASSERT_TRUE(cfg.validate().ok());
  auto be = core::make_cpu_backend();
  Model model(cfg, *be);
  model.init_random(7, 0.2f);
  const int64_t b = 2, t = 10;
  const int block_size = 4;
  std::mt19937_64 rng(11);
  Tensor ids = Tensor::zeros({b, t}, core::DType::kI32);
  for (int64_t i = 0; i < b * t; ++i) ids.data<int32_t>()[i] = static_cast<int32_t>(rng() % cfg.vocab_size);
  const Tensor full = model.forward(ids);
  const std::vector<std::vector<int32_t>> table = {{5, 0, 3}, {2, 7, 1}};
  const int32_t* tok = ids.data<int32_t>();
  std::vector<float> at_last;  // sequence 1's logits at position t - 1 (fp8 rows)
  // A prompt of 6, then a token at a time, both sequences in each step: the logits' relative RMS error.
  const auto decode = [&](LatentFormat format) {
    LatentCache cache(cfg, *be, 8, block_size, format);
    double err = 0, norm = 0;
    for (int64_t len = 0; len < t;) {
      const int64_t n = len == 0 ? 6 : 1;
      StepBatch step;
      for (int64_t s = 0; s < b; ++s) step.add(tok + s * t + len, n, len, table[s], block_size, true);
      len += n;
      const Tensor got = model.forward_step(step, cache);
      for (int64_t s = 0; s < b; ++s)
        for (int64_t v = 0; v < cfg.vocab_size; ++v) {
          const double want = full.f32()[(s * t + len - 1) * cfg.vocab_size + v];
          const double g = got.f32()[s * cfg.vocab_size + v];
          err += (g - want) * (g - want);
          norm += want * want;
          if (format == LatentFormat::kFp8 && s == 1 && len == t) at_last.push_back(static_cast<float>(g));
        }
    }
    return std::sqrt(err / norm);
  };
  const double e8 = decode(LatentFormat::kFp8), e16 = decode(LatentFormat::kBF16);
  EXPECT_GT(e8, e16);
  EXPECT_LT(e8, 64 * e16) << "fp8 " << e8 << ", bf16 " << e16;
  EXPECT_LT(e16, 0.02);
  // Sequence 1 alone, in other blocks: the same bits at its last position.
  LatentCache alone(cfg, *be, 8, block_size, LatentFormat::kFp8);
  ASSERT_EQ(alone.dtype(), core::DType::kU8);
  EXPECT_EQ(alone.layer(0).size(1), (core::Fp8LatentRow{64, 8}.bytes()));
  EXPECT_EQ(LatentCache::row_bytes(cfg, core::DType::kU8), 64 + 16 + 4 * 1 + 12);
  StepBatch a;
  a.add(tok + t, t - 1, 0, {6, 4, 3}, block_size, false);
  model.forward_step(a, alone);
  StepBatch last;
  last.add(tok + t + t - 1, 1, t - 1, {6, 4, 3}, block_size, true);
  const Tensor one = model.forward_step(last, alone);
  for (int64_t v = 0; v < cfg.vocab_size; ++v) ASSERT_EQ(one.f32()[v], at_last[static_cast<size_t>(v)]) << v;
  // The small config's latent (16 values, a rope key of 4) does not fit.
  const auto no = LatentCache::resolve_dtype(small_config(), *be, LatentFormat::kFp8);
  ASSERT_FALSE(no.ok());
  EXPECT_NE(no.status().message().find("fp8 latents need"), std::string::npos) << no.status();
  EXPECT_EQ(*latent_format_from_name("fp8"), LatentFormat::kFp8);
  EXPECT_FALSE(latent_format_from_name("e5m2").ok());
}

TEST(LatentCache, BytesPerTokenForDeepSeekV3) {
  ModelConfig c;
  c.num_hidden_layers = 61;
  c.num_attention_heads = 128;
  c.kv_lora_rank = 512;
  c.qk_rope_head_dim = 64;
  c.qk_nope_head_dim = 128;
  c.v_head_dim = 128;
  EXPECT_EQ(LatentCache::bytes_per_token(c, 2), 61 * 576 * 2);                   // 70 272 B
  EXPECT_EQ(LatentCache::full_kv_bytes_per_token(c, 2), 61 * 128 * 320 * 2);     // 4 997 120 B
}

}  // namespace
}  // namespace r1lab::model
