// r1lab-sandbox-launcher: runs one untrusted program (after an optional compile step) in a fresh set of
// namespaces. The Runner starts it with Boost.Process, writes a request (wire.h) to its stdin and reads the
// response from its stdout.
//
//   launcher (host namespaces)           init (PID 1 of a new user/pid/net/mount/ipc/uts namespace)
//   - writes uid/gid maps, cgroup  --g-->  - mounts the prepared root, /work, /tmp, /proc, /dev; pivot_root
//   - feeds stdin, reads stdout/err        - writes the files, then per step: fork the program, which drops
//     with caps; asks init to kill --k-->    every capability, sets rlimits, no_new_privs, seccomp and execs
//     when a cap is hit                    - enforces the wall limit, kills every other process when the
//   - collects step reports       <--msg-    program ends, reports status, CPU time and peak memory
//
// When init exits the kernel kills everything left in its PID namespace, so nothing the program started
// outlives the run. The launcher dies by SIGALRM if a run overstays all its limits; init dies with it
// (PR_SET_PDEATHSIG).
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <grp.h>
#include <ftw.h>
#include <linux/capability.h>
#include <poll.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "sandbox/seccomp_filter.h"
#include "sandbox/wire.h"

#ifndef SECBIT_NOROOT
#define SECBIT_NOROOT (1 << 0)
#define SECBIT_NOROOT_LOCKED (1 << 1)
#define SECBIT_NO_SETUID_FIXUP (1 << 2)
#define SECBIT_NO_SETUID_FIXUP_LOCKED (1 << 3)
#define SECBIT_KEEP_CAPS_LOCKED (1 << 5)
#endif

namespace r1lab::sandbox {
namespace {

using wire::Message;

int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool write_all(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// ---- What init tells the launcher: fixed-size records, written atomically (smaller than PIPE_BUF).
enum : int32_t { kStepDone = 1, kSetupError = 2 };
enum : int32_t { kNotKilled = 0, kKilledWall = 1, kKilledRequest = 2 };
struct Report {
  int32_t kind = 0, step = 0, status = 0, exec_errno = 0, killed = 0, pad = 0;
  int64_t cpu_us = 0, maxrss_kb = 0, wall_us = 0;
  char text[512] = {};
};
static_assert(sizeof(Report) < PIPE_BUF);

struct Step {
  std::vector<std::string> argv;
  int64_t cpu_ms = 0, wall_ms = 0, as_bytes = 0, nproc = 0, fsize = 0, nofile = 0, output_bytes = 0;
  bool gets_stdin = false;
};

struct Request {
  std::string mode;  // "isolated" or "unsafe"
  std::string root;
  struct Bind {
    std::string src, dst;
    bool writable;
  };
  std::vector<Bind> binds;
  std::vector<std::pair<std::string, std::string>> files;
  std::vector<Step> steps;
  std::string stdin_data;
  std::vector<std::string> env;
  int64_t tmpfs_bytes = 64 << 20;
  bool seccomp = true;
  int64_t map_uid = 65534, map_gid = 65534;
  int64_t run_as_uid = -1;  // unsafe mode as root: drop to this uid
  std::string cgroup_parent;
  int64_t cgroup_memory = 0, cgroup_pids = 0;
};

// Empty with *error set on a malformed request.
std::optional<Request> parse_request(const Message& m, std::string* error) {
  Request r;
  r.mode = wire::get(m, "mode");
  if (r.mode != "isolated" && r.mode != "unsafe") {
    *error = "mode must be isolated or unsafe";
    return std::nullopt;
  }
  r.root = wire::get(m, "root");
  for (const std::string& line : wire::split(wire::get(m, "binds"), '\n')) {
    if (line.empty()) continue;
    std::vector<std::string> f = wire::split(line, '\t');
    if (f.size() != 3) {
      *error = "bad bind entry";
      return std::nullopt;
    }
    r.binds.push_back({f[0], f[1], f[2] == "rw"});
  }
  const int64_t nfiles = wire::get_int(m, "files");
  for (int64_t i = 0; i < nfiles; ++i)
    r.files.emplace_back(wire::get(m, wire::cat("file.", i, ".name")), wire::get(m, wire::cat("file.", i, ".data")));
  const int64_t nsteps = wire::get_int(m, "steps");
  for (int64_t i = 0; i < nsteps; ++i) {
    const std::string p = wire::cat("step.", i, ".");
    Step s;
    s.argv = wire::split_list(wire::get(m, p + "argv"));
    if (s.argv.empty()) {
      *error = "a step without argv";
      return std::nullopt;
    }
    s.cpu_ms = wire::get_int(m, p + "cpu_ms");
    s.wall_ms = wire::get_int(m, p + "wall_ms");
    s.as_bytes = wire::get_int(m, p + "as_bytes");
    s.nproc = wire::get_int(m, p + "nproc");
    s.fsize = wire::get_int(m, p + "fsize");
    s.nofile = wire::get_int(m, p + "nofile");
    s.output_bytes = wire::get_int(m, p + "output_bytes");
    s.gets_stdin = wire::get(m, p + "stdin") == "1";
    r.steps.push_back(std::move(s));
  }
  r.stdin_data = wire::get(m, "stdin");
  r.env = wire::split_list(wire::get(m, "env"));
  r.tmpfs_bytes = wire::get_int(m, "tmpfs_bytes", r.tmpfs_bytes);
  r.seccomp = wire::get(m, "seccomp") != "0";
  r.map_uid = wire::get_int(m, "map_uid", r.map_uid);
  r.map_gid = wire::get_int(m, "map_gid", r.map_gid);
  r.run_as_uid = wire::get_int(m, "run_as_uid", -1);
  r.cgroup_parent = wire::get(m, "cgroup_parent");
  r.cgroup_memory = wire::get_int(m, "cgroup_memory");
  r.cgroup_pids = wire::get_int(m, "cgroup_pids");
  return r;
}

// ---- init: the child in the new namespaces.
struct InitArgs {
  const Request* req;
  int ctl_r;     // launcher -> init: 'g' go, 'k' kill the step, 'q' quit
  int report_w;  // init -> launcher: Report records
  int in_r, out_w, err_w;
  int close_fds[8];
  int n_close;
};

[[noreturn]] void init_fail(const InitArgs& a, const std::string& what) {
  Report r;
  r.kind = kSetupError;
  std::snprintf(r.text, sizeof(r.text), "%s: %s", what.c_str(), std::strerror(errno));
  write_all(a.report_w, &r, sizeof(r));
  _exit(1);
}

// Remounts a bind mount read-only, keeping the flags the kernel locks (nosuid, nodev, noexec, atime).
int remount_ro(const std::string& path, unsigned long extra) {
  struct statvfs st;
  if (statvfs(path.c_str(), &st) != 0) return -1;
  unsigned long flags = MS_REMOUNT | MS_BIND | MS_RDONLY | extra;
  if (st.f_flag & ST_NOSUID) flags |= MS_NOSUID;
  if (st.f_flag & ST_NODEV) flags |= MS_NODEV;
  if (st.f_flag & ST_NOEXEC) flags |= MS_NOEXEC;
  if (st.f_flag & ST_NOATIME) flags |= MS_NOATIME;
  if (st.f_flag & ST_NODIRATIME) flags |= MS_NODIRATIME;
  if (st.f_flag & ST_RELATIME) flags |= MS_RELATIME;
  return mount(nullptr, path.c_str(), nullptr, flags, nullptr);
}

void setup_isolated_root(const InitArgs& a) {
  const Request& req = *a.req;
  if (sethostname("sandbox", 7) != 0) init_fail(a, "sethostname");
  if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) init_fail(a, "making / private");
  const std::string& root = req.root;
  if (mount(root.c_str(), root.c_str(), nullptr, MS_BIND | MS_REC, nullptr) != 0) init_fail(a, "binding the root " + root);
  for (const auto& b : req.binds) {
    const std::string target = root + b.dst;
    if (mount(b.src.c_str(), target.c_str(), nullptr, MS_BIND, nullptr) != 0) init_fail(a, "binding " + b.src);
    if (!b.writable && remount_ro(target, MS_NOSUID | MS_NODEV) != 0) init_fail(a, "remounting read-only " + b.src);
  }
  const std::string size = wire::cat("size=", req.tmpfs_bytes, ",mode=");
  if (mount("tmpfs", (root + "/work").c_str(), "tmpfs", MS_NOSUID | MS_NODEV, (size + "0755").c_str()) != 0)
    init_fail(a, "mounting /work");
  if (mount("tmpfs", (root + "/tmp").c_str(), "tmpfs", MS_NOSUID | MS_NODEV, (size + "1777").c_str()) != 0)
    init_fail(a, "mounting /tmp");
  if (mount("proc", (root + "/proc").c_str(), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) != 0)
    init_fail(a, "mounting /proc");
  if (chdir(root.c_str()) != 0) init_fail(a, "chdir to the root");
  if (syscall(SYS_pivot_root, ".", ".") != 0) init_fail(a, "pivot_root");
  if (umount2(".", MNT_DETACH) != 0) init_fail(a, "detaching the host root");
  if (chdir("/") != 0) init_fail(a, "chdir /");
  if (remount_ro("/", MS_NOSUID | MS_NODEV) != 0) init_fail(a, "remounting / read-only");
}

void write_files(const InitArgs& a, const std::string& dir) {
  for (const auto& [name, data] : a.req->files) {
    // The Runner checked the names (relative, no ".."); make parent directories, never follow a link.
    std::string path = dir;
    std::vector<std::string> parts = wire::split(name, '/');
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      path += "/" + parts[i];
      if (mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) init_fail(a, "creating directory " + path);
    }
    path += "/" + parts.back();
    int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) init_fail(a, "creating " + path);
    if (!write_all(fd, data.data(), data.size())) init_fail(a, "writing " + path);
    close(fd);
  }
}

// Kills everything but init. In a PID namespace that is kill(-1); without one (unsafe mode) init is a child
// subreaper and walks its descendants.
void kill_others(bool isolated) {
  if (isolated) {
    kill(-1, SIGKILL);
    return;
  }
  for (int round = 0; round < 100; ++round) {
    std::vector<pid_t> pids;
    std::vector<pid_t> frontier = {getpid()};
    while (!frontier.empty()) {
      pid_t p = frontier.back();
      frontier.pop_back();
      // Each thread has its own list of children.
      DIR* tasks = opendir(wire::cat("/proc/", p, "/task").c_str());
      if (tasks == nullptr) continue;
      while (struct dirent* t = readdir(tasks)) {
        if (t->d_name[0] == '.') continue;
        std::ifstream in(wire::cat("/proc/", p, "/task/", t->d_name, "/children"));
        pid_t c;
        while (in >> c) {
          pids.push_back(c);
          frontier.push_back(c);
        }
      }
      closedir(tasks);
    }
    if (pids.empty()) return;
    for (pid_t p : pids) kill(p, SIGKILL);
  }
}

void set_limit(int resource, int64_t value) {
  if (value <= 0) return;
  struct rlimit rl = {static_cast<rlim_t>(value), static_cast<rlim_t>(value)};
  setrlimit(resource, &rl);
}

// The program: runs in init's child, then execs. Any failure goes to exec_w as an errno.
[[noreturn]] void exec_program(const InitArgs& a, const Step& s, const std::string& workdir, scmp_filter_ctx filter,
                               int exec_w, bool isolated) {
  auto fail = [&](int err) {
    write_all(exec_w, &err, sizeof(err));
    _exit(127);
  };
  setpgid(0, 0);
  int in = s.gets_stdin ? a.in_r : open("/dev/null", O_RDONLY);
  if (in < 0 || dup2(in, 0) < 0 || dup2(a.out_w, 1) < 0 || dup2(a.err_w, 2) < 0) fail(errno);
  // Nothing else of init's reaches the program (exec_w closes itself on exec).
  if (exec_w > 3) syscall(SYS_close_range, 3, exec_w - 1, 0);
  syscall(SYS_close_range, exec_w + 1, ~0U, 0);
  if (chdir(workdir.c_str()) != 0) fail(errno);
  sigset_t all;
  sigemptyset(&all);
  sigprocmask(SIG_SETMASK, &all, nullptr);
  for (int sig = 1; sig < NSIG; ++sig) signal(sig, SIG_DFL);

  if (s.cpu_ms > 0) {  // SIGXCPU at the whole second at or above the limit, SIGKILL one second later
    struct rlimit rl = {static_cast<rlim_t>((s.cpu_ms + 999) / 1000), static_cast<rlim_t>((s.cpu_ms + 999) / 1000 + 1)};
    setrlimit(RLIMIT_CPU, &rl);
  }
  set_limit(RLIMIT_AS, s.as_bytes);
  set_limit(RLIMIT_NPROC, s.nproc);
  set_limit(RLIMIT_FSIZE, s.fsize);
  set_limit(RLIMIT_NOFILE, s.nofile);
  struct rlimit zero = {0, 0};
  setrlimit(RLIMIT_CORE, &zero);
  setrlimit(RLIMIT_MEMLOCK, &zero);
  setrlimit(RLIMIT_MSGQUEUE, &zero);

  if (isolated) {
    // Root inside the namespace, but with no capability now or after exec.
    if (prctl(PR_SET_SECUREBITS, SECBIT_KEEP_CAPS_LOCKED | SECBIT_NO_SETUID_FIXUP | SECBIT_NO_SETUID_FIXUP_LOCKED |
                                     SECBIT_NOROOT | SECBIT_NOROOT_LOCKED) != 0)
      fail(errno);
    for (int cap = 0; cap <= 63; ++cap)
      if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL) fail(errno);
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2] = {};
    if (syscall(SYS_capset, &hdr, data) != 0) fail(errno);
  } else if (a.req->run_as_uid >= 0 && geteuid() == 0) {
    const gid_t g = static_cast<gid_t>(a.req->run_as_uid);
    const uid_t u = static_cast<uid_t>(a.req->run_as_uid);
    if (setgroups(0, nullptr) != 0 || setresgid(g, g, g) != 0 || setresuid(u, u, u) != 0) fail(errno);
  }
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) fail(errno);
  if (filter != nullptr) {
    const int rc = seccomp_load(filter);
    if (rc != 0) fail(-rc);
  }
  std::vector<char*> argv, envp;
  for (const auto& s2 : s.argv) argv.push_back(const_cast<char*>(s2.c_str()));
  argv.push_back(nullptr);
  for (const auto& e : a.req->env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  execve(argv[0], argv.data(), envp.data());
  fail(errno);
  _exit(127);
}

int init_main(void* arg) {
  const InitArgs& a = *static_cast<InitArgs*>(arg);
  const Request& req = *a.req;
  const bool isolated = req.mode == "isolated";
  for (int i = 0; i < a.n_close; ++i) close(a.close_fds[i]);
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  // Wait for the launcher: uid/gid maps and cgroup are in place (or the launcher is gone).
  char go = 0;
  if (read(a.ctl_r, &go, 1) != 1 || go != 'g') _exit(1);

  std::string workdir = "/work";
  if (isolated) {
    // Become the namespace's root, which the maps tie to an unprivileged uid of the host (init was created
    // with the launcher's host uid, which may be root).
    if (setresgid(0, 0, 0) != 0 || setresuid(0, 0, 0) != 0) init_fail(a, "becoming the sandbox user");
    setup_isolated_root(a);
  } else {
    char tmpl[] = "/tmp/r1lab-sandbox-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) init_fail(a, "creating a work directory");
    workdir = tmpl;
    prctl(PR_SET_CHILD_SUBREAPER, 1);
  }
  write_files(a, workdir);
  if (!isolated && req.run_as_uid >= 0 && geteuid() == 0) {
    // The work directory and the files in it belong to the uid the program will run as.
    static uid_t owner;
    owner = static_cast<uid_t>(req.run_as_uid);
    errno = 0;
    if (nftw(workdir.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return lchown(p, owner, owner); },
             16, FTW_PHYS) != 0)
      init_fail(a, "chown of the work directory");
  }
  // The program may run as the same uid: it must not read or trace init.
  prctl(PR_SET_DUMPABLE, 0);

  scmp_filter_ctx filter = nullptr;
  if (req.seccomp) {
    std::string why;
    filter = build_seccomp_filter(&why);
    if (filter == nullptr) {
      errno = 0;
      init_fail(a, why);
    }
  }

  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigprocmask(SIG_BLOCK, &chld, nullptr);
  const int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sfd < 0) init_fail(a, "signalfd");

  struct rusage before = {};
  for (size_t i = 0; i < req.steps.size(); ++i) {
    const Step& s = req.steps[i];
    int ep[2];  // the program's exec failure, if any (closed by a successful exec)
    if (pipe2(ep, O_CLOEXEC) != 0) init_fail(a, "pipe");
    const int64_t t0 = now_us();
    const pid_t pid = fork();
    if (pid < 0) init_fail(a, "fork");
    if (pid == 0) {
      close(ep[0]);
      exec_program(a, s, workdir, filter, ep[1], isolated);
    }
    close(ep[1]);
    Report r;
    r.kind = kStepDone;
    r.step = static_cast<int32_t>(i);
    bool done = false, killed = false;
    int64_t step_maxrss = 0;
    const int64_t deadline = t0 + s.wall_ms * 1000;
    while (!done) {
      struct pollfd p[2] = {{sfd, POLLIN, 0}, {a.ctl_r, POLLIN, 0}};
      int64_t left_ms = (deadline - now_us() + 999) / 1000;
      if (!killed && left_ms <= 0) {
        kill_others(isolated);
        killed = true;
        r.killed = kKilledWall;
        continue;
      }
      poll(p, 2, killed ? 100 : static_cast<int>(std::min<int64_t>(left_ms, 1 << 30)));
      if (p[1].revents & (POLLIN | POLLHUP)) {
        char c = 0;
        if (read(a.ctl_r, &c, 1) != 1 || c == 'k' || c == 'q') {
          if (!killed) r.killed = kKilledRequest;
          kill_others(isolated);
          killed = true;
        }
      }
      struct signalfd_siginfo si;
      while (read(sfd, &si, sizeof(si)) == sizeof(si)) {
      }
      for (;;) {
        int status = 0;
        struct rusage ru;
        const pid_t w = wait4(-1, &status, WNOHANG | __WALL, &ru);
        if (w <= 0) break;
        step_maxrss = std::max<int64_t>(step_maxrss, ru.ru_maxrss);
        if (w == pid) {
          r.status = status;
          r.wall_us = now_us() - t0;
          done = true;
        }
      }
    }
    // The program ended: nothing it started may go on.
    kill_others(isolated);
    for (;;) {
      int status;
      struct rusage ru;
      const pid_t w = wait4(-1, &status, __WALL, &ru);
      if (w < 0 && errno == ECHILD) break;
      if (w > 0) step_maxrss = std::max<int64_t>(step_maxrss, ru.ru_maxrss);
    }
    int err = 0;
    if (read(ep[0], &err, sizeof(err)) == sizeof(err)) r.exec_errno = err;
    close(ep[0]);
    struct rusage after;
    getrusage(RUSAGE_CHILDREN, &after);
    auto us = [](const struct timeval& t) { return static_cast<int64_t>(t.tv_sec) * 1000000 + t.tv_usec; };
    r.cpu_us = us(after.ru_utime) + us(after.ru_stime) - us(before.ru_utime) - us(before.ru_stime);
    r.maxrss_kb = step_maxrss;  // the largest process of this step (with its waited-for children)
    before = after;
    if (!write_all(a.report_w, &r, sizeof(r))) break;
    if (i + 1 == req.steps.size()) break;
    char c = 0;
    if (read(a.ctl_r, &c, 1) != 1 || c != 'g') break;
  }
  if (!isolated) {
    nftw(workdir.c_str(), [](const char* p, const struct stat*, int, struct FTW*) {
      remove(p);
      return 0;
    }, 16, FTW_DEPTH | FTW_PHYS);
  }
  _exit(0);
}

// ---- The launcher.
bool write_file(const std::string& path, const std::string& data) {
  const int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = write_all(fd, data.data(), data.size());
  close(fd);
  return ok;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

Message launch(const Request& req) {
  Message resp;
  auto error = [&](const std::string& what) {
    resp["error"] = wire::cat(what, errno ? wire::cat(": ", std::strerror(errno)) : "");
    return resp;
  };
  const bool isolated = req.mode == "isolated";
  int ctl[2], rep[2], in[2], out[2], err[2];
  if (pipe2(ctl, O_CLOEXEC) || pipe2(rep, O_CLOEXEC) || pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) ||
      pipe2(err, O_CLOEXEC))
    return error("pipe");
  InitArgs args{&req, ctl[0], rep[1], in[0], out[1], err[1], {ctl[1], rep[0], in[1], out[0], err[0]}, 5};

  // A generous overall deadline: if everything else fails, SIGALRM ends the launcher and init with it.
  int64_t total_ms = 5000;
  for (const auto& s : req.steps) total_ms += s.wall_ms + 1000;
  alarm(static_cast<unsigned>((total_ms + 999) / 1000));

  // init's stack. Static, so that only the pages it touches are ever faulted in (zeroing a heap buffer
  // costs milliseconds on virtual machines with slow page faults).
  alignas(64) static char stack[256 << 10];
  int flags = SIGCHLD;
  if (isolated) flags |= CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS;
  const pid_t init = clone(init_main, stack + sizeof(stack), flags, &args);
  if (init < 0) return error("clone with new namespaces");
  close(ctl[0]);
  close(rep[1]);
  close(in[0]);
  close(out[1]);
  close(err[1]);

  std::string cgroup;
  if (isolated) {
    const std::string proc = wire::cat("/proc/", init);
    errno = 0;
    if (!write_file(proc + "/setgroups", "deny") ||
        !write_file(proc + "/uid_map", wire::cat("0 ", req.map_uid, " 1\n")) ||
        !write_file(proc + "/gid_map", wire::cat("0 ", req.map_gid, " 1\n"))) {
      kill(init, SIGKILL);
      waitpid(init, nullptr, 0);
      return error("writing the uid/gid maps of the sandbox");
    }
  }
  if (!req.cgroup_parent.empty()) {
    cgroup = wire::cat(req.cgroup_parent, "/r1lab-sandbox-", getpid());
    errno = 0;
    if (mkdir(cgroup.c_str(), 0755) != 0 || !write_file(cgroup + "/memory.max", wire::cat(req.cgroup_memory)) ||
        !write_file(cgroup + "/memory.swap.max", "0") || !write_file(cgroup + "/pids.max", wire::cat(req.cgroup_pids)) ||
        !write_file(cgroup + "/cgroup.procs", wire::cat(init))) {
      kill(init, SIGKILL);
      waitpid(init, nullptr, 0);
      rmdir(cgroup.c_str());
      return error("setting up the cgroup " + cgroup);
    }
  }
  if (!write_all(ctl[1], "g", 1)) return error("starting the sandbox");

  set_nonblock(in[1]);
  set_nonblock(out[0]);
  set_nonblock(err[0]);
  size_t stdin_off = 0;
  bool stdin_open = true;
  if (req.stdin_data.empty()) {
    close(in[1]);
    stdin_open = false;
  }
  std::string outbuf, errbuf;
  bool out_over = false, err_over = false;
  size_t step = 0;
  int64_t cap = req.steps.empty() ? 0 : req.steps[0].output_bytes;
  bool asked_kill = false;
  auto drain = [&](int fd, std::string& buf, bool& over) {
    char chunk[65536];
    for (;;) {
      const ssize_t n = read(fd, chunk, sizeof(chunk));
      if (n <= 0) return;
      const size_t room = buf.size() < static_cast<size_t>(cap) ? static_cast<size_t>(cap) - buf.size() : 0;
      buf.append(chunk, std::min(room, static_cast<size_t>(n)));
      if (static_cast<size_t>(n) > room) over = true;
    }
  };
  auto finish_step = [&](const Report& r) {
    drain(out[0], outbuf, out_over);
    drain(err[0], errbuf, err_over);
    auto key = [&](const char* k) { return wire::cat("step.", r.step, ".", k); };
    resp[key("status")] = wire::cat(r.status);
    resp[key("exec_errno")] = wire::cat(r.exec_errno);
    resp[key("killed")] = r.killed == kKilledWall ? "wall" : (r.killed == kKilledRequest && asked_kill) ? "output" : "";
    resp[key("cpu_us")] = wire::cat(r.cpu_us);
    resp[key("maxrss_kb")] = wire::cat(r.maxrss_kb);
    resp[key("wall_us")] = wire::cat(r.wall_us);
    resp[key("stdout")] = std::move(outbuf);
    resp[key("stderr")] = std::move(errbuf);
    resp[key("stdout_over")] = wire::cat(out_over ? 1 : 0);
    resp[key("stderr_over")] = wire::cat(err_over ? 1 : 0);
    resp["steps_run"] = wire::cat(r.step + 1);
    outbuf.clear();
    errbuf.clear();
    out_over = err_over = asked_kill = false;
  };
  bool init_done = false;
  while (!init_done) {
    struct pollfd p[4] = {{rep[0], POLLIN, 0}, {out[0], POLLIN, 0}, {err[0], POLLIN, 0},
                          {stdin_open ? in[1] : -1, POLLOUT, 0}};
    if (poll(p, 4, 1000) < 0 && errno != EINTR) break;
    if (p[1].revents) drain(out[0], outbuf, out_over);
    if (p[2].revents) drain(err[0], errbuf, err_over);
    if ((out_over || err_over) && !asked_kill) {
      asked_kill = true;
      write_all(ctl[1], "k", 1);
    }
    if (stdin_open && (p[3].revents & (POLLOUT | POLLERR | POLLHUP))) {
      const ssize_t n = write(in[1], req.stdin_data.data() + stdin_off, req.stdin_data.size() - stdin_off);
      if (n > 0) stdin_off += static_cast<size_t>(n);
      if ((n < 0 && errno != EAGAIN && errno != EINTR) || stdin_off == req.stdin_data.size()) {
        close(in[1]);
        stdin_open = false;
      }
    }
    if (p[0].revents) {
      Report r;
      const ssize_t n = read(rep[0], &r, sizeof(r));
      if (n == 0) {
        init_done = true;
      } else if (n == sizeof(r) && r.kind == kSetupError) {
        resp["error"] = std::string(r.text, strnlen(r.text, sizeof(r.text)));
      } else if (n == sizeof(r) && r.kind == kStepDone) {
        finish_step(r);
        step = static_cast<size_t>(r.step) + 1;
        // The next step (running the compiled program) only after a clean compile.
        const bool ok = WIFEXITED(r.status) && WEXITSTATUS(r.status) == 0 && r.exec_errno == 0 && r.killed == 0;
        if (step < req.steps.size() && ok) {
          cap = req.steps[step].output_bytes;
          write_all(ctl[1], "g", 1);
        } else {
          write_all(ctl[1], "q", 1);
        }
      }
    }
  }
  int status = 0;
  waitpid(init, &status, 0);
  if (!cgroup.empty()) {
    const long long peak = std::atoll(read_file(cgroup + "/memory.peak").c_str());
    if (peak > 0) resp["cgroup.peak_kb"] = wire::cat(peak / 1024);
    for (const std::string& line : wire::split(read_file(cgroup + "/memory.events"), '\n'))
      if (line.rfind("oom_kill ", 0) == 0) resp["cgroup.oom_kills"] = line.substr(9);
    rmdir(cgroup.c_str());
  }
  if (resp.find("steps_run") == resp.end() && resp.find("error") == resp.end())
    resp["error"] = wire::cat("the sandbox ended before the program ran (status ", status, ")");
  return resp;
}

// Probe: which namespaces can be created, and whether seccomp filters load.
int probe_child(void*) { return 0; }

Message probe() {
  Message resp;
  alignas(64) static char stack[64 << 10];
  auto try_clone = [&](int flags) {
    const pid_t pid = clone(probe_child, stack + sizeof(stack), flags | SIGCHLD, nullptr);
    if (pid < 0) return false;
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
  };
  resp["user_ns"] = try_clone(CLONE_NEWUSER) ? "1" : "0";
  resp["pid_ns"] = try_clone(CLONE_NEWUSER | CLONE_NEWPID) ? "1" : "0";
  resp["net_ns"] = try_clone(CLONE_NEWUSER | CLONE_NEWNET) ? "1" : "0";
  resp["mount_ns"] = try_clone(CLONE_NEWUSER | CLONE_NEWNS) ? "1" : "0";
  resp["ipc_ns"] = try_clone(CLONE_NEWUSER | CLONE_NEWIPC) ? "1" : "0";
  resp["uts_ns"] = try_clone(CLONE_NEWUSER | CLONE_NEWUTS) ? "1" : "0";
  // seccomp: load the real filter in a child.
  const pid_t pid = fork();
  if (pid == 0) {
    std::string why;
    scmp_filter_ctx f = build_seccomp_filter(&why);
    if (f == nullptr || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || seccomp_load(f) != 0) _exit(1);
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  resp["seccomp"] = WIFEXITED(status) && WEXITSTATUS(status) == 0 ? "1" : "0";
  return resp;
}

}  // namespace
}  // namespace r1lab::sandbox

int main(int argc, char** argv) {
  using namespace r1lab::sandbox;
  // Descriptors that other threads of the Runner's process had open when it forked us are not ours: a
  // pipe end kept here would hold another run's output open.
  syscall(SYS_close_range, 3, ~0U, 0);
  signal(SIGPIPE, SIG_IGN);
  // Root's supplementary groups must not reach the sandbox (its maps cover one uid and gid only).
  if (geteuid() == 0) setgroups(0, nullptr);
  // Nothing of the caller's environment goes further.
  clearenv();
  wire::Message resp;
  if (argc > 1 && std::string(argv[1]) == "--probe") {
    resp = probe();
  } else {
    std::string data((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    auto msg = wire::decode(data);
    std::string why = "malformed request";
    auto req = msg ? parse_request(*msg, &why) : std::nullopt;
    if (!req) {
      resp["error"] = why;
    } else {
      resp = launch(*req);
    }
  }
  const std::string out = wire::encode(resp);
  return write_all(1, out.data(), out.size()) ? 0 : 1;
}
