#include "rollout/engine.h"

#include <cstring>
#include <random>
#include <set>

#include "core/backend.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"
#include "trainer/policy.h"

namespace r1lab::rollout {
namespace {

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    be_ = core::make_cpu_backend();
    auto m = model::Model::load(testing::fixtures_dir() + "/tiny_a", *be_);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
  }

  // Prompts that share a 9-token template, then differ (lengths 10 to 16).
  static std::vector<int32_t> prompt(int i) {
    std::vector<int32_t> p = {3, 14, 15, 92, 65, 35, 89, 79, 32};
    std::mt19937 rng(static_cast<unsigned>(i));
    const int extra = 1 + i % 7;
    for (int k = 0; k < extra; ++k) p.push_back(static_cast<int32_t>(2 + rng() % 1000));
    return p;
  }
  static GroupRequest group(int i, int g, float temperature, int max_new = 10) {
    GroupRequest r;
    r.prompt = prompt(i);
    r.num_samples = g;
    r.params.temperature = temperature;
    r.params.top_p = 0.95f;
    r.params.max_new_tokens = max_new;
    r.params.seed = 1000 + static_cast<uint64_t>(i);
    return r;
  }
  // A cache of 4096 tokens: plenty for these tests, quick to allocate.
  static EngineOptions small() {
    EngineOptions o;
    o.num_blocks = 256;
    return o;
  }
  std::vector<Completion> run(const EngineOptions& opt, std::vector<GroupRequest> groups, EngineStats* stats = nullptr) {
    Engine e(*model_, opt);
    auto out = e.generate(std::move(groups));
    EXPECT_TRUE(out.ok()) << out.status();
    const EngineStats s = e.stats();
    EXPECT_EQ(s.blocks_in_use, 0) << "blocks leaked";
    EXPECT_EQ(s.running + s.waiting, 0);
    if (stats) *stats = s;
    return out.ok() ? *out : std::vector<Completion>{};
  }
  static void expect_same(const std::vector<Completion>& a, const std::vector<Completion>& b) {
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_EQ(a[i].tokens, b[i].tokens) << "completion " << i;
      EXPECT_EQ(a[i].logprobs, b[i].logprobs) << "completion " << i;
      EXPECT_EQ(a[i].finish_reason, b[i].finish_reason) << "completion " << i;
    }
  }

  std::unique_ptr<core::Backend> be_;
  std::unique_ptr<model::Model> model_;
};

TEST_F(EngineTest, MatchesTheFullForwardReferenceGreedyAndSampled) {
  for (float temperature : {0.0f, 1.0f}) {
    std::vector<GroupRequest> groups = {group(0, 3, temperature), group(1, 1, temperature), group(5, 2, temperature)};
    const auto out = run(small(), groups);
    ASSERT_EQ(out.size(), 6u);
    for (const Completion& c : out) {
      auto ref = reference_generate(*model_, groups[c.group].prompt, groups[c.group].params, c.sample);
      ASSERT_TRUE(ref.ok()) << ref.status();
      EXPECT_EQ(c.tokens, ref->tokens) << "group " << c.group << " sample " << c.sample << " T=" << temperature;
      ASSERT_EQ(c.logprobs.size(), ref->logprobs.size());
      for (size_t k = 0; k < c.logprobs.size(); ++k) EXPECT_NEAR(c.logprobs[k], ref->logprobs[k], 1e-4);
    }
  }
}

TEST_F(EngineTest, ABatchEqualsEachGroupAlone) {
  std::vector<GroupRequest> groups;
  for (int i = 0; i < 6; ++i) groups.push_back(group(i, 4, 1.0f));
  const auto batched = run(small(), groups);
  for (int i = 0; i < 6; ++i) {
    auto alone = run(small(), {groups[i]});
    std::vector<Completion> mine(batched.begin() + 4 * i, batched.begin() + 4 * (i + 1));
    expect_same(mine, alone);
  }
  // The samples of a group differ from each other.
  EXPECT_NE(batched[0].tokens, batched[1].tokens);
}

// Back-to-back decode steps queued before the host takes the step before's picks give the same tokens
// as one step at a time, with sequences ending at different steps (lengths and a stop token) and the
// steps after an ending run as usual.
TEST_F(EngineTest, OverlappedDecodeStepsChangeNothing) {
  std::vector<GroupRequest> groups;
  for (int i = 0; i < 6; ++i) groups.push_back(group(i, 3, 1.0f, 4 + 3 * i));
  EngineOptions serial = small();
  serial.overlap_steps = false;
  EngineStats s0, s1;
  const auto first = run(serial, groups, &s0);
  EXPECT_EQ(s0.overlapped_steps, 0);
  // A token some completion samples midway becomes a stop token for every group.
  const int32_t stop = first[10].tokens[2];
  for (GroupRequest& g : groups) g.params.stop_token_ids = {stop};
  const auto want = run(serial, groups);
  const auto got = run(small(), groups, &s1);
  expect_same(got, want);
  EXPECT_GT(s1.overlapped_steps, 5);
  int stopped = 0;
  for (const Completion& c : got) stopped += c.finish_reason == FinishReason::kStop;
  EXPECT_GT(stopped, 0);
}

// A cache of fp8 rows holds about three times the tokens of f32 rows in the same bytes; a batch still
// equals each group alone bit for bit, and prefix sharing changes nothing. The sampled tokens' logprobs
// stay near what the full forward gives them: further than with bf16 rows, by about E4M3's precision
// against bf16's (3 mantissa bits against 8).
TEST_F(EngineTest, Fp8LatentsHoldMoreTokensAndKeepBatchesIndependent) {
  EngineOptions f32 = small(), fp8 = small();
  f32.num_blocks = fp8.num_blocks = 0;
  f32.cache_bytes = fp8.cache_bytes = int64_t{1} << 20;
  f32.latents = model::LatentFormat::kF32;
  fp8.latents = model::LatentFormat::kFp8;
  const model::ModelConfig& cfg = model_->config();
  const int64_t row = model::LatentCache::row_bytes(cfg, core::DType::kU8);
  EXPECT_EQ(row, 64 + 2 * 16 + 4 + 12);  // tiny_a: a latent of 64, a rope key of 16
  const int64_t n8 = Engine(*model_, fp8).stats().blocks_total, n32 = Engine(*model_, f32).stats().blocks_total;
  EXPECT_EQ(n8, fp8.cache_bytes / (row * cfg.num_hidden_layers * fp8.block_size));
  EXPECT_GT(n8, 2.8 * static_cast<double>(n32));
  std::vector<GroupRequest> groups;
  for (int i = 0; i < 4; ++i) groups.push_back(group(i, 3, 1.0f));
  // The mean |logprob - the full forward's| over the completions' tokens, with rows in `format`.
  const auto gap = [&](model::LatentFormat format) {
    EngineOptions o = small();
    o.latents = format;
    const auto out = run(o, groups);
    if (format == model::LatentFormat::kFp8) {
      for (int i = 0; i < 4; ++i) {
        auto alone = run(o, {groups[i]});
        expect_same(std::vector<Completion>(out.begin() + 3 * i, out.begin() + 3 * (i + 1)), alone);
      }
      o.prefix_cache = false;
      expect_same(run(o, groups), out);
    }
    double sum = 0, n = 0;
    for (const Completion& c : out) {
      std::vector<int32_t> seq = groups[c.group].prompt;
      seq.insert(seq.end(), c.tokens.begin(), c.tokens.end());
      const int64_t t = static_cast<int64_t>(seq.size());
      core::Tensor ids = core::Tensor::zeros({1, t}, core::DType::kI32),
                   next = core::Tensor::zeros({t}, core::DType::kI32);
      for (int64_t j = 0; j < t; ++j) {
        ids.data<int32_t>()[j] = seq[j];
        next.data<int32_t>()[j] = j + 1 < t ? seq[j + 1] : 0;
      }
      const core::Tensor lp = model_->forward_logprobs(ids, next, nullptr);
      for (size_t k = 0; k < c.logprobs.size(); ++k) {
        sum += std::fabs(lp.f32()[static_cast<int64_t>(groups[c.group].prompt.size() + k) - 1] - c.logprobs[k]);
        n += 1;
      }
    }
    return sum / n;
  };
  const double g8 = gap(model::LatentFormat::kFp8), g16 = gap(model::LatentFormat::kBF16);
  EXPECT_GT(g8, g16);
  EXPECT_LT(g8, 64 * g16) << "fp8 " << g8 << ", bf16 " << g16;
  EXPECT_LT(g16, 0.01);
}

// Rescored logprobs (EngineOptions::rescore_logprobs) are what the trainer recomputes, bit for bit, in
// micro-batches that mix completions of different groups and lengths, so GRPO's sampler-trainer gap is
// exactly 0 and its ratio starts at 1; the tokens are the sampled ones, unchanged. Without rescoring the
// decode path's logprobs differ in the last bits. With fp8 latent rows too: the tokens come from the fp8
// decode, their logprobs from the trainer's forward.
TEST_F(EngineTest, RescoredLogprobsAreTheTrainersBitForBit) {
  std::vector<GroupRequest> groups;
  for (int i = 0; i < 5; ++i) groups.push_back(group(i, 3, 1.0f, 6 + 2 * i));
  groups[2].params.stop_token_ids = {7, 11, 13};  // some end early
  for (model::LatentFormat format : {model::LatentFormat::kAuto, model::LatentFormat::kFp8}) {
    SCOPED_TRACE(model::latent_format_name(format));
    EngineOptions plain = small(), rescore = small();
    plain.latents = rescore.latents = format;
    rescore.rescore_logprobs = true;
    EngineStats st;
    const auto got = run(rescore, groups, &st);
    const auto sampled = run(plain, groups);
    ASSERT_EQ(got.size(), 15u);
    EXPECT_GT(st.rescored_tokens, 0);
    std::vector<trainer::TrainSequence> batch;
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i].tokens, sampled[i].tokens) << i;
      trainer::TrainSequence t;
      t.tokens = groups[got[i].group].prompt;
      t.prompt_len = static_cast<int32_t>(t.tokens.size());
      t.tokens.insert(t.tokens.end(), got[i].tokens.begin(), got[i].tokens.end());
      t.old_logprobs = got[i].logprobs;
      t.advantage = i % 2 ? 0.5f : -0.5f;
      batch.push_back(std::move(t));
    }
    int differ = 0;
    for (int micro : {4, 15}) {
      const auto want = trainer::completion_logprobs(*model_, batch, micro);
      for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_EQ(want[i].size(), got[i].logprobs.size());
        for (size_t k = 0; k < want[i].size(); ++k) {
          EXPECT_EQ(std::memcmp(&want[i][k], &got[i].logprobs[k], 4), 0)
              << "completion " << i << " token " << k << ": " << want[i][k] << " vs " << got[i].logprobs[k];
          differ += want[i][k] != sampled[i].logprobs[k];
        }
      }
    }
    EXPECT_GT(differ, 0) << "the decode path's logprobs should round differently";
    trainer::GrpoConfig cfg;
    cfg.old = trainer::GrpoConfig::Old::kSampler;
    cfg.kl_beta = 0.0f;
    const trainer::GrpoStepStats gs = trainer::grpo_gradients(*model_, cfg, batch, 4);
    EXPECT_EQ(gs.logprob_gap_max, 0.0);
    EXPECT_EQ(gs.ratio, 1.0);
  }
}

TEST_F(EngineTest, PrefixSharingChunkingAndPreemptionChangeNothing) {
  std::vector<GroupRequest> groups;
  for (int i = 0; i < 8; ++i) groups.push_back(group(i, 4, 1.0f, 14));
  EngineOptions plain = small();
  plain.prefix_cache = false;
  plain.block_size = 4;
  const auto want = run(plain, groups);

  EngineOptions shared = small();
  shared.block_size = 4;
  EngineStats s;
  expect_same(run(shared, groups, &s), want);
  // Admitted in the same step, later prompts share the template's two full blocks with the first.
  EXPECT_EQ(s.prefix_hit_tokens, 7 * 8);

  EngineOptions chunked = shared;
  chunked.max_tokens_per_step = 5;  // prompts of 10+ tokens are prefilled over several steps
  expect_same(run(chunked, groups, &s), want);
  EXPECT_GT(s.prefix_hit_tokens, 0);

  EngineOptions tight = shared;
  tight.num_blocks = 12;  // 48 tokens: a few sequences at a time, the rest preempted and recomputed
  expect_same(run(tight, groups, &s), want);
  EXPECT_GT(s.preemptions, 0);
  EXPECT_EQ(s.blocks_total, 12);

  EngineOptions narrow = shared;
  narrow.max_running = 3;
  expect_same(run(narrow, groups, &s), want);
}

TEST_F(EngineTest, GroupSamplesSharePromptBlocksCopyOnWrite) {
  EngineOptions opt = small();
  opt.block_size = 4;
  opt.prefix_cache = false;
  Engine e(*model_, opt);
  GroupRequest g = group(3, 8, 1.0f, 6);  // 13-token prompt: 3 full blocks + 1 partial
  ASSERT_TRUE(e.submit({g}, nullptr).ok());
  ASSERT_TRUE(e.step());  // prefill once, fork 8 samples
  const EngineStats s = e.stats();
  EXPECT_EQ(s.running, 8);
  EXPECT_EQ(s.tokens_computed, 13);
  EXPECT_EQ(s.blocks_in_use, 4) << "all samples share the prompt's blocks";
  ASSERT_TRUE(e.step());  // each sample writes its first token into the shared partial block: copies
  EXPECT_EQ(e.stats().blocks_in_use, 3 + 8);
  while (e.step()) {
  }
  EXPECT_EQ(e.stats().blocks_in_use, 0);
}

TEST_F(EngineTest, PrefixCacheReportsCachedPromptTokensAcrossRequests) {
  EngineOptions opt = small();
  opt.block_size = 4;
  Engine e(*model_, opt);
  auto first = e.generate({group(2, 1, 0.0f, 4)});
  auto second = e.generate({group(2, 2, 0.0f, 4)});
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ((*first)[0].cached_prompt_tokens, 0);
  EXPECT_EQ((*second)[0].cached_prompt_tokens, 8) << "two full blocks of the 12-token prompt";
  EXPECT_EQ((*second)[1].cached_prompt_tokens, 12);
  EXPECT_EQ((*first)[0].tokens, (*second)[0].tokens);
  EXPECT_GT(e.stats().blocks_cached, 0);
  EXPECT_EQ(e.stats().blocks_in_use, 0);
}

TEST_F(EngineTest, CancelEndsARequestAndFreesItsBlocks) {
  Engine e(*model_, small());
  std::vector<Completion> got;
  bool done = false;
  auto id = e.submit({group(0, 4, 1.0f, 50), group(1, 2, 1.0f, 50)}, [&](Completion&& c) { got.push_back(c); },
                     [&] { done = true; });
  ASSERT_TRUE(id.ok());
  auto other = e.generate({group(4, 1, 0.0f, 3)});  // runs steps: the first request advances too
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(done);
  e.cancel(*id);
  e.step();
  EXPECT_TRUE(done);
  ASSERT_EQ(got.size(), 6u);
  for (const Completion& c : got) {
    EXPECT_EQ(c.finish_reason, FinishReason::kCancelled);
    EXPECT_FALSE(c.tokens.empty());
  }
  EXPECT_EQ(e.stats().blocks_in_use, 0);
  EXPECT_FALSE(e.step());
}

TEST_F(EngineTest, CancelBeforePrefillDeliversEverySample) {
  Engine e(*model_, small());
  int n = 0;
  auto id = e.submit({group(0, 5, 1.0f)}, [&](Completion&& c) {
    EXPECT_EQ(c.finish_reason, FinishReason::kCancelled);
    ++n;
  });
  ASSERT_TRUE(id.ok());
  e.cancel(*id);
  e.step();
  EXPECT_EQ(n, 5);
}

TEST_F(EngineTest, WeightUpdatesApplyBetweenStepsAndAreRecorded) {
  EngineOptions opt = small();
  opt.block_size = 4;
  Engine e(*model_, opt);
  auto before = e.generate({group(2, 1, 0.0f, 6)});
  ASSERT_TRUE(before.ok());
  EXPECT_EQ((*before)[0].policy_version, 0);
  EXPECT_GT(e.stats().blocks_cached, 0);
  std::vector<Completion> got;
  ASSERT_TRUE(e.submit({group(2, 1, 0.0f, 6)}, [&](Completion&& c) { got.push_back(c); }).ok());
  e.step();  // prefill + first token under version 0
  // Scale the output head: changes the logits (and so, most likely, the tokens).
  ASSERT_TRUE(e.update_weights(1, [](model::Model& m) {
                 core::Tensor head = m.params().get("lm_head.weight");
                 m.backend().add(head, head, 2.0f);
                 return absl::OkStatus();
               }).ok());
  EXPECT_EQ(e.stats().blocks_cached, 0) << "stale latents must not be reused";
  while (e.step()) {
  }
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].first_policy_version, 0);
  EXPECT_EQ(got[0].policy_version, 1);
  EXPECT_EQ(e.update_weights(1, nullptr).code(), absl::StatusCode::kFailedPrecondition);
  auto err = e.update_weights(2, [](model::Model&) { return absl::InternalError("bad tensor"); });
  EXPECT_FALSE(err.ok());
  EXPECT_EQ(e.stats().policy_version, 1);
}

// Rescored logprobs are made under the weights that sampled the completion's last token: one that ends
// before a weight update (here in the step the update takes first, its picks still on their way when the
// update comes) is rescored before the update applies; one that ends after it, under the new weights.
TEST_F(EngineTest, RescoredLogprobsAreUnderTheWeightsThatSampledThem) {
  EngineOptions opt = small();
  opt.rescore_logprobs = true;
  Engine e(*model_, opt);
  const std::vector<GroupRequest> groups = {group(3, 1, 1.0f, 3), group(4, 1, 1.0f, 9)};
  std::vector<Completion> got;
  ASSERT_TRUE(e.submit(groups, [&](Completion&& c) { got.push_back(std::move(c)); }).ok());
  for (int i = 0; i < 3; ++i) e.step();
  core::Tensor head = model_->params().get("lm_head.weight");
  const core::Tensor v0 = head.clone();
  ASSERT_TRUE(e.update_weights(1, [](model::Model& m) {
                 core::Tensor h = m.params().get("lm_head.weight");
                 m.backend().add(h, h, 2.0f);
                 return absl::OkStatus();
               }).ok());
  const core::Tensor v1 = head.clone();
  while (e.step()) {
  }
  ASSERT_EQ(got.size(), 2u);
  std::set<int64_t> versions;
  for (const Completion& c : got) {
    versions.insert(c.policy_version);
    trainer::TrainSequence t;
    t.tokens = groups[c.group].prompt;
    t.prompt_len = static_cast<int32_t>(t.tokens.size());
    t.tokens.insert(t.tokens.end(), c.tokens.begin(), c.tokens.end());
    std::vector<std::vector<float>> want;
    for (const core::Tensor* w : {&v0, &v1}) {
      model_->backend().copy(*w, head);
      model_->weights_changed();
      want.push_back(trainer::completion_logprobs(*model_, {t}, 1)[0]);
    }
    ASSERT_EQ(c.logprobs.size(), want[0].size());
    EXPECT_EQ(std::memcmp(c.logprobs.data(), want[c.policy_version].data(), sizeof(float) * want[0].size()), 0)
        << "group " << c.group << ", version " << c.policy_version;
    EXPECT_NE(want[0], want[1]) << "the update should change the logprobs";
  }
  EXPECT_EQ(versions, (std::set<int64_t>{0, 1}));
}

TEST_F(EngineTest, RejectsBadRequests) {
  EngineOptions opt = small();
  opt.num_blocks = 8;
  opt.block_size = 4;
  Engine e(*model_, opt);
  auto code = [&](GroupRequest g) { return e.submit({g}, nullptr).status().code(); };
  const auto bad = absl::StatusCode::kInvalidArgument;
  GroupRequest g = group(0, 2, 1.0f);
  EXPECT_TRUE(e.submit({g}, nullptr).ok());
  EXPECT_EQ(e.submit({}, nullptr).status().code(), bad);
  GroupRequest x = g;
  x.prompt.clear();
  EXPECT_EQ(code(x), bad);
  x = g;
  x.prompt[2] = 1024;
  EXPECT_EQ(code(x), bad);
  x = g;
  x.num_samples = 0;
  EXPECT_EQ(code(x), bad);
  x.num_samples = 1 << 20;
  EXPECT_EQ(code(x), bad);
  x = g;
  x.params.max_new_tokens = 4000;  // beyond the 2048-token context
  EXPECT_EQ(code(x), bad);
  x.params.max_new_tokens = 40;  // fits the context, not the 32-token cache
  EXPECT_EQ(code(x), bad);
  x = g;
  x.params.stop_strings = {"</answer>"};  // no vocabulary loaded
  EXPECT_EQ(code(x), bad);
  x = g;
  x.params.stop_token_ids = {-3};
  EXPECT_EQ(code(x), bad);
  x = g;
  x.params.top_p = 2.0f;
  EXPECT_EQ(code(x), bad);
  while (e.step()) {
  }
  EXPECT_EQ(e.stats().blocks_in_use, 0);
}

TEST_F(EngineTest, RunsOnItsOwnThread) {
  Engine e(*model_, small());
  e.start();
  std::vector<GroupRequest> groups = {group(0, 2, 1.0f), group(1, 3, 0.0f)};
  auto threaded = e.generate(groups);
  e.stop();
  ASSERT_TRUE(threaded.ok());
  expect_same(*threaded, run(small(), groups));
}

// A byte-level vocabulary for the fixture's 1024 ids: ids < 256 are single bytes, the rest two letters.
std::string test_tokenizer_json() {
  nlohmann::json vocab = nlohmann::json::object();
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    const int cp = printable ? b : 256 + extra++;
    std::string s;
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    vocab[s] = b;
  }
  for (int id = 256; id < 1024; ++id) {
    std::string s = {static_cast<char>('a' + (id - 256) / 26 % 26), static_cast<char>('a' + (id - 256) % 26)};
    if (id >= 256 + 676) s = "Z" + s;
    vocab[s] = id;
  }
  nlohmann::json j;
  j["model"] = {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}};
  j["decoder"] = {{"type", "ByteLevel"}};
  j["added_tokens"] = nlohmann::json::array({{{"id", 1}, {"content", "<eos>"}, {"special", true}}});
  return j.dump();
}

TEST_F(EngineTest, StopStringsEndCompletionsOnDecodedText) {
  auto vocab = model::Vocabulary::from_json(test_tokenizer_json());
  ASSERT_TRUE(vocab.ok()) << vocab.status();
  EXPECT_EQ(vocab->bytes(' '), " ");
  EXPECT_EQ(vocab->bytes(256), "aa");
  EXPECT_EQ(vocab->bytes(1), "");
  Engine e(*model_, small(), &*vocab);
  GroupRequest g = group(6, 1, 0.0f, 12);
  auto free_run = e.generate({g});
  ASSERT_TRUE(free_run.ok());
  const Completion& f = (*free_run)[0];
  ASSERT_GE(f.tokens.size(), 4u);
  EXPECT_EQ(f.text, vocab->decode(f.tokens));
  // A stop string spanning the end of token 2 and the start of token 3.
  const std::string t2 = vocab->bytes(f.tokens[2]), t3 = vocab->bytes(f.tokens[3]);
  ASSERT_FALSE(t2.empty() || t3.empty());
  const std::string stop = t2.substr(t2.size() - 1) + t3.substr(0, 1);
  const std::string head = vocab->decode({f.tokens[0], f.tokens[1], f.tokens[2]});
  if (head.find(stop) != std::string::npos) GTEST_SKIP() << "stop string occurs earlier";
  g.params.stop_strings = {"never-generated", stop};
  auto stopped = e.generate({g});
  ASSERT_TRUE(stopped.ok());
  const Completion& s = (*stopped)[0];
  EXPECT_EQ(s.finish_reason, FinishReason::kStop);
  EXPECT_EQ(s.stop, stop);
  EXPECT_EQ(s.tokens, std::vector<int32_t>(f.tokens.begin(), f.tokens.begin() + 4));
  EXPECT_EQ(s.text, head.substr(0, head.size() - 1));
  g.params.include_stop_string = true;
  auto kept = e.generate({g});
  ASSERT_TRUE(kept.ok());
  EXPECT_EQ((*kept)[0].text, head + t3.substr(0, 1));
}

}  // namespace
}  // namespace r1lab::rollout
