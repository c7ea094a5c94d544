// config.json in both styles, the safetensors reader and writer, and the loader's errors on bad files.
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <random>

#include "core/backend.h"
#include "gtest/gtest.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "tests/test_util.h"

namespace r1lab::model {
namespace {

namespace fs = std::filesystem;
using core::Tensor;

std::string fixture(const std::string& name) { return testing::fixtures_dir() + "/" + name; }

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() / ("r1lab_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string str() const { return path_.string(); }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

std::string read(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}
void write(const std::string& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

TEST(Config, ReadsTransformers5AndHubStylesAlike) {
  auto a = ModelConfig::from_file(fixture("tiny_a/config.json"));
  auto h = ModelConfig::from_file(fixture("tiny_a_hub_layout/config.json"));
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(h.ok()) << h.status();
  for (const ModelConfig* c : {&*a, &*h}) {
    EXPECT_EQ(c->q_lora_rank, 96);
    EXPECT_EQ(c->kv_lora_rank, 64);
    EXPECT_TRUE(c->rope_interleave);  // the Hub style has no key: DeepSeek-V3 is interleaved
    EXPECT_EQ(c->rope.theta, 10000.0);
    EXPECT_EQ(c->rope.type, "default");
    EXPECT_EQ(c->scoring_func, "sigmoid");
    EXPECT_TRUE(c->is_moe_layer(1));
    EXPECT_FALSE(c->is_moe_layer(0));
  }
  EXPECT_FLOAT_EQ(a->attention_scale(), 1.0f / std::sqrt(48.0f));
}

TEST(Config, ReadsDeepSeekV2LiteAndYarn) {
  nlohmann::json j = {{"model_type", "deepseek_v2"}, {"vocab_size", 100}, {"hidden_size", 64},
                      {"intermediate_size", 96}, {"moe_intermediate_size", 16}, {"num_hidden_layers", 2},
                      {"first_k_dense_replace", 1}, {"num_attention_heads", 4}, {"q_lora_rank", nullptr},
                      {"kv_lora_rank", 32}, {"qk_nope_head_dim", 16}, {"qk_rope_head_dim", 8}, {"v_head_dim", 16},
                      {"n_routed_experts", 8}, {"n_shared_experts", 2}, {"num_experts_per_tok", 2},
                      {"scoring_func", "softmax"}, {"topk_method", "greedy"}, {"norm_topk_prob", false},
                      {"max_position_embeddings", 4096}, {"rope_theta", 10000},
                      {"rope_scaling", {{"type", "yarn"}, {"factor", 40}, {"original_max_position_embeddings", 4096},
                                        {"beta_fast", 32}, {"beta_slow", 1}, {"mscale", 0.707}, {"mscale_all_dim", 0.707}}}};
  auto c = ModelConfig::from_json(j, "v2.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->q_lora_rank, 0);
  EXPECT_EQ(c->rope.type, "yarn");
  const double m = 0.1 * 0.707 * std::log(40.0) + 1.0;
  EXPECT_NEAR(c->attention_scale(), m * m / std::sqrt(24.0), 1e-6);
  // transformers' attention factor: mscale(factor, 0.707) / mscale(factor, 0.707) = 1.
  core::RopeTable t = make_rope_table(*c, 2);
  EXPECT_NEAR(t.cos.f32()[0], 1.0f, 1e-6);
  // Round trip through the transformers-5 spelling.
  auto back = ModelConfig::from_json(c->to_json(), "round trip");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->rope.factor, 40.0);
  EXPECT_EQ(back->topk_method, "greedy");
  EXPECT_EQ(back->q_lora_rank, 0);
}

TEST(Config, RejectsInconsistentConfigsNamingTheField) {
  auto base = ModelConfig::from_file(fixture("tiny_a/config.json"));
  ASSERT_TRUE(base.ok());
  nlohmann::json j = base->to_json();
  auto expect_error = [&](nlohmann::json bad, const std::string& word) {
    auto c = ModelConfig::from_json(bad, "bad.json");
    ASSERT_FALSE(c.ok());
    EXPECT_NE(std::string(c.status().message()).find(word), std::string::npos) << c.status();
  };
  nlohmann::json b1 = j; b1["n_group"] = 3;
  expect_error(b1, "n_group");
  nlohmann::json b2 = j; b2["scoring_func"] = "relu";
  expect_error(b2, "scoring_func");
  nlohmann::json b3 = j; b3["hidden_size"] = "large";
  expect_error(b3, "hidden_size");
  nlohmann::json b4 = j; b4["qk_rope_head_dim"] = 15;
  expect_error(b4, "qk_rope_head_dim");
  nlohmann::json b5 = j; b5["model_type"] = "llama";
  expect_error(b5, "model_type");
}

// Copies tiny_a into a temporary directory, lets `mutate` break it, and expects load to fail with `words`.
void expect_load_error(const std::function<void(const std::string&)>& mutate, const std::vector<std::string>& words) {
  TempDir dir;
  fs::copy(fixture("tiny_a/config.json"), dir.str() + "/config.json");
  fs::copy(fixture("tiny_a/model.safetensors"), dir.str() + "/model.safetensors");
  mutate(dir.str());
  auto be = core::make_cpu_backend();
  auto m = Model::load(dir.str(), *be);
  ASSERT_FALSE(m.ok()) << "a broken checkpoint loaded";
  for (const std::string& w : words)
    EXPECT_NE(std::string(m.status().message()).find(w), std::string::npos) << m.status();
}

// Rewrites model.safetensors with a new header (data kept) to make a specific corruption.
void rewrite_header(const std::string& dir, const std::function<void(nlohmann::json&)>& edit) {
  const std::string path = dir + "/model.safetensors";
  std::string s = read(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(s[i]);
  nlohmann::json h = nlohmann::json::parse(s.substr(8, n));
  edit(h);
  std::string header = h.dump();
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((header.size() >> (8 * i)) & 0xff));
  write(path, out + header + s.substr(8 + n));
}

TEST(Loader, RejectsTruncatedFiles) {
  expect_load_error([](const std::string& d) { fs::resize_file(d + "/model.safetensors", 5'000'000); },
                    {"model.safetensors", "outside", "truncated"});
  expect_load_error([](const std::string& d) { fs::resize_file(d + "/model.safetensors", 4); },
                    {"model.safetensors", "truncated"});
}

TEST(Loader, RejectsACorruptHeader) {
  expect_load_error([](const std::string& d) {
    std::string s = read(d + "/model.safetensors");
    for (int i = 8; i < 40; ++i) s[i] = '\x7f';
    write(d + "/model.safetensors", s);
  }, {"model.safetensors", "JSON"});
  expect_load_error([](const std::string& d) {
    std::string s = read(d + "/model.safetensors");
    s[6] = '\x10';  // an absurd header length
    write(d + "/model.safetensors", s);
  }, {"model.safetensors", "header length"});
}

TEST(Loader, RejectsAWronglyShapedTensorNamingIt) {
  expect_load_error([](const std::string& d) {
    rewrite_header(d, [](nlohmann::json& h) { h["model.norm.weight"]["shape"] = {16, 16}; });
  }, {"model.safetensors", "model.norm.weight", "[16, 16]", "[256]"});
}

TEST(Loader, RejectsAnUnknownDtypeNamingTheTensor) {
  expect_load_error([](const std::string& d) {
    rewrite_header(d, [](nlohmann::json& h) { h["model.norm.weight"]["dtype"] = "F8_E9M9"; });
  }, {"model.norm.weight", "F8_E9M9"});
}

TEST(Loader, RejectsMissingAndUnexpectedTensors) {
  expect_load_error([](const std::string& d) {
    rewrite_header(d, [](nlohmann::json& h) { h.erase("model.layers.2.self_attn.o_proj.weight"); });
  }, {"model.layers.2.self_attn.o_proj.weight"});
  expect_load_error([](const std::string& d) {
    std::vector<std::pair<std::string, Tensor>> all;
    {
      auto f = SafetensorsFile::open(d + "/model.safetensors");
      ASSERT_TRUE(f.ok());
      for (const auto& [name, _] : (*f)->entries()) all.emplace_back(name, (*f)->tensor(name).clone());
    }
    all.emplace_back("model.layers.0.self_attn.extra.weight", Tensor::zeros({4}));
    ASSERT_TRUE(write_safetensors(d + "/model.safetensors", all).ok());
  }, {"unexpected", "model.layers.0.self_attn.extra.weight"});
  expect_load_error([](const std::string& d) {
    rewrite_header(d, [](nlohmann::json& h) { h["model.zzz"] = h["model.norm.weight"]; });
  }, {"overlap", "model.norm.weight", "model.zzz"});
}

TEST(Loader, RejectsNonFiniteWeights) {
  expect_load_error([](const std::string& d) {
    std::string s = read(d + "/model.safetensors");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(s[i]);
    nlohmann::json h = nlohmann::json::parse(s.substr(8, n));
    const size_t off = 8 + n + h["model.norm.weight"]["data_offsets"][0].get<size_t>();
    const float nan = NAN;
    std::memcpy(&s[off], &nan, 4);
    write(d + "/model.safetensors", s);
  }, {"model.norm.weight", "non-finite"});
}

TEST(Loader, MissingDirectoryAndShardIndexErrors) {
  auto be = core::make_cpu_backend();
  auto m = Model::load("/nonexistent/r1lab", *be);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(std::string(m.status().message()).find("config.json"), std::string::npos);
  TempDir dir;
  fs::copy(fixture("tiny_a_hub_layout"), dir.str(), fs::copy_options::recursive);
  fs::remove(dir.str() + "/model-00002-of-00002.safetensors");
  m = Model::load(dir.str(), *be);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(std::string(m.status().message()).find("model-00002-of-00002.safetensors"), std::string::npos) << m.status();
}

TEST(Checkpoint, SaveThenLoadRoundTripsInBothExpertLayouts) {
  auto be = core::make_cpu_backend();
  auto src = Model::load(fixture("tiny_a"), *be);
  ASSERT_TRUE(src.ok()) << src.status();
  for (ExpertLayout layout : {ExpertLayout::kFused, ExpertLayout::kPerExpert}) {
    TempDir dir;
    ASSERT_TRUE((*src)->save(dir.str(), layout).ok());
    EXPECT_FALSE(fs::exists(dir.str() + "/model.safetensors.tmp." + std::to_string(::getpid())));
    auto back = Model::load(dir.str(), *be);
    ASSERT_TRUE(back.ok()) << back.status();
    const Tensor& a = (*src)->params().buffer();
    const Tensor& b = (*back)->params().buffer();
    ASSERT_EQ(a.numel(), b.numel());
    EXPECT_EQ(std::memcmp(a.raw(), b.raw(), static_cast<size_t>(a.numel()) * 4), 0);
  }
}

TEST(Safetensors, WritesBf16AndReadsItBack) {
  TempDir dir;
  Tensor t = Tensor::zeros({2, 3});
  for (int i = 0; i < 6; ++i) t.f32()[i] = 0.25f * i;
  ASSERT_TRUE(write_safetensors(dir.str() + "/x.safetensors", {{"a", t.to(core::DType::kBF16)}, {"b", t}}).ok());
  auto f = SafetensorsFile::open(dir.str() + "/x.safetensors");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->entries().at("a").dtype, core::DType::kBF16);
  Tensor a = (*f)->tensor("a").to_f32();
  for (int i = 0; i < 6; ++i) EXPECT_EQ(a.f32()[i], t.f32()[i]);
}

TEST(Loader, HubLayoutGivesTheSameParametersAsFused) {
  auto be = core::make_cpu_backend();
  auto a = Model::load(fixture("tiny_a"), *be);
  auto h = Model::load(fixture("tiny_a_hub_layout"), *be);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(h.ok()) << h.status();
  const Tensor& x = (*a)->params().buffer();
  const Tensor& y = (*h)->params().buffer();
  EXPECT_EQ(std::memcmp(x.raw(), y.raw(), static_cast<size_t>(x.numel()) * 4), 0);
}

}  // namespace
}  // namespace r1lab::model
