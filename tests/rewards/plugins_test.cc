// Reward plugins: YAML rule sets, a C-ABI shared library (examples/cpp_reward_plugin), and an external
// reward server, each selected by name in a reward config with weights and gates.
#include "rewards/plugins.h"

#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"

namespace r1lab::rewards {
namespace {

std::string write_temp(const std::string& name, const std::string& text) {
  const std::string path = (std::filesystem::temp_directory_path() / (std::to_string(getpid()) + "_" + name)).string();
  std::ofstream(path) << text;
  return path;
}

TEST(YamlRules, ChecksAndCombine) {
  const std::string path = write_temp("rules.yaml", R"(
- name: polite
  checks:
    - {regex: "(?i)thank", weight: 3}
    - {not_contains: "As an AI"}
- name: tidy_answer
  combine: all
  checks:
    - {full_match: "\\s*-?\\d+\\s*", field: answer}
    - {min_length: 1, max_length: 12, field: answer}
)");
  RewardRegistry reg = RewardRegistry::with_builtin_rules();
  ASSERT_TRUE(load_yaml_rules(path, reg).ok());
  auto polite = reg.make("polite", {});
  ASSERT_TRUE(polite.ok());
  EXPECT_DOUBLE_EQ((*polite)->score({"", "Thanks!", "", "", {}}).value, 1.0);
  EXPECT_DOUBLE_EQ((*polite)->score({"", "As an AI, thank you", "", "", {}}).value, 0.75);
  const Score none = (*polite)->score({"", "As an AI", "", "", {}});
  EXPECT_DOUBLE_EQ(none.value, 0.0);
  EXPECT_EQ(none.components.at("polite.0"), 0.0);
  auto tidy = reg.make("tidy_answer", {});
  EXPECT_DOUBLE_EQ((*tidy)->score({"", "<answer> 42 </answer>", "", "", {}}).value, 1.0);
  EXPECT_DOUBLE_EQ((*tidy)->score({"", "<answer>42 apples</answer>", "", "", {}}).value, 0.0);
  // Used in a weighted sum like any rule, and a second load cannot shadow a name.
  EXPECT_TRUE(WeightedSum::from_json(reg, nlohmann::json::parse(R"([{"name": "polite", "weight": 0.5}])")).ok());
  EXPECT_EQ(load_yaml_rules(path, reg).code(), absl::StatusCode::kAlreadyExists);
  std::filesystem::remove(path);
}

TEST(YamlRules, BadFilesNameTheProblem) {
  struct Case {
    std::string yaml, expect;
  } cases[] = {
      {"- name: x\n  checks: [{regex: \"(\"}]\n", "bad pattern"},
      {"- name: x\n  checks: [{contains: a, regex: b}]\n", "exactly one of"},
      {"- name: x\n  checks: [{contians: a}]\n", "unknown key 'contians'"},
      {"- name: x\n  combine: most\n  checks: [{contains: a}]\n", "'combine'"},
      {"- checks: [{contains: a}]\n", "needs a string 'name'"},
      {"- name: x\n  checks: []\n", "non-empty"},
      {"name: [unclosed\n", "YAML"},
      {"- name: math\n  checks: [{contains: a}]\n", "exists already"},
  };
  for (const Case& c : cases) {
    const std::string path = write_temp("bad.yaml", c.yaml);
    RewardRegistry reg = RewardRegistry::with_builtin_rules();
    const absl::Status st = load_yaml_rules(path, reg);
    EXPECT_FALSE(st.ok()) << c.yaml;
    EXPECT_NE(st.message().find(c.expect), std::string::npos) << st.message();
    std::filesystem::remove(path);
  }
  RewardRegistry reg = RewardRegistry::with_builtin_rules();
  EXPECT_EQ(load_yaml_rules("/nonexistent/rules.yaml", reg).code(), absl::StatusCode::kNotFound);
}

TEST(LibraryPlugin, ExamplePluginScores) {
  RewardRegistry reg = RewardRegistry::with_builtin_rules();
  ASSERT_TRUE(load_library(R1LAB_EXAMPLE_PLUGIN, reg).ok());
  auto bonus = reg.make("length_bonus", {{"target", 10}});
  ASSERT_TRUE(bonus.ok()) << bonus.status();
  const Score s = (*bonus)->score({"", "<think>0123456789</think>", "", "", {}});
  EXPECT_DOUBLE_EQ(s.value, 1.0);
  EXPECT_EQ(s.components.at("length_bonus.chars"), 10.0);
  EXPECT_DOUBLE_EQ((*bonus)->score({"", "<think>01234</think>", "", "", {}}).value, 0.5);
  auto hedge = reg.make("no_hedging", {});
  EXPECT_DOUBLE_EQ((*hedge)->score({"", "<answer>maybe 3</answer>", "", "", {}}).value, 0.0);
  // The plugin's own parameter check reaches the user.
  auto bad = reg.make("length_bonus", {{"target", -1}});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'target' must be a number > 0"), std::string::npos);
  // Not a plugin: a clear error.
  RewardRegistry other = RewardRegistry::with_builtin_rules();
  EXPECT_FALSE(load_library("/nonexistent/libx.so", other).ok());
  // A shared library that is not a plugin: one this test has loaded anyway (GMP).
  std::string gmp;
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line) && gmp.empty();)
    if (line.find("libgmp.so") != std::string::npos) gmp = line.substr(line.find('/'));
  ASSERT_FALSE(gmp.empty());
  const absl::Status not_plugin = load_library(gmp, other);
  EXPECT_NE(not_plugin.message().find("lacks the r1lab_reward_*"), std::string::npos) << not_plugin;
}

TEST(RemoteRewards, AServerIsUsedByName) {
  // An "external" server: another process would do the same; this one is r1lab's own service.
  auto remote_set = RewardSet::make(RewardRegistry::with_builtin_rules(),
                                    nlohmann::json::parse(R"({"strict_math": [{"name": "math", "params": {"extract": ["answer_tag"]}}]})"));
  ASSERT_TRUE(remote_set.ok());
  auto server = start_reward_server(std::make_shared<const RewardSet>(*std::move(remote_set)), "127.0.0.1", 0);
  ASSERT_TRUE(server.ok());
  const std::string target = "127.0.0.1:" + std::to_string((*server)->port());
  auto set = load_reward_set(nlohmann::json::parse(R"({"plugins": [{"server": ")" + target +
                                                   R"(", "rewards": ["strict_math"]}],
                                                      "gated": [{"name": "format"}, {"name": "strict_math", "gate": "format"}]})"),
                             "");
  ASSERT_TRUE(set.ok()) << set.status();
  const RewardFn* gated = set->find("gated");
  ASSERT_NE(gated, nullptr);
  EXPECT_DOUBLE_EQ(gated->score({"", "<think>a</think><answer>0.5</answer>", "\\frac12", "", {}}).value, 2.0);
  EXPECT_DOUBLE_EQ(gated->score({"", "<answer>0.5</answer>", "\\frac12", "", {}}).value, 0.0);
  // Names the server does not offer, and servers that are not there, are errors at load time.
  EXPECT_EQ(load_reward_set(nlohmann::json::parse(R"({"plugins": [{"server": ")" + target + R"(", "rewards": ["nope"]}]})"), "")
                .status()
                .code(),
            absl::StatusCode::kNotFound);
  (*server)->shutdown();
  EXPECT_FALSE(load_reward_set(nlohmann::json::parse(R"({"plugins": [{"server": "127.0.0.1:1", "timeout_s": 2}]})"), "").ok());
  EXPECT_FALSE(load_reward_set(nlohmann::json::parse(R"({"plugins": [{"ftp": "x"}]})"), "").ok());
}

}  // namespace
}  // namespace r1lab::rewards
