// The code reward: extraction from completions, stdin/stdout and assert tests run in the sandbox in
// parallel, per-test verdicts, and hostile programs. Skips where the host cannot isolate programs.
#include "rewards/code.h"

#include <chrono>

#include "gtest/gtest.h"

namespace r1lab::rewards {
namespace {

class CodeRewardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto runner = sandbox::Runner::create();
    if (!runner.ok()) GTEST_SKIP() << "this host cannot isolate programs: " << runner.status();
  }
  static std::unique_ptr<RewardFn> make(const nlohmann::json& params) {
    auto r = RewardRegistry::with_builtin_rules().make("code", params);
    EXPECT_TRUE(r.ok()) << r.status();
    return std::move(*r);
  }
  static nlohmann::json io_tests() {
    return {{"tests",
             {{{"input", "1 2\n"}, {"output", "3\n"}},
              {{"input", "10 -4\n"}, {"output", "6"}},
              {{"input", "0 0\n"}, {"output", "0\n"}}}}};
  }
};

TEST(CodeExtraction, Fences) {
  auto c = extract_code("text ```python\nprint(1)\n``` more ```\nprint(2)\n```");
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->source, "print(2)\n");
  EXPECT_EQ(c->language, "");
  c = extract_code("```cpp\nint main(){}\n``` then ```python\nprint(1)\n``` and ```\nx\n```", "python");
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->language, "python");
  c = extract_code("```python\nwrong()\n```<answer>```python\nright()\n```</answer>");
  EXPECT_EQ(c->source, "right()\n");
  EXPECT_FALSE(extract_code("```python\nnever closed").has_value());
  EXPECT_FALSE(extract_code("no code").has_value());
}

TEST_F(CodeRewardTest, StdinStdout) {
  auto r = make({{"time_limit_ms", 2000}});
  Sample s{"", "```python\na, b = map(int, input().split())\nprint(a + b)\n```", "", "code", io_tests()};
  Score sc = r->score(s);
  EXPECT_EQ(sc.error, "");
  EXPECT_EQ(sc.value, 1.0);
  EXPECT_EQ(sc.components.at("code.passed"), 3);
  EXPECT_EQ(sc.components.at("test.0:OK"), 1.0);
  // Wrong on one test: all-or-nothing gives 0, fraction gives 2/3, and the verdict is named.
  s.completion = "```python\na, b = map(int, input().split())\nprint(a + b if a else 1)\n```";
  sc = r->score(s);
  EXPECT_EQ(sc.value, 0.0);
  EXPECT_EQ(sc.components.at("test.2:WA"), 0.0);
  auto frac = make({{"mode", "fraction"}});
  EXPECT_NEAR(frac->score(s).value, 2.0 / 3.0, 1e-12);
  // C++ by the fence's tag.
  s.completion = "```cpp\n#include <cstdio>\nint main(){long a,b;scanf(\"%ld %ld\",&a,&b);printf(\"%ld\\n\",a+b);}\n```";
  EXPECT_EQ(r->score(s).value, 1.0);
  // No program: every test fails, not an error.
  s.completion = "I would add them.";
  sc = r->score(s);
  EXPECT_EQ(sc.value, 0.0);
  EXPECT_EQ(sc.error, "");
}

TEST_F(CodeRewardTest, AssertsAndVerdicts) {
  auto r = make({{"mode", "fraction"}, {"time_limit_ms", 1000}});
  nlohmann::json meta = {{"asserts", {"assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"}}};
  Score sc = r->score({"", "```python\ndef add(a, b):\n    return a + b\n```", "", "code", meta});
  EXPECT_NEAR(sc.value, 2.0 / 3.0, 1e-12);
  EXPECT_EQ(sc.components.at("test.2:RE"), 0.0);
  // A program that never ends is cut off at the limit with TLE; one that hogs memory gets MLE or RE.
  sc = r->score({"", "```python\ndef add(a, b):\n    while True: pass\n```", "", "code", meta});
  EXPECT_EQ(sc.value, 0.0);
  EXPECT_EQ(sc.components.count("test.0:TLE"), 1u);
}

TEST_F(CodeRewardTest, TestsRunInParallelAndHostileCodeStaysInside) {
  auto r = make({{"workers", 4}, {"time_limit_ms", 1000}});
  nlohmann::json meta = {{"tests", nlohmann::json::array()}};
  for (int i = 0; i < 8; ++i) meta["tests"].push_back({{"input", ""}, {"output", "done"}});
  const auto t0 = std::chrono::steady_clock::now();
  Score sc = r->score({"", "```python\nimport time\ntime.sleep(0.4)\nprint('done')\n```", "", "code", meta});
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(sc.value, 1.0) << sc.error;
  EXPECT_LT(s, 8 * 0.4) << "8 tests of 0.4 s each ran one after another";
  // Reading host files, reaching the network, or forking without end earns nothing and harms nothing.
  sc = r->score({"", "```python\nprint(open('/etc/hostname').read())\n```", "", "code",
                 {{"tests", {{{"input", ""}, {"output", "x"}}}}}});
  EXPECT_EQ(sc.value, 0.0);
  sc = r->score({"", "```python\nimport os\nwhile True: os.fork()\n```", "", "code",
                 {{"tests", {{{"input", ""}, {"output", "x"}}}}}});
  EXPECT_EQ(sc.value, 0.0);
}

TEST_F(CodeRewardTest, BadTasksAreErrors) {
  auto r = make({});
  EXPECT_FALSE(r->score({"", "```python\nprint(1)\n```", "", "code", {}}).error.empty());
  EXPECT_FALSE(r->score({"", "```python\nprint(1)\n```", "", "code", {{"tests", "1"}}}).error.empty());
  EXPECT_FALSE(r->score({"", "```python\nprint(1)\n```", "", "code", {{"tests", {{{"input", 1}}}}}}).error.empty());
  EXPECT_FALSE(RewardRegistry::with_builtin_rules().make("code", {{"language", "cobol"}}).ok());
  EXPECT_FALSE(RewardRegistry::with_builtin_rules().make("code", {{"time_limit_ms", 0}}).ok());
}

}  // namespace
}  // namespace r1lab::rewards
