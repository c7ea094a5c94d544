// Reward throughput on this machine, each figure beside a baseline measured in the same run:
//   - math: scores per second of the "math" reward (extraction + structural equivalence) over the
//     labelled pairs of tests/rewards/testdata/math_equivalence.tsv wrapped as R1 completions with
//     ~300 characters of reasoning, on one thread and on every core; baseline: the plain numeric/text
//     "answer_match" rule on the same samples;
//   - hostile inputs: p50 / p99 / max milliseconds per score over the adversarial set (1 MB completions,
//     10 000 nested braces, 10^{100000}, \frac chains, ...);
//   - code: scores per second of the "code" reward for a trivial Python program with one stdin/stdout
//     test, through the sandbox pool on every core (skipped where the host cannot isolate programs).
// Usage: rewards [--pairs FILE.tsv] [--seconds S]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "rewards/reward.h"
#include "sandbox/sandbox.h"

namespace {

using namespace r1lab::rewards;
using Clock = std::chrono::steady_clock;

double seconds(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::vector<Sample> load_samples(const std::string& path) {
  std::ifstream in(path);
  std::vector<Sample> out;
  const std::string reasoning =
      "<think>First I restate the problem and the quantities it gives. Then I set up the relation between "
      "them, simplify step by step, and check the result against the conditions: the value is positive, "
      "it satisfies the equation, and it matches a quick estimate. So the final answer follows.</think>\n";
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    const size_t a = line.find('\t'), b = line.find('\t', a + 1), c = line.find('\t', b + 1);
    if (a == std::string::npos || b == std::string::npos || c == std::string::npos) continue;
    const std::string options = line.substr(c + 1, line.find('\t', c + 1) - c - 1);
    if (options.find("extract") != std::string::npos) continue;  // already whole completions
    out.push_back({"", reasoning + "<answer>" + line.substr(a + 1, b - a - 1) + "</answer>", line.substr(0, a), "math", {}});
  }
  return out;
}

// Scores per second of `fn` over `samples` (cycled) on `threads` threads for about `secs` seconds.
double throughput(const RewardFn& fn, const std::vector<Sample>& samples, int threads, double secs) {
  std::atomic<int64_t> done{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> ts;
  const auto t0 = Clock::now();
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      size_t i = static_cast<size_t>(t) * 7919;
      int64_t n = 0;
      double sink = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        for (int k = 0; k < 64; ++k) sink += fn.score(samples[i++ % samples.size()]).value;
        n += 64;
      }
      done += n + static_cast<int64_t>(sink * 0);
    });
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(secs));
  stop = true;
  for (auto& t : ts) t.join();
  return static_cast<double>(done.load()) / seconds(t0);
}

std::vector<std::string> hostile() {
  std::vector<std::string> c;
  c.push_back(std::string(1 << 20, 'a') + " \\boxed{" + std::string(1000, '9') + "}");
  c.push_back(std::string(1 << 20, '7'));
  c.push_back("\\boxed{" + std::string(10000, '{') + "1" + std::string(10000, '}') + "}");
  c.push_back("<answer>" + std::string(5000, '(') + "1" + std::string(5000, ')') + "</answer>");
  std::string frac = "1";
  for (int i = 0; i < 3000; ++i) frac = "\\frac{" + frac + "}{2}";
  c.push_back("<answer>" + frac + "</answer>");
  c.push_back("<answer>10^{100000}</answer>");
  c.push_back("<answer>10^{10^{10}}</answer>");
  c.push_back("<answer>(10^{100000})!</answer>");
  c.push_back("<answer>\\sqrt[1000000000]{2}</answer>");
  c.push_back(std::string(100000, '(') + "a*)*$" + std::string(100000, '\\'));
  c.push_back("<answer>\xff\xfe\xc3\x28 12 \xe2\x82</answer>");
  std::string spam;
  for (int i = 0; i < 20000; ++i) spam += "the answer is ";
  c.push_back(spam);
  std::string list = "<answer>";
  for (int i = 0; i < 4000; ++i) list += "1,";
  c.push_back(list + "1</answer>");
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  std::string pairs = R1LAB_DEFAULT_PAIRS;
  double secs = 2.0;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--pairs")) pairs = argv[i + 1];
    if (!std::strcmp(argv[i], "--seconds")) secs = std::atof(argv[i + 1]);
  }
  const std::vector<Sample> samples = load_samples(pairs);
  if (samples.empty()) {
    std::fprintf(stderr, "rewards: no pairs in %s\n", pairs.c_str());
    return 1;
  }
  const RewardRegistry reg = RewardRegistry::with_builtin_rules();
  auto math = reg.make("math", {});
  auto plain = reg.make("answer_match", {{"require_tags", true}});
  if (!math.ok() || !plain.ok()) return 1;
  const int cores = std::max(1u, std::thread::hardware_concurrency());
  std::printf("reward throughput, %zu labelled answers as R1 completions, %d cores\n\n", samples.size(), cores);
  std::printf("%-44s %14s %14s %8s\n", "", "reward", "baseline", "ratio");
  for (int threads : {1, cores}) {
    const double m = throughput(**math, samples, threads, secs);
    const double b = throughput(**plain, samples, threads, secs);
    std::printf("%-44s %12.0f/s %12.0f/s %7.2fx\n",
                (std::string("math scores, ") + std::to_string(threads) + " thread(s) (vs answer_match)").c_str(), m, b,
                m / b);
  }

  std::vector<double> ms;
  for (const std::string& c : hostile()) {
    for (int rep = 0; rep < 20; ++rep) {
      const auto t0 = Clock::now();
      (void)(*math)->score({"", c, "\\frac{1}{2}", "math", {}});
      ms.push_back(seconds(t0) * 1e3);
    }
  }
  std::sort(ms.begin(), ms.end());
  std::printf("\nhostile inputs (%zu scores): p50 %.3f ms, p99 %.3f ms, max %.3f ms (target p99 <= 10 ms)\n", ms.size(),
              ms[ms.size() / 2], ms[static_cast<size_t>(0.99 * (ms.size() - 1))], ms.back());

  if (!r1lab::sandbox::Runner::create().ok()) {
    std::printf("\ncode: skipped, this host cannot isolate programs (r1lab sandbox check says why)\n");
    return 0;
  }
  auto code = reg.make("code", {{"workers", cores}});
  if (!code.ok()) return 1;
  const Sample trivial{"", "```python\nprint(int(input()) * 2)\n```", "", "code",
                       {{"tests", {{{"input", "21\n"}, {"output", "42\n"}}}}}};
  if ((*code)->score(trivial).value != 1.0) {
    std::fprintf(stderr, "code: the trivial program did not pass\n");
    return 1;
  }
  const std::vector<Sample> one{trivial};
  const double c = throughput(**code, one, 2 * cores, secs);
  std::printf("code scores, trivial Python, 1 test, %d workers: %.1f/s (%.1f ms each per worker)\n", cores, c,
              1e3 * cores / c);
  return 0;
}
