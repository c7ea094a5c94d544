#include <limits.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>

#include <boost/process.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "nlohmann/json.hpp"
#include "sandbox/sandbox.h"
#include "sandbox/wire.h"

namespace r1lab::sandbox {
namespace fs = std::filesystem;
namespace bp = boost::process;

absl::StatusOr<Language> parse_language(const std::string& name) {
  const std::string n = absl::AsciiStrToLower(name);
  if (n == "python" || n == "python3" || n == "py") return Language::kPython;
  if (n == "c") return Language::kC;
  if (n == "cpp" || n == "c++" || n == "cxx") return Language::kCpp;
  return absl::InvalidArgumentError(absl::StrCat("unknown language '", name, "' (python, c, cpp)"));
}

const char* language_name(Language lang) {
  switch (lang) {
    case Language::kPython: return "python";
    case Language::kC: return "c";
    case Language::kCpp: return "cpp";
  }
  return "?";
}

const char* verdict_name(Verdict v) {
  switch (v) {
    case Verdict::kOk: return "OK";
    case Verdict::kWrongAnswer: return "WA";
    case Verdict::kTimeLimitExceeded: return "TLE";
    case Verdict::kMemoryLimitExceeded: return "MLE";
    case Verdict::kOutputLimitExceeded: return "OLE";
    case Verdict::kRuntimeError: return "RE";
    case Verdict::kCompilationError: return "CE";
    case Verdict::kSandboxError: return "SE";
  }
  return "?";
}

bool output_matches(const std::string& got, const std::string& expected) {
  auto lines = [](const std::string& s) {
    std::vector<std::string> out;
    for (absl::string_view l : absl::StrSplit(s, '\n')) out.emplace_back(absl::StripTrailingAsciiWhitespace(l));
    while (!out.empty() && out.back().empty()) out.pop_back();
    return out;
  };
  return lines(got) == lines(expected);
}

std::string result_json(const Result& r) {
  nlohmann::json j = {{"verdict", verdict_name(r.verdict)},
                      {"exit_code", r.exit_code},
                      {"signal", r.signal},
                      {"cpu_ms", r.cpu_ms},
                      {"wall_ms", r.wall_ms},
                      {"memory_kb", r.memory_kb},
                      {"stdout", r.stdout_data},
                      {"stderr", r.stderr_data},
                      {"truncated", r.truncated}};
  if (!r.compile_output.empty()) j["compile_output"] = r.compile_output;
  if (!r.message.empty()) j["message"] = r.message;
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::vector<std::string> Protections::missing() const {
  std::vector<std::string> m;
  if (!user_ns) m.push_back("user namespaces");
  if (!pid_ns) m.push_back("PID namespaces");
  if (!net_ns) m.push_back("network namespaces");
  if (!mount_ns) m.push_back("mount namespaces");
  if (!ipc_ns) m.push_back("IPC namespaces");
  if (!uts_ns) m.push_back("UTS namespaces");
  if (!seccomp) m.push_back("seccomp-bpf");
  return m;
}

std::string Protections::describe() const {
  auto yn = [](bool b) { return b ? "yes" : "NO"; };
  return absl::StrCat("user namespace: ", yn(user_ns), "\nPID namespace: ", yn(pid_ns), "\nnetwork namespace: ",
                      yn(net_ns), "\nmount namespace: ", yn(mount_ns), "\nIPC namespace: ", yn(ipc_ns),
                      "\nUTS namespace: ", yn(uts_ns), "\nseccomp-bpf: ", yn(seccomp),
                      "\ncgroup v2 memory+pids limits: ", cgroup ? absl::StrCat("yes (", cgroup_dir, ")")
                                                                 : absl::StrCat("no (", cgroup_detail, ")"),
                      "\n");
}

namespace {

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

bool has_controllers(const std::string& list) {
  std::vector<std::string> c = absl::StrSplit(absl::StripAsciiWhitespace(list), ' ', absl::SkipEmpty());
  return std::count(c.begin(), c.end(), "memory") && std::count(c.begin(), c.end(), "pids");
}

// A cgroup v2 directory where sandboxes may get memory.max and pids.max, or why there is none.
void find_cgroup(const std::string& requested, Protections* p) {
  std::string dir = requested;
  if (dir.empty())
    if (const char* e = std::getenv("R1LAB_SANDBOX_CGROUP")) dir = e;
  if (!dir.empty()) {
    if (!has_controllers(read_text(dir + "/cgroup.subtree_control"))) {
      p->cgroup_detail = absl::StrCat(dir, " does not delegate memory and pids (cgroup.subtree_control)");
    } else if (access(dir.c_str(), W_OK) != 0) {
      p->cgroup_detail = absl::StrCat(dir, " is not writable");
    } else {
      p->cgroup = true;
      p->cgroup_dir = dir;
    }
    return;
  }
  std::string mnt;
  std::ifstream mi("/proc/self/mountinfo");
  for (std::string line; std::getline(mi, line);) {
    // "... mount_point ... - cgroup2 cgroup2 rw"
    std::vector<std::string> f = absl::StrSplit(line, ' ');
    auto dash = std::find(f.begin(), f.end(), "-");
    if (f.size() > 4 && dash != f.end() && dash + 1 != f.end() && *(dash + 1) == "cgroup2") mnt = f[4];
  }
  if (mnt.empty()) {
    p->cgroup_detail = "no cgroup v2 hierarchy is mounted";
    return;
  }
  std::string own;
  std::ifstream cg("/proc/self/cgroup");
  for (std::string line; std::getline(cg, line);)
    if (absl::StartsWith(line, "0::")) own = line.substr(3);
  const std::string here = mnt + (own == "/" ? "" : own);
  const std::string controllers = std::string(absl::StripAsciiWhitespace(read_text(here + "/cgroup.controllers")));
  if (!has_controllers(controllers)) {
    p->cgroup_detail = absl::StrCat("this process's cgroup v2 (", here, ") has the controllers [", controllers,
                                    "], not both memory and pids");
    return;
  }
  // The root cgroup may hold processes and children at once; elsewhere a cgroup must be delegated.
  if (own == "/") {
    const std::string subtree = here + "/cgroup.subtree_control";
    if (!has_controllers(read_text(subtree))) std::ofstream(subtree) << "+memory +pids";
    if (has_controllers(read_text(subtree)) && access(here.c_str(), W_OK) == 0) {
      p->cgroup = true;
      p->cgroup_dir = here;
      return;
    }
  }
  p->cgroup_detail = absl::StrCat("this process's cgroup (", here,
                                  ") is not delegated to it; set R1LAB_SANDBOX_CGROUP to a cgroup v2 directory "
                                  "with memory and pids in cgroup.subtree_control");
}

absl::StatusOr<wire::Message> call_launcher(const std::string& launcher, const std::vector<std::string>& args,
                                            const std::string& request) {
  try {
    bp::opstream in;
    bp::ipstream out, err;
    bp::environment env;  // empty: nothing of ours reaches the sandbox
    bp::child c(bp::exe = launcher, bp::args = args, env, bp::std_in < in, bp::std_out > out, bp::std_err > err);
    in.write(request.data(), static_cast<std::streamsize>(request.size()));
    in.flush();
    in.pipe().close();
    std::string data((std::istreambuf_iterator<char>(out)), std::istreambuf_iterator<char>());
    std::string errs((std::istreambuf_iterator<char>(err)), std::istreambuf_iterator<char>());
    c.wait();
    const int raw = c.native_exit_code();
    if (data.empty()) {
      std::string how = WIFSIGNALED(raw) ? absl::StrCat("was killed by signal ", WTERMSIG(raw), " (", strsignal(WTERMSIG(raw)), ")")
                                         : absl::StrCat("exited with code ", WEXITSTATUS(raw));
      return absl::InternalError(absl::StrCat("the sandbox launcher ", how, " without an answer",
                                              errs.empty() ? "" : ": ", errs));
    }
    auto m = wire::decode(data);
    if (!m) return absl::DataLossError("the sandbox launcher's answer is malformed");
    return *m;
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("cannot start the sandbox launcher ", launcher, ": ", e.what()));
  }
}

std::string find_launcher(const std::string& requested) {
  if (!requested.empty()) return requested;
  if (const char* e = std::getenv("R1LAB_SANDBOX_LAUNCHER")) return e;
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  return (self.parent_path() / "r1lab-sandbox-launcher").string();
}

absl::Status check_name(const std::string& name) {
  if (name.empty() || name.size() > 255 || name.front() == '/' || name.find('\0') != std::string::npos)
    return absl::InvalidArgumentError(absl::StrCat("file name '", name, "' must be a non-empty relative path"));
  int depth = 0;
  for (absl::string_view part : absl::StrSplit(name, '/')) {
    if (part.empty() || part == "." || part == "..")
      return absl::InvalidArgumentError(absl::StrCat("file name '", name, "' may not contain empty, '.' or '..' parts"));
    if (++depth > 8) return absl::InvalidArgumentError(absl::StrCat("file name '", name, "' is nested too deeply"));
  }
  return absl::OkStatus();
}

bool is_memory_error(const std::string& err) {
  // Python's MemoryError, C++'s std::bad_alloc, glibc's allocation failures.
  return absl::StrContains(err, "MemoryError") || absl::StrContains(err, "std::bad_alloc") ||
         absl::StrContains(err, "Cannot allocate memory") || absl::StrContains(err, "out of memory");
}

// The interpreter or compiler of a language.
const std::string& toolchain(const RunnerOptions& o, Language lang) {
  return lang == Language::kPython ? o.python : lang == Language::kC ? o.cc : o.cxx;
}

std::string describe_signal(int sig) { return absl::StrCat("signal ", sig, " (", strsignal(sig), ")"); }

}  // namespace

// A prepared root: a directory of empty mount points and symlinks that every run of the language binds
// read-only as its /, plus the host paths to bind onto those mount points.
struct Runner::Root {
  std::string dir;
  std::vector<std::pair<std::string, bool>> binds;  // host path (mounted at the same path), writable
  std::string binds_wire;                            // the same, as the launcher reads it
};

namespace {

// Adds host path `p` to the root: a symlink is re-created (and its target added), a file or directory
// becomes a bind mount point. Parents are resolved first, so the root never holds a link in a parent.
absl::Status expose(const std::string& root, std::vector<std::pair<std::string, bool>>* binds, const std::string& p,
                    bool writable, int depth = 0) {
  if (depth > 16) return absl::FailedPreconditionError(absl::StrCat("too many symlinks at ", p));
  char buf[PATH_MAX];
  const fs::path path(p);
  if (realpath(path.parent_path().c_str(), buf) == nullptr)
    return absl::FailedPreconditionError(absl::StrCat(p, ": ", std::strerror(errno)));
  const std::string q = (fs::path(buf) / path.filename()).string();
  struct stat st;
  if (lstat(q.c_str(), &st) != 0) return absl::FailedPreconditionError(absl::StrCat(q, ": ", std::strerror(errno)));
  for (const auto& [b, rw] : *binds)
    if (q == b || absl::StartsWith(q, b + "/")) return absl::OkStatus();  // covered by a bound directory
  std::error_code ec;
  const fs::path in_root = fs::path(root + q);
  fs::create_directories(in_root.parent_path(), ec);
  if (S_ISLNK(st.st_mode)) {
    const fs::path target = fs::read_symlink(q, ec);
    if (!fs::exists(fs::symlink_status(in_root))) fs::create_symlink(target, in_root, ec);
    if (ec) return absl::InternalError(absl::StrCat("symlink in the sandbox root: ", ec.message()));
    return expose(root, binds, target.is_absolute() ? target.string() : (fs::path(buf) / target).string(), writable,
                  depth + 1);
  }
  if (S_ISDIR(st.st_mode)) {
    fs::create_directories(in_root, ec);
    // A directory bind covers what was bound below it.
    binds->erase(std::remove_if(binds->begin(), binds->end(),
                                [&](const auto& b) { return absl::StartsWith(b.first, q + "/"); }),
                 binds->end());
  } else {
    std::ofstream(in_root.string()).flush();
  }
  binds->emplace_back(q, writable);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Runner>> Runner::create(RunnerOptions options) {
  auto r = std::unique_ptr<Runner>(new Runner());
  options.launcher = find_launcher(options.launcher);
  if (access(options.launcher.c_str(), X_OK) != 0)
    return absl::FailedPreconditionError(absl::StrCat("the sandbox launcher ", options.launcher,
                                                      " is missing (build the r1lab-sandbox-launcher target, or set "
                                                      "R1LAB_SANDBOX_LAUNCHER)"));
  r->options_ = options;

  auto probe = call_launcher(options.launcher, {"--probe"}, "");
  if (!probe.ok()) return probe.status();
  Protections& p = r->protections_;
  auto flag = [&](const char* k) { return wire::get(*probe, k) == "1"; };
  p.user_ns = flag("user_ns");
  p.pid_ns = flag("pid_ns");
  p.net_ns = flag("net_ns");
  p.mount_ns = flag("mount_ns");
  p.ipc_ns = flag("ipc_ns");
  p.uts_ns = flag("uts_ns");
  p.seccomp = flag("seccomp");
  find_cgroup(options.cgroup_parent, &p);
  for (const auto& m : options.pretend_missing) {
    if (m == "user_ns") p.user_ns = false;
    else if (m == "pid_ns") p.pid_ns = false;
    else if (m == "net_ns") p.net_ns = false;
    else if (m == "mount_ns") p.mount_ns = false;
    else if (m == "seccomp") p.seccomp = false;
    else if (m == "cgroup") p.cgroup = false, p.cgroup_detail = "turned off";
    else return absl::InvalidArgumentError(absl::StrCat("unknown protection '", m, "'"));
  }

  // The prepared roots.
  // Roots of runners that died without cleaning up (killed processes) go first.
  {
    std::error_code ec;
    for (const auto& e : fs::directory_iterator("/tmp", ec)) {
      const std::string name = e.path().filename().string();
      constexpr absl::string_view kPrefix = "r1lab-sandbox-roots-";
      if (!absl::StartsWith(name, kPrefix)) continue;
      const std::string owner = name.substr(kPrefix.size(), name.find('-', kPrefix.size()) - kPrefix.size());
      int pid = 0;
      if (absl::SimpleAtoi(owner, &pid) && pid > 0 && kill(pid, 0) != 0 && errno == ESRCH) fs::remove_all(e.path(), ec);
    }
  }
  std::string tmpl = absl::StrCat("/tmp/r1lab-sandbox-roots-", getpid(), "-XXXXXX");
  if (mkdtemp(tmpl.data()) == nullptr) return absl::InternalError(absl::StrCat("mkdtemp: ", std::strerror(errno)));
  r->scratch_ = tmpl;
  chmod(tmpl.c_str(), 0755);  // the sandbox's unprivileged uid walks through it
  std::vector<std::string> libdirs;
  for (const auto& e : fs::directory_iterator("/usr/lib"))
    if (e.is_directory() && absl::EndsWith(e.path().filename().string(), "-linux-gnu")) libdirs.push_back(e.path());
  for (const char* d : {"/usr/lib64", "/usr/lib32", "/usr/libx32"})
    if (fs::exists(d)) libdirs.push_back(d);
  auto make_root = [&](Language lang, const std::vector<std::string>& tools,
                       const std::vector<std::string>& dirs) -> absl::Status {
    auto root = std::make_unique<Root>();
    root->dir = absl::StrCat(r->scratch_, "/", language_name(lang));
    std::error_code ec;
    for (const char* d : {"proc", "tmp", "work", "dev", "etc", "usr"}) fs::create_directories(root->dir + "/" + d, ec);
    for (const char* top : {"bin", "sbin", "lib", "lib32", "lib64", "libx32"}) {
      const fs::path host = fs::path("/") / top;
      if (fs::is_symlink(host)) fs::create_symlink(fs::read_symlink(host), root->dir + "/" + top, ec);
    }
    for (const auto& [link, target] : std::vector<std::pair<std::string, std::string>>{
             {"fd", "/proc/self/fd"}, {"stdin", "/proc/self/fd/0"}, {"stdout", "/proc/self/fd/1"}, {"stderr", "/proc/self/fd/2"}})
      fs::create_symlink(target, root->dir + "/dev/" + link, ec);
    for (const auto& t : tools)
      if (auto s = expose(root->dir, &root->binds, t, false); !s.ok()) return s;
    for (const auto& d : dirs)
      if (fs::exists(d))
        if (auto s = expose(root->dir, &root->binds, d, false); !s.ok()) return s;
    for (const char* dev : {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}) {
      std::ofstream(root->dir + dev).flush();
      root->binds.emplace_back(dev, true);
    }
    // Directory binds first, so that a file bind never lands under a later directory bind.
    std::stable_sort(root->binds.begin(), root->binds.end(), [](const auto& a, const auto& b) {
      return std::count(a.first.begin(), a.first.end(), '/') < std::count(b.first.begin(), b.first.end(), '/');
    });
    for (const auto& [p, rw] : root->binds) absl::StrAppend(&root->binds_wire, p, "\t", p, "\t", rw ? "rw" : "ro", "\n");
    r->roots_[lang] = std::move(root);
    return absl::OkStatus();
  };
  std::vector<std::string> dirs = libdirs;
  dirs.push_back("/etc/ld.so.cache");
  if (access(options.python.c_str(), X_OK) == 0) {
    char buf[PATH_MAX];
    if (realpath(options.python.c_str(), buf) == nullptr) return absl::FailedPreconditionError(options.python);
    // The standard library beside the interpreter: /usr/bin/python3.11 -> /usr/lib/python3.11.
    const fs::path exe(buf);
    std::vector<std::string> py = dirs;
    py.push_back((exe.parent_path().parent_path() / "lib" / exe.filename()).string());
    if (auto s = make_root(Language::kPython, {options.python}, py); !s.ok()) return s;
  }
  std::vector<std::string> cdirs = dirs;
  for (const char* d : {"/usr/include", "/usr/lib/gcc", "/usr/libexec/gcc"}) cdirs.push_back(d);
  std::vector<std::string> binutils;
  for (const char* t : {"/usr/bin/as", "/usr/bin/ld"})
    if (fs::exists(t)) binutils.push_back(t);
  for (Language lang : {Language::kC, Language::kCpp}) {
    const std::string& compiler = toolchain(options, lang);
    if (access(compiler.c_str(), X_OK) != 0) continue;
    std::vector<std::string> tools = binutils;
    tools.push_back(compiler);
    if (auto s = make_root(lang, tools, cdirs); !s.ok()) return s;
  }
  return r;
}

Runner::~Runner() {
  std::error_code ec;
  if (!scratch_.empty()) fs::remove_all(scratch_, ec);
}

absl::StatusOr<Result> Runner::run(const Program& program, const Limits& limits,
                                   const std::optional<std::string>& expected_output) const {
  // ---- Check what we were given.
  auto range = [](const char* name, int64_t v, int64_t lo, int64_t hi) -> absl::Status {
    if (v < lo || v > hi) return absl::InvalidArgumentError(absl::StrCat(name, " = ", v, " is outside [", lo, ", ", hi, "]"));
    return absl::OkStatus();
  };
  for (const absl::Status& s :
       {range("time_limit_ms", limits.time_limit_ms, 1, 3600000), range("wall_limit_ms", limits.wall_limit_ms, 0, 7200000),
        range("memory_mb", limits.memory_mb, 8, 1 << 20), range("max_processes", limits.max_processes, 1, 4096),
        range("output_limit_bytes", limits.output_limit_bytes, 0, int64_t{1} << 30),
        range("file_size_limit_bytes", limits.file_size_limit_bytes, 0, int64_t{1} << 40),
        range("work_dir_mb", limits.work_dir_mb, 1, 1 << 20), range("max_open_files", limits.max_open_files, 8, 1 << 20),
        range("compile_time_limit_ms", limits.compile_time_limit_ms, 1, 3600000),
        range("compile_memory_mb", limits.compile_memory_mb, 64, 1 << 20)})
    if (!s.ok()) return s;
  const std::string main_file = program.lang == Language::kPython ? "main.py" : program.lang == Language::kC ? "main.c" : "main.cpp";
  for (const auto& [name, data] : program.files) {
    if (auto s = check_name(name); !s.ok()) return s;
    if (name == main_file || name == "main") return absl::InvalidArgumentError(absl::StrCat("file name '", name, "' is the program's own"));
  }
  auto root = roots_.find(program.lang);
  if (root == roots_.end())
    return absl::FailedPreconditionError(absl::StrCat("no ", language_name(program.lang), " toolchain on this host (",
                                                      toolchain(options_, program.lang), ")"));
  const std::vector<std::string> missing = protections_.missing();
  if (!missing.empty() && !options_.allow_unsafe)
    return absl::FailedPreconditionError(absl::StrCat(
        "refusing to run untrusted code: this host lacks ", absl::StrJoin(missing, ", "),
        " (allow_unsafe / --allow-unsafe runs it anyway, without those protections)"));
  const bool isolated = protections_.user_ns && protections_.pid_ns && protections_.net_ns && protections_.mount_ns &&
                        protections_.ipc_ns && protections_.uts_ns;

  // ---- The request.
  wire::Message req;
  req["mode"] = isolated ? "isolated" : "unsafe";
  req["root"] = root->second->dir;
  req["binds"] = root->second->binds_wire;
  req["seccomp"] = protections_.seccomp ? "1" : "0";
  const bool host_root = geteuid() == 0;
  req["map_uid"] = absl::StrCat(host_root ? 65534 : geteuid());
  req["map_gid"] = absl::StrCat(host_root ? 65534 : getegid());
  if (host_root) req["run_as_uid"] = "65534";
  req["tmpfs_bytes"] = absl::StrCat(limits.work_dir_mb << 20);
  req["env"] = wire::join_list({"PATH=/usr/bin:/bin", "HOME=/work", "TMPDIR=/tmp", "LANG=C.UTF-8"});
  req["stdin"] = program.stdin_data;
  int64_t nfiles = 0;
  auto add_file = [&](const std::string& name, const std::string& data) {
    req[absl::StrCat("file.", nfiles, ".name")] = name;
    req[absl::StrCat("file.", nfiles, ".data")] = data;
    ++nfiles;
  };
  add_file(main_file, program.source);
  for (const auto& [name, data] : program.files) add_file(name, data);
  req["files"] = absl::StrCat(nfiles);
  // In a user namespace the process count is the namespace's own, and init is one of them.
  const int64_t nproc = limits.max_processes + (isolated ? 1 : 0);
  int64_t nsteps = 0;
  auto add_step = [&](const std::vector<std::string>& argv, int64_t cpu_ms, int64_t wall_ms, int64_t mem_mb,
                      int64_t procs, int64_t output, bool gets_stdin) {
    const std::string p = absl::StrCat("step.", nsteps++, ".");
    req[p + "argv"] = wire::join_list(argv);
    req[p + "cpu_ms"] = absl::StrCat(cpu_ms);
    req[p + "wall_ms"] = absl::StrCat(wall_ms);
    req[p + "as_bytes"] = absl::StrCat(mem_mb << 20);
    req[p + "nproc"] = absl::StrCat(procs);
    req[p + "fsize"] = absl::StrCat(std::max<int64_t>(limits.file_size_limit_bytes, 1));
    req[p + "nofile"] = absl::StrCat(limits.max_open_files);
    req[p + "output_bytes"] = absl::StrCat(output);
    req[p + "stdin"] = gets_stdin ? "1" : "0";
  };
  const bool compiled = program.lang != Language::kPython;
  if (compiled) {
    std::vector<std::string> cc = program.lang == Language::kC
                                      ? std::vector<std::string>{toolchain(options_, program.lang), "-O2", "-std=gnu17", "-pipe", "-o", "main", main_file, "-lm"}
                                      : std::vector<std::string>{toolchain(options_, program.lang), "-O2", "-std=gnu++17", "-pipe", "-o", "main", main_file};
    add_step(cc, limits.compile_time_limit_ms, 2 * limits.compile_time_limit_ms + 1000, limits.compile_memory_mb,
             std::max<int64_t>(nproc, 16), limits.compile_output_limit_bytes, false);
    add_step({"./main"}, limits.time_limit_ms, limits.effective_wall_limit_ms(), limits.memory_mb, nproc,
             limits.output_limit_bytes, true);
  } else {
    add_step({options_.python, "-E", "-s", "-B", main_file}, limits.time_limit_ms, limits.effective_wall_limit_ms(),
             limits.memory_mb, nproc, limits.output_limit_bytes, true);
  }
  req["steps"] = absl::StrCat(nsteps);
  if (protections_.cgroup && isolated) {
    req["cgroup_parent"] = protections_.cgroup_dir;
    req["cgroup_memory"] = absl::StrCat(std::max(limits.memory_mb, compiled ? limits.compile_memory_mb : 0) << 20);
    req["cgroup_pids"] = absl::StrCat(std::max<int64_t>(nproc, compiled ? 16 : 0));
  }

  // ---- Run it.
  auto resp = call_launcher(options_.launcher, {}, wire::encode(req));
  Result res;
  if (!resp.ok()) {
    res.message = std::string(resp.status().message());
    return res;
  }
  const wire::Message& m = *resp;
  if (m.count("error")) {
    res.message = absl::StrCat("sandbox: ", wire::get(m, "error"));
    return res;
  }
  const int64_t steps_run = wire::get_int(m, "steps_run");
  auto step_status = [&](int i) { return static_cast<int>(wire::get_int(m, absl::StrCat("step.", i, ".status"))); };
  auto field = [&](int i, const char* k) { return wire::get(m, absl::StrCat("step.", i, ".", k)); };
  auto ifield = [&](int i, const char* k) { return wire::get_int(m, absl::StrCat("step.", i, ".", k)); };
  if (compiled) {
    res.compile_output = field(0, "stdout") + field(0, "stderr");
    const int st = step_status(0);
    const int64_t cpu = ifield(0, "cpu_us") / 1000;
    res.verdict = Verdict::kCompilationError;
    if (ifield(0, "exec_errno") != 0) {
      res.verdict = Verdict::kSandboxError;
      res.message = absl::StrCat("cannot start the compiler: ", std::strerror(static_cast<int>(ifield(0, "exec_errno"))));
      return res;
    }
    if (field(0, "killed") == "wall" || cpu > limits.compile_time_limit_ms || (WIFSIGNALED(st) && WTERMSIG(st) == SIGXCPU)) {
      res.message = absl::StrCat("compilation exceeded its time limit (", limits.compile_time_limit_ms, " ms CPU)");
      return res;
    }
    if (field(0, "killed") == "output") {
      res.message = absl::StrCat("the compiler's output exceeded ", limits.compile_output_limit_bytes, " bytes");
      return res;
    }
    if (WIFSIGNALED(st)) {
      res.message = absl::StrCat("the compiler was killed by ", describe_signal(WTERMSIG(st)));
      return res;
    }
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
      res.message = is_memory_error(res.compile_output)
                        ? absl::StrCat("the compiler ran out of memory (", limits.compile_memory_mb, " MiB)")
                        : "compilation failed";
      return res;
    }
    if (steps_run < 2) {
      res.verdict = Verdict::kSandboxError;
      res.message = "the program did not start after compiling";
      return res;
    }
  }
  const int s = compiled ? 1 : 0;
  const int st = step_status(s);
  res.stdout_data = field(s, "stdout");
  res.stderr_data = field(s, "stderr");
  res.truncated = field(s, "stdout_over") == "1" || field(s, "stderr_over") == "1";
  res.cpu_ms = ifield(s, "cpu_us") / 1000;
  res.wall_ms = ifield(s, "wall_us") / 1000;
  res.memory_kb = m.count("cgroup.peak_kb") ? wire::get_int(m, "cgroup.peak_kb") : ifield(s, "maxrss_kb");
  if (WIFEXITED(st)) res.exit_code = WEXITSTATUS(st);
  if (WIFSIGNALED(st)) res.signal = WTERMSIG(st);
  const std::string killed = field(s, "killed");
  if (ifield(s, "exec_errno") != 0) {
    res.verdict = Verdict::kSandboxError;
    res.message = absl::StrCat("cannot start the program: ", std::strerror(static_cast<int>(ifield(s, "exec_errno"))));
  } else if (killed == "output") {
    res.verdict = Verdict::kOutputLimitExceeded;
    res.message = absl::StrCat("output exceeded ", limits.output_limit_bytes, " bytes");
  } else if (res.signal == SIGXFSZ) {
    res.verdict = Verdict::kOutputLimitExceeded;
    res.message = absl::StrCat("wrote a file larger than ", limits.file_size_limit_bytes, " bytes");
  } else if (killed == "wall") {
    res.verdict = Verdict::kTimeLimitExceeded;
    res.message = absl::StrCat("wall-clock limit of ", limits.effective_wall_limit_ms(), " ms reached");
  } else if (res.signal == SIGXCPU || res.cpu_ms > limits.time_limit_ms) {
    res.verdict = Verdict::kTimeLimitExceeded;
    res.message = absl::StrCat("CPU time ", res.cpu_ms, " ms exceeded the limit of ", limits.time_limit_ms, " ms");
  } else if (wire::get_int(m, "cgroup.oom_kills") > 0) {
    res.verdict = Verdict::kMemoryLimitExceeded;
    res.message = absl::StrCat("the memory limit of ", limits.memory_mb, " MiB was reached (cgroup OOM kill)");
  } else if (res.exit_code != 0 && absl::StrContains(res.stderr_data, "File too large")) {
    // Interpreters that ignore SIGXFSZ see EFBIG instead.
    res.verdict = Verdict::kOutputLimitExceeded;
    res.message = absl::StrCat("wrote a file larger than ", limits.file_size_limit_bytes, " bytes");
  } else if (res.exit_code != 0) {
    if (is_memory_error(res.stderr_data) || res.memory_kb * 10 >= limits.memory_mb * 1024 * 9) {
      res.verdict = Verdict::kMemoryLimitExceeded;
      res.message = absl::StrCat("ran out of its memory limit of ", limits.memory_mb, " MiB");
    } else {
      res.verdict = Verdict::kRuntimeError;
      res.message = res.signal ? absl::StrCat("killed by ", describe_signal(res.signal))
                               : absl::StrCat("exited with code ", res.exit_code);
    }
  } else if (expected_output && !output_matches(res.stdout_data, *expected_output)) {
    res.verdict = Verdict::kWrongAnswer;
    res.message = "output differs from the expected output";
  } else {
    res.verdict = Verdict::kOk;
  }
  if (!missing.empty()) absl::StrAppend(&res.message, res.message.empty() ? "" : "; ", "ran WITHOUT ", absl::StrJoin(missing, ", "));
  return res;
}

}  // namespace r1lab::sandbox
