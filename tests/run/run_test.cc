#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"
#include "core/device.h"
#include "run/recipe.h"
#include "run/runner.h"
#include "run/report.h"
#include "run/store.h"

namespace r1lab::run {
namespace {

std::string fresh_dir(const std::string& name) {
  const std::string d = ::testing::TempDir() + "/" + name;
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

TEST(Recipe, YamlOverridesAndDefaults) {
  auto doc = data::yaml_to_json("name: t\nrl: {steps: 5, lr: 3e-4, loss_aggregation: token_mean}\ntask_options: {ops: \"+\"}\n");
  ASSERT_TRUE(doc.ok()) << doc.status();
  ASSERT_TRUE(apply_overrides(*doc, {"rl.steps=7", "pretrain.slip_fraction=0.25", "rl.advantage=dr_grpo", "name=x"}).ok());
  auto r = recipe_from_json(*doc);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->name, "x");
  EXPECT_EQ(r->rl.steps, 7);
  EXPECT_DOUBLE_EQ(r->rl.adam.lr, 3e-4);
  EXPECT_EQ(r->rl.grpo.aggregation, trainer::GrpoConfig::Aggregation::kTokenMean);
  EXPECT_FALSE(r->rl.scale_by_std);
  EXPECT_DOUBLE_EQ(r->pretrain.slip_fraction, 0.25);
  EXPECT_EQ(r->task.options.arithmetic.ops, "+");
  EXPECT_EQ(r->rl.group_size, 8);  // a default
  EXPECT_EQ(r->device, "cpu");
  EXPECT_EQ(r->recompute, model::Recompute::kNone);
  EXPECT_EQ(r->rollout_latents, model::LatentFormat::kAuto);
  EXPECT_FALSE(r->rollout_rescore_logprobs);
  ASSERT_TRUE(apply_overrides(*doc, {"device=cuda:1", "gemm=tf32", "recompute=selective", "rollout_latents=fp8",
                                     "rollout_rescore_logprobs=true"})
                  .ok());
  r = recipe_from_json(*doc);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->device, "cuda:1");
  EXPECT_EQ(r->gemm, "tf32");
  EXPECT_EQ(r->recompute, model::Recompute::kSelective);
  EXPECT_EQ(r->pretrain.recompute, model::Recompute::kSelective);
  EXPECT_EQ(r->rollout_latents, model::LatentFormat::kFp8);
  EXPECT_TRUE(r->rollout_rescore_logprobs);
  EXPECT_EQ(r->rewards_file().begin().key(), "r1");
}

TEST(Recipe, MistakesAreNamed) {
  struct Case {
    std::string yaml, override_, needle;
  };
  for (const Case& c : std::vector<Case>{
           {"rl: {stepz: 3}", "", "unknown key rl.stepz"},
           {"rl: {steps: three}", "", "rl.steps should be an integer"},
           {"bogus: 1", "", "unknown key bogus"},
           {"rl: {group_size: 1}", "", "group_size >= 2"},
           {"rl: {advantage: ppo}", "", "rl.advantage"},
           {"task_options: {ops: \"/\"}", "", "task_options.ops"},
           {"", "rl.steps", "not key=value"},
           {"rl: 3", "", "rl should be a mapping"},
           {"device: tpu", "", "device: unknown device 'tpu'"},
           {"device: cuda:x", "", "expected cuda or cuda:N"},
           {"gemm: fp8", "", "gemm: matrix-product precision 'fp8'"},
           {"recompute: all", "", "recompute: no recompute mode \"all\": none, selective"},
           {"rollout_latents: int4", "", "latent format 'int4': expected one of auto, f32, bf16, fp8"},
       }) {
    auto doc = data::yaml_to_json(c.yaml);
    ASSERT_TRUE(doc.ok()) << c.yaml;
    absl::Status st = apply_overrides(*doc, c.override_.empty() ? std::vector<std::string>{} : std::vector<std::string>{c.override_});
    if (st.ok()) st = recipe_from_json(*doc).status();
    ASSERT_FALSE(st.ok()) << c.yaml;
    EXPECT_NE(st.message().find(c.needle), std::string::npos) << st.message();
  }
  EXPECT_FALSE(data::yaml_to_json("a: [1, 2").ok());
  EXPECT_FALSE(load_recipe("/nonexistent/recipe.yaml", {}).ok());
}

// The shipped recipes parse.
TEST(Recipe, ShippedRecipesLoad) {
  for (const auto& e : std::filesystem::directory_iterator(R1LAB_SOURCE_DIR "/recipes")) {
    if (e.path().extension() != ".yaml") continue;
    auto r = load_recipe(e.path().string(), {});
    EXPECT_TRUE(r.ok()) << e.path() << ": " << r.status();
  }
}

// A run asked for a device it cannot have fails at once with the reason, and its store says so.
TEST(Runner, UnavailableDeviceFailsClearly) {
  auto probe = core::make_backend("cuda", "bf16");
  if (probe.ok()) GTEST_SKIP() << "a GPU is present: the cuda device is available";
  auto doc = data::yaml_to_json("name: nodevice\ndevice: cuda\n");
  ASSERT_TRUE(doc.ok());
  auto r = recipe_from_json(*doc);
  ASSERT_TRUE(r.ok()) << r.status();
  RunnerOptions opt;
  opt.in_process = true;
  opt.live = false;
  opt.run_dir = fresh_dir("nodevice");
  auto res = run_recipe(*r, opt, nullptr);
  ASSERT_FALSE(res.ok());
  EXPECT_EQ(res.status().message(), probe.status().message());
  auto store = RunStore::open(opt.run_dir + "/run.db");
  ASSERT_TRUE(store.ok()) << store.status();
  auto status = (*store)->get("status");
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(*status, "failed");
  EXPECT_FALSE(std::filesystem::exists(opt.run_dir + "/base")) << "nothing was trained";
}

TEST(Store, RoundTripAndReport) {
  const std::string dir = fresh_dir("store");
  const std::string path = dir + "/run.db";
  {
    auto s = RunStore::create(path, "demo", R"({"a": 1})");
    ASSERT_TRUE(s.ok()) << s.status();
    ASSERT_TRUE((*s)->begin_stage("rl").ok());
    for (int step = 1; step <= 20; ++step) {
      ASSERT_TRUE((*s)->log_metrics("rl", step, {{"reward_mean", 0.05 * step}, {"accuracy", 0.04 * step},
                                                  {"response_length", 20.0 + step}, {"step_seconds", 0.5},
                                                  {"rollout_seconds", 0.1}, {"train_seconds", 0.3}})
                      .ok());
    }
    ASSERT_TRUE((*s)->log_metrics("eval", 0, {{"accuracy", 0.4}}).ok());
    ASSERT_TRUE((*s)->log_metrics("eval", 20, {{"accuracy", 0.9}}).ok());
    ASSERT_TRUE((*s)->log_samples("rl", 3, {{"q", "it's \"quoted\"\n", "7", 1.1, true}}).ok());
    ASSERT_TRUE((*s)->end_stage("rl", "done").ok());
    ASSERT_TRUE((*s)->set("status", "finished").ok());
  }
  EXPECT_FALSE(RunStore::create(path, "again", "{}").ok());  // never overwrites a run
  auto s = RunStore::open(path);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(*(*s)->get("name"), "demo");
  EXPECT_FALSE((*s)->get("nothing").ok());
  auto samples = (*s)->samples("rl", 3);
  ASSERT_TRUE(samples.ok());
  ASSERT_EQ(samples->size(), 1u);
  EXPECT_EQ((*samples)[0].completion, "it's \"quoted\"\n");
  EXPECT_TRUE((*samples)[0].correct);
  auto m = (*s)->metrics();
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->size(), 20u * 6 + 2);

  auto text = report(path);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_NE(text->find("run demo: finished"), std::string::npos) << *text;
  EXPECT_NE(text->find("step 0 40.0% step 20 90.0%"), std::string::npos) << *text;
  for (const char* png : {"reward.png", "accuracy.png", "response_length.png"}) {
    const std::string p = dir + "/" + png;
    ASSERT_TRUE(std::filesystem::exists(p)) << p;
    std::ifstream in(p, std::ios::binary);
    char magic[8];
    in.read(magic, 8);
    EXPECT_EQ(std::string(magic + 1, 3), "PNG");
    EXPECT_GT(std::filesystem::file_size(p), 2000u);
  }
  const std::string other = fresh_dir("not_a_store") + "/x.db";
  std::ofstream(other) << "not sqlite";
  EXPECT_FALSE(report(other).ok());
  EXPECT_FALSE(report(dir + "/missing.db").ok());
}

}  // namespace
}  // namespace r1lab::run
