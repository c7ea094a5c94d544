// Isolated execution of untrusted, model-written programs.
//
// A run goes through a small launcher program (`r1lab-sandbox-launcher`, started with Boost.Process) that
// sets up, before the program's exec:
//   - new user, PID, network, mount, IPC and UTS namespaces (the launcher's child is PID 1 of the new PID
//     namespace, so when it ends the kernel kills every process the program left behind);
//   - a read-only root prepared once per Runner (mount points and symlinks) onto which only the interpreter
//     or compiler and their libraries are bind-mounted read-only, a fresh tmpfs /work (the program and its
//     files, the working directory) and /tmp, a private /proc, and /dev with null, zero, full, random and
//     urandom only;
//   - no capabilities, no_new_privs, and a seccomp-bpf filter (ptrace, mount, namespaces, kexec, bpf,
//     perf_event_open, keyrings, reboot, modules, io_uring and sockets other than AF_UNIX are denied);
//   - rlimits (CPU time, address space, processes, file size, open files, no core dumps) and, where the host
//     delegates a cgroup v2 directory with the memory and pids controllers, memory.max and pids.max;
//   - a clean environment.
// The wall-clock limit and the output caps kill the whole process tree.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace r1lab::sandbox {

enum class Language { kPython, kC, kCpp };
absl::StatusOr<Language> parse_language(const std::string& name);  // "python", "c", "cpp" (also "c++")
const char* language_name(Language lang);

// A program and what it is given. `files` are written into the work directory before the run; names are
// relative paths without "..", at most 8 levels deep.
struct Program {
  Language lang = Language::kPython;
  std::string source;
  std::string stdin_data;
  std::map<std::string, std::string> files;
};

// Limits of one run. The compile step of C and C++ has its own (Limits::compile_*).
struct Limits {
  int64_t time_limit_ms = 2000;          // CPU time of the program (all its processes and threads)
  int64_t wall_limit_ms = 0;             // 0: 2 x time_limit_ms + 1000
  int64_t memory_mb = 256;               // address space of each process; memory.max with cgroups
  int64_t max_processes = 32;            // processes and threads alive at once
  int64_t output_limit_bytes = 1 << 20;  // stdout and stderr each; beyond it the program is killed (OLE)
  int64_t file_size_limit_bytes = 16 << 20;  // largest file the program may write
  int64_t work_dir_mb = 64;              // size of the tmpfs work directory (and of /tmp)
  int64_t max_open_files = 64;
  // Compilation of C and C++ (inside the same sandbox).
  int64_t compile_time_limit_ms = 10000;
  int64_t compile_memory_mb = 1024;
  int64_t compile_output_limit_bytes = 64 << 10;

  int64_t effective_wall_limit_ms() const { return wall_limit_ms > 0 ? wall_limit_ms : 2 * time_limit_ms + 1000; }
};

enum class Verdict {
  kOk,                     // exited 0 (and matched the expected output where one was given)
  kWrongAnswer,            // exited 0, output differs from the expected output
  kTimeLimitExceeded,      // CPU time or wall-clock limit
  kMemoryLimitExceeded,    // ran out of its memory limit
  kOutputLimitExceeded,    // stdout/stderr cap or file size limit
  kRuntimeError,           // non-zero exit or killed by a signal
  kCompilationError,       // C/C++ did not compile (also when the compiler hit its limits)
  kSandboxError,           // the sandbox itself failed; the program's behaviour is unknown
};
const char* verdict_name(Verdict v);  // "OK", "WA", "TLE", "MLE", "OLE", "RE", "CE", "SE"

struct Result {
  Verdict verdict = Verdict::kSandboxError;
  int exit_code = -1;  // when it exited
  int signal = 0;      // when a signal ended it
  int64_t cpu_ms = 0, wall_ms = 0;
  int64_t memory_kb = 0;  // peak resident memory (largest process; cgroup peak where cgroups are used)
  std::string stdout_data, stderr_data;
  bool truncated = false;      // stdout or stderr hit output_limit_bytes
  std::string compile_output;  // compiler diagnostics (C/C++)
  std::string message;         // why, for anything but OK, in words
};

// Compares program output with the expected output: lines compared after trailing whitespace is removed;
// trailing empty lines are ignored.
bool output_matches(const std::string& got, const std::string& expected);

// The result as one JSON object: {"verdict", "exit_code", "signal", "cpu_ms", "wall_ms", "memory_kb",
// "stdout", "stderr", "truncated"} plus "compile_output" and "message" where not empty. Invalid UTF-8 in
// the program's output is replaced by U+FFFD.
std::string result_json(const Result& r);

// What the host lets the sandbox use, found by a probe run of the launcher.
struct Protections {
  bool user_ns = false, pid_ns = false, net_ns = false, mount_ns = false, ipc_ns = false, uts_ns = false;
  bool seccomp = false;
  bool cgroup = false;         // a cgroup v2 directory with memory and pids is delegated to us
  std::string cgroup_dir;      // where sandbox cgroups are created
  std::string cgroup_detail;   // why cgroups are not used, where they are not
  std::vector<std::string> missing() const;  // the protections a run requires that are absent
  std::string describe() const;              // one line per protection
};

struct RunnerOptions {
  std::string launcher;  // path of r1lab-sandbox-launcher; default: beside this program, or $R1LAB_SANDBOX_LAUNCHER
  std::string python = "/usr/bin/python3";
  std::string cc = "/usr/bin/gcc", cxx = "/usr/bin/g++";
  // Run even where namespaces or seccomp are missing (after saying which). Never the default: without them
  // the program can see and reach the host.
  bool allow_unsafe = false;
  // Where sandbox cgroups go: a cgroup v2 directory with memory and pids in cgroup.subtree_control that we may
  // write. Empty: $R1LAB_SANDBOX_CGROUP, else found from /proc/self/cgroup where the host delegates one.
  std::string cgroup_parent;
  // For tests of degraded hosts: act as if these protections were missing ("user_ns", "seccomp", ...).
  std::vector<std::string> pretend_missing;
};

// Runs programs. Thread-safe: run() may be called from many threads (see Pool for a bounded one).
class Runner {
 public:
  // Probes the host, resolves the interpreters and prepares the read-only roots (one per language).
  static absl::StatusOr<std::unique_ptr<Runner>> create(RunnerOptions options = {});
  ~Runner();
  Runner(const Runner&) = delete;
  Runner& operator=(const Runner&) = delete;

  // InvalidArgument for a bad program or limits, FailedPrecondition where a protection is missing and unsafe
  // runs are not allowed; otherwise a Result (kSandboxError when the sandbox failed).
  absl::StatusOr<Result> run(const Program& program, const Limits& limits,
                             const std::optional<std::string>& expected_output = std::nullopt) const;

  const Protections& protections() const { return protections_; }
  const RunnerOptions& options() const { return options_; }

 private:
  struct Root;
  Runner() = default;
  RunnerOptions options_;
  Protections protections_;
  std::string scratch_;  // holds the prepared roots; removed with the Runner
  std::map<Language, std::unique_ptr<Root>> roots_;
};

}  // namespace r1lab::sandbox
