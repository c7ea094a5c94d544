// The model against the Hugging Face fixtures through the same check users run (r1lab check-parity).
#include "trainer/parity.h"

#include <filesystem>
#include <fstream>

#include "core/backend.h"
#include "nlohmann/json.hpp"

#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace r1lab::trainer {
namespace {

void expect_all_pass(const std::string& dir, const std::string& reference) {
  auto be = core::make_cpu_backend();
  ParityOptions opt;
  opt.reference = reference;
  auto rep = check_parity(dir, *be, opt);
  ASSERT_TRUE(rep.ok()) << rep.status();
  // logits, 5 hidden states, generation, token logprobs, loss and every gradient.
  EXPECT_GE(rep->items.size(), 9u + 59u);
  for (const ParityItem& it : rep->items) EXPECT_TRUE(it.pass) << it.name << ": " << it.metric << " " << it.value;
}

TEST(Parity, TinyA) { expect_all_pass(testing::fixtures_dir() + "/tiny_a", ""); }

TEST(Parity, TinyAHubLayoutAgainstTheSameReference) {
  expect_all_pass(testing::fixtures_dir() + "/tiny_a_hub_layout", testing::fixtures_dir() + "/tiny_a/reference.safetensors");
}

TEST(Parity, AWrongModelFails) {
  // tiny_a's weights with a different routed_scaling_factor must not pass.
  auto be = core::make_cpu_backend();
  std::string dir = ::testing::TempDir() + "/r1lab_wrong_model";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::filesystem::copy(testing::fixtures_dir() + "/tiny_a/model.safetensors", dir + "/model.safetensors");
  std::ifstream in(testing::fixtures_dir() + "/tiny_a/config.json");
  nlohmann::json j = nlohmann::json::parse(in);
  j["routed_scaling_factor"] = 2.0;
  std::ofstream(dir + "/config.json") << j.dump();
  ParityOptions opt;
  opt.reference = testing::fixtures_dir() + "/tiny_a/reference.safetensors";
  auto rep = check_parity(dir, *be, opt);
  ASSERT_TRUE(rep.ok()) << rep.status();
  EXPECT_FALSE(rep->all_pass());
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace r1lab::trainer
