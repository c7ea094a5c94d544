// The Runner's verdicts and measurements on ordinary programs, its checks of what it is given, honest
// degradation where protections are missing, and the Pool.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "sandbox/pool.h"
#include "sandbox/sandbox.h"

namespace r1lab::sandbox {
namespace {

class RunnerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto r = Runner::create();
    if (!r.ok()) {
      skip_ = std::string(r.status().message());
    } else if (!(*r)->protections().missing().empty()) {
      skip_ = "this host cannot isolate programs:\n" + (*r)->protections().describe();
    } else {
      runner_ = std::move(*r);
    }
  }
  static void TearDownTestSuite() { runner_.reset(); }
  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
  }
  static Result run(Language lang, const std::string& src, const std::string& in = "",
                    std::optional<std::string> expected = std::nullopt, Limits lim = {}) {
    Program p;
    p.lang = lang;
    p.source = src;
    p.stdin_data = in;
    auto r = runner_->run(p, lim, expected);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : Result{};
  }
  static inline std::string skip_;
  static inline std::unique_ptr<Runner> runner_;
};

TEST_F(RunnerTest, PythonReadsStdinAndWrites) {
  Result r = run(Language::kPython, "import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))\n", "1 2 3 4\n");
  EXPECT_EQ(r.verdict, Verdict::kOk) << r.message;
  EXPECT_EQ(r.stdout_data, "10\n");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_GT(r.wall_ms, 0);
  EXPECT_GT(r.memory_kb, 1000);  // an interpreter holds more than a megabyte
  EXPECT_FALSE(r.truncated);
}

TEST_F(RunnerTest, LargeStdinAndStdoutPassThrough) {
  std::string in;
  for (int i = 0; i < 120000; ++i) in += std::to_string(i) + "\n";
  Result r = run(Language::kPython, "import sys\nsys.stdout.write(sys.stdin.read())\n", in);
  EXPECT_EQ(r.verdict, Verdict::kOk) << r.message;
  EXPECT_EQ(r.stdout_data, in);
}

TEST_F(RunnerTest, ExpectedOutputGivesOkOrWrongAnswer) {
  EXPECT_EQ(run(Language::kPython, "print('42')\n", "", "42\n").verdict, Verdict::kOk);
  EXPECT_EQ(run(Language::kPython, "print('42  ')\nprint()\n", "", "42").verdict, Verdict::kOk);  // trailing space
  Result wa = run(Language::kPython, "print('41')\n", "", "42\n");
  EXPECT_EQ(wa.verdict, Verdict::kWrongAnswer);
  EXPECT_EQ(wa.stdout_data, "41\n");
}

TEST_F(RunnerTest, RuntimeErrorsCarryExitCodeOrSignal) {
  Result exit3 = run(Language::kPython, "import sys\nsys.exit(3)\n");
  EXPECT_EQ(exit3.verdict, Verdict::kRuntimeError);
  EXPECT_EQ(exit3.exit_code, 3);
  Result raised = run(Language::kPython, "raise ValueError('boom')\n");
  EXPECT_EQ(raised.verdict, Verdict::kRuntimeError);
  EXPECT_TRUE(absl::StrContains(raised.stderr_data, "ValueError: boom"));
  Result segv = run(Language::kC, "int main(){volatile int*p=0;return *p;}\n");
  EXPECT_EQ(segv.verdict, Verdict::kRuntimeError);
  EXPECT_EQ(segv.signal, 11);
  EXPECT_TRUE(absl::StrContains(segv.message, "signal 11"));
  Result abrt = run(Language::kCpp, "#include <cstdlib>\nint main(){std::abort();}\n");
  EXPECT_EQ(abrt.signal, 6);
}

TEST_F(RunnerTest, CAndCppCompileAndRun) {
  Result c = run(Language::kC, "#include <stdio.h>\n#include <math.h>\nint main(){int n;scanf(\"%d\",&n);"
                               "printf(\"%.0f\\n\", sqrt((double)n));}\n", "144\n");
  EXPECT_EQ(c.verdict, Verdict::kOk) << c.message << c.compile_output;
  EXPECT_EQ(c.stdout_data, "12\n");
  Result cpp = run(Language::kCpp, "#include <iostream>\n#include <vector>\n#include <numeric>\nint main(){"
                                   "std::vector<long> v(100);std::iota(v.begin(),v.end(),1);"
                                   "std::cout<<std::accumulate(v.begin(),v.end(),0L)<<std::endl;}\n");
  EXPECT_EQ(cpp.verdict, Verdict::kOk) << cpp.message << cpp.compile_output;
  EXPECT_EQ(cpp.stdout_data, "5050\n");
}

TEST_F(RunnerTest, CompileErrorsKeepTheDiagnostics) {
  Result r = run(Language::kC, "int main(){ return undefined_name; }\n");
  EXPECT_EQ(r.verdict, Verdict::kCompilationError);
  EXPECT_TRUE(absl::StrContains(r.compile_output, "undefined_name")) << r.compile_output;
  EXPECT_TRUE(r.stdout_data.empty());
}

TEST_F(RunnerTest, FilesAreWrittenIntoTheWorkDirectory) {
  Program p;
  p.source = "print(open('data/in.txt').read().upper())\nimport helper\nprint(helper.X)\n";
  p.files = {{"data/in.txt", "abc"}, {"helper.py", "X = 7\n"}};
  auto r = runner_->run(p, {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->verdict, Verdict::kOk) << r->stderr_data;
  EXPECT_EQ(r->stdout_data, "ABC\n7\n");
}

TEST_F(RunnerTest, CpuTimeAndWallTimeAreMeasured) {
  Limits lim;
  lim.time_limit_ms = 3000;
  Result busy = run(Language::kPython, "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3:\n    pass\n",
                    "", std::nullopt, lim);
  EXPECT_EQ(busy.verdict, Verdict::kOk);
  EXPECT_GE(busy.cpu_ms, 290);
  EXPECT_LT(busy.cpu_ms, 1500);
  Result idle = run(Language::kPython, "import time\ntime.sleep(0.3)\n", "", std::nullopt, lim);
  EXPECT_EQ(idle.verdict, Verdict::kOk);
  EXPECT_GE(idle.wall_ms, 295);
  EXPECT_LT(idle.cpu_ms, 200);
}

TEST_F(RunnerTest, MemoryIsMeasured) {
  Result r = run(Language::kPython, "x = bytearray(100 << 20)\nfor i in range(0, len(x), 4096):\n    x[i] = 1\n");
  EXPECT_EQ(r.verdict, Verdict::kOk) << r.message;
  EXPECT_GE(r.memory_kb, 100 * 1024);
  EXPECT_LT(r.memory_kb, 200 * 1024);
}

TEST_F(RunnerTest, RejectsBadProgramsAndLimits) {
  Program p;
  p.source = "print(1)\n";
  for (const char* bad : {"../x", "/etc/passwd", "a/../../x", "", "a//b", "./x", "main.py"}) {
    Program q = p;
    q.files = {{bad, "x"}};
    auto r = runner_->run(q, {});
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  Limits lim;
  lim.time_limit_ms = 0;
  EXPECT_EQ(runner_->run(p, lim).status().code(), absl::StatusCode::kInvalidArgument);
  lim = {};
  lim.memory_mb = -5;
  auto r = runner_->run(p, lim);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "memory_mb"));
}

TEST_F(RunnerTest, ResultJsonHasEveryField) {
  Result r = run(Language::kPython, "import sys\nsys.stdout.buffer.write(b'ok \\xff\\n')\n");
  auto j = nlohmann::json::parse(result_json(r));
  for (const char* k : {"verdict", "exit_code", "signal", "cpu_ms", "wall_ms", "memory_kb", "stdout", "stderr", "truncated"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_EQ(j["verdict"], "OK");
  EXPECT_EQ(j["stdout"], "ok \xEF\xBF\xBD\n");  // invalid UTF-8 replaced, not an exception
}

TEST(OutputMatches, ComparesLinesWithoutTrailingSpace) {
  EXPECT_TRUE(output_matches("1 2\n3\n", "1 2\n3"));
  EXPECT_TRUE(output_matches("1 2 \r\n3\n\n\n", "1 2\n3\n"));
  EXPECT_FALSE(output_matches("1  2\n3\n", "1 2\n3\n"));
  EXPECT_FALSE(output_matches("1 2\n", "1 2\n3\n"));
  EXPECT_FALSE(output_matches("\n1 2\n", "1 2\n"));
}

TEST(Degradation, RefusesWhereAProtectionIsMissing) {
  RunnerOptions opt;
  opt.pretend_missing = {"user_ns", "seccomp"};
  auto r = Runner::create(opt);
  if (!r.ok()) GTEST_SKIP() << r.status();
  EXPECT_EQ((*r)->protections().missing().size() >= 2, true);
  Program p;
  p.source = "print('hi')\n";
  auto res = (*r)->run(p, {});
  ASSERT_EQ(res.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(res.status().message(), "user namespaces")) << res.status();
  EXPECT_TRUE(absl::StrContains(res.status().message(), "seccomp")) << res.status();
}

TEST(Degradation, RunsWhenExplicitlyAllowedAndSaysWhatIsMissing) {
  RunnerOptions opt;
  opt.pretend_missing = {"user_ns"};
  opt.allow_unsafe = true;
  auto r = Runner::create(opt);
  if (!r.ok()) GTEST_SKIP() << r.status();
  Program p;
  p.source = "import os\nprint(len(os.listdir('/proc')) > 3, os.getcwd().startswith('/tmp/r1lab-sandbox-'))\n"
             "open('x', 'w').write('scratch')\n";
  auto res = (*r)->run(p, {});
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(res->verdict, Verdict::kOk) << res->message << res->stderr_data;
  // Without a PID namespace the host's processes are visible: the program ran, unprotected, and we say so.
  EXPECT_EQ(res->stdout_data, "True True\n");
  EXPECT_TRUE(absl::StrContains(res->message, "WITHOUT user namespaces")) << res->message;
  // Still: a time limit and the process tree are enforced without namespaces.
  Limits lim;
  lim.time_limit_ms = 500;
  lim.wall_limit_ms = 1000;
  p.source = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\nwhile True:\n    pass\n";
  res = (*r)->run(p, lim);
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(res->verdict, Verdict::kTimeLimitExceeded);
}

TEST_F(RunnerTest, PoolRunsConcurrentlyWithBackpressure) {
  Pool pool(*runner_, PoolOptions{2, 2});
  EXPECT_EQ(pool.workers(), 2);
  Limits lim;
  lim.time_limit_ms = 5000;
  Program slow;
  // Each job reports when it ran (the host's clock): at most two may overlap, and with four 0.4 s jobs
  // on two workers some do.
  slow.source = "import time\nt0 = time.time()\ntime.sleep(0.4)\nprint(t0, time.time())\n";
  std::vector<Pool::Future> fs;
  for (int i = 0; i < 4; ++i) fs.push_back(pool.submit(slow, lim));
  // Two run, two wait: the queue is full now.
  auto rejected = pool.try_submit(slow, lim);
  EXPECT_EQ(rejected.status().code(), absl::StatusCode::kResourceExhausted);
  std::vector<std::pair<double, double>> spans;
  for (auto& f : fs) {
    auto r = f.get();
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->verdict, Verdict::kOk) << r->message;
    double a0 = 0, a1 = 0;
    ASSERT_EQ(std::sscanf(r->stdout_data.c_str(), "%lf %lf", &a0, &a1), 2) << r->stdout_data;
    spans.emplace_back(a0, a1);
  }
  int most = 0;
  for (const auto& [s0, s1] : spans) {
    int at = 0;  // jobs running at the moment s0 + 1 ms
    for (const auto& [t0, t1] : spans) at += t0 <= s0 + 1e-3 && s0 + 1e-3 < t1;
    most = std::max(most, at);
  }
  EXPECT_EQ(most, 2);
  // Many short jobs from several threads, each with its own answer.
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int t = 0; t < 3; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 5; ++i) {
        Program p;
        p.source = "print(" + std::to_string(t * 100 + i) + ")\n";
        auto r = pool.submit(p, {}).get();
        if (r.ok() && r->stdout_data == std::to_string(t * 100 + i) + "\n") ++ok;
      }
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(ok.load(), 15);
}

}  // namespace
}  // namespace r1lab::sandbox
