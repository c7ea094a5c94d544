// Sandbox figures, each beside the same work done without a sandbox in the same run:
//   - latency of one trivial Python program: a bare interpreter start (posix_spawn + wait) against a
//     sandboxed run (launcher, namespaces, mounts, seccomp, rlimits, verdict); the difference is the
//     sandbox's per-run overhead;
//   - executions per second through a Pool on every core, for a trivial program and for one that computes
//     for 100 ms, against bare interpreters run as many at a time;
//   - C: compile + run of a trivial program.
// Usage: sandbox [--runs N] [--workers W]
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "sandbox/pool.h"
#include "sandbox/sandbox.h"

extern char** environ;

namespace {

using namespace r1lab::sandbox;
using Clock = std::chrono::steady_clock;

double seconds(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

constexpr char kTrivial[] = "print('ok')\n";
// About 100 ms of CPU in CPython on a 2020s core, whatever the machine: a fixed amount of work.
constexpr char kHundredMs[] = "s = 0\nfor i in range(2_500_000):\n    s += i\nprint(s)\n";

// One bare interpreter run of `file` in `dir`.
void bare_run(const std::string& python, const std::string& dir, const std::string& file) {
  const std::string path = dir + "/" + file;
  const char* argv[] = {python.c_str(), "-E", "-s", "-B", path.c_str(), nullptr};
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  pid_t pid;
  if (posix_spawn(&pid, python.c_str(), &fa, nullptr, const_cast<char**>(argv), environ) == 0) {
    int st;
    waitpid(pid, &st, 0);
  }
  posix_spawn_file_actions_destroy(&fa);
}

// Runs f n times on `workers` threads; returns runs per second.
template <typename F>
double throughput(int n, int workers, F f) {
  std::atomic<int> next{0};
  const auto t0 = Clock::now();
  std::vector<std::thread> ts;
  for (int w = 0; w < workers; ++w)
    ts.emplace_back([&] {
      while (next.fetch_add(1) < n) f();
    });
  for (auto& t : ts) t.join();
  return n / seconds(t0);
}

template <typename F>
double median_ms(int n, F f) {
  std::vector<double> v;
  for (int i = 0; i < n; ++i) {
    const auto t0 = Clock::now();
    f();
    v.push_back(seconds(t0) * 1e3);
  }
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int runs = 100, workers = static_cast<int>(std::thread::hardware_concurrency());
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--runs") && i + 1 < argc) runs = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--workers") && i + 1 < argc) workers = std::atoi(argv[++i]);
  }
  auto runner = Runner::create();
  if (!runner.ok()) {
    std::fprintf(stderr, "sandbox: %s\n", std::string(runner.status().message()).c_str());
    return 1;
  }
  std::printf("protections:\n%s\n", (*runner)->protections().describe().c_str());
  if (!(*runner)->protections().missing().empty()) {
    std::fprintf(stderr, "sandbox: this host cannot isolate programs; nothing to measure\n");
    return 1;
  }
  const std::string python = (*runner)->options().python;
  const std::string dir = std::filesystem::temp_directory_path() / ("r1lab-bench-sandbox-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/trivial.py") << kTrivial;
  std::ofstream(dir + "/hundred.py") << kHundredMs;

  Limits lim;
  lim.time_limit_ms = 5000;
  Program trivial, hundred, c;
  trivial.source = kTrivial;
  hundred.source = kHundredMs;
  c.lang = Language::kC;
  c.source = "#include <stdio.h>\nint main(){puts(\"ok\");}\n";
  auto sandboxed = [&](const Program& p) {
    auto r = (*runner)->run(p, lim);
    if (!r.ok() || r->verdict != Verdict::kOk) {
      std::fprintf(stderr, "sandbox: unexpected result: %s\n",
                   r.ok() ? result_json(*r).c_str() : std::string(r.status().message()).c_str());
      std::exit(1);
    }
  };
  // Warm up both (page cache, the interpreter's .pyc files).
  for (int i = 0; i < 5; ++i) {
    bare_run(python, dir, "trivial.py");
    sandboxed(trivial);
  }

  const double bare_ms = median_ms(runs, [&] { bare_run(python, dir, "trivial.py"); });
  const double sb_ms = median_ms(runs, [&] { sandboxed(trivial); });
  const double bare_100 = median_ms(std::max(runs / 5, 5), [&] { bare_run(python, dir, "hundred.py"); });
  const double sb_100 = median_ms(std::max(runs / 5, 5), [&] { sandboxed(hundred); });
  const double sb_c = median_ms(std::max(runs / 10, 5), [&] { sandboxed(c); });

  Pool pool(**runner, PoolOptions{workers, 4 * workers});
  auto pool_rate = [&](const Program& p, int n) {
    return throughput(n, workers, [&] {
      auto r = pool.submit(p, lim).get();
      if (!r.ok() || r->verdict != Verdict::kOk) std::exit(1);
    });
  };
  const double bare_rate = throughput(runs * 2, workers, [&] { bare_run(python, dir, "trivial.py"); });
  const double sb_rate = pool_rate(trivial, runs * 2);
  const double bare_rate_100 = throughput(std::max(runs / 2, 10), workers, [&] { bare_run(python, dir, "hundred.py"); });
  const double sb_rate_100 = pool_rate(hundred, std::max(runs / 2, 10));

  std::printf("%-44s %12s %12s %10s\n", ("latency, median of " + std::to_string(runs)).c_str(), "bare", "sandboxed", "ratio");
  std::printf("%-44s %10.1f ms %10.1f ms %9.2fx\n", "python: trivial program", bare_ms, sb_ms, sb_ms / bare_ms);
  std::printf("%-44s %10.1f ms %10.1f ms %9.2fx\n", "python: 100 ms of computation", bare_100, sb_100, sb_100 / bare_100);
  std::printf("%-44s %12s %10.1f ms\n", "c: compile + run a trivial program", "-", sb_c);
  std::printf("%-44s %12s %10.1f ms\n", "per-run overhead beyond the interpreter start", "-", sb_ms - bare_ms);
  std::printf("\n%-44s %12s %12s %10s\n", ("throughput, " + std::to_string(workers) + " at a time").c_str(), "bare/s",
              "sandboxed/s", "ratio");
  std::printf("%-44s %12.1f %12.1f %9.2fx\n", "python: trivial program", bare_rate, sb_rate, sb_rate / bare_rate);
  std::printf("%-44s %12.1f %12.1f %9.2fx\n", "python: 100 ms of computation", bare_rate_100, sb_rate_100,
              sb_rate_100 / bare_rate_100);
  std::filesystem::remove_all(dir);
  return 0;
}
