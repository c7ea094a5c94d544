// Hostile programs: each one tries to escape, starve or damage the host, and has an expected verdict and
// output. After every program the test checks that the host is unaffected: a canary file outside the
// sandbox is unchanged, no process the program started is left (each names itself with a unique token),
// a loopback listener of the test saw no connection, and this process can still fork.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gtest/gtest.h"
#include "sandbox/sandbox.h"

namespace r1lab::sandbox {
namespace {

using V = Verdict;

struct Case {
  std::string name;
  Language lang;
  std::string source;
  std::set<Verdict> verdicts;
  std::vector<std::string> stdout_has = {};
  std::vector<std::string> stdout_lacks = {};
  void (*adjust)(Limits&) = nullptr;
  int64_t linger_ms = 0;  // wait this long before looking for leftover processes
};

void short_limits(Limits& l) {
  l.time_limit_ms = 1000;
  l.wall_limit_ms = 2000;
  l.memory_mb = 128;
}

// A memory bomb must meet its memory limit before any clock: on a loaded two-core machine a Python
// program got 261 ms of CPU in its 2 s of wall time and was stopped at 60 MB for time.
void memory_limits(Limits& l) {
  l.time_limit_ms = 4000;
  l.wall_limit_ms = 12000;
  l.memory_mb = 128;
}

// Python: name this process (and what it forks) with the case's token.
constexpr char kNameMe[] = "import ctypes, os\nctypes.CDLL(None).prctl(15, b'{TOKEN}', 0, 0, 0)\n";

std::vector<Case> cases() {
  const std::string name_me = kNameMe;
  return {
      {"fork_bomb_python", Language::kPython, name_me + "while True:\n    os.fork()\n", {V::kRuntimeError, V::kTimeLimitExceeded}},
      {"fork_bomb_c", Language::kC,
       "#include <unistd.h>\n#include <sys/prctl.h>\nint main(){prctl(PR_SET_NAME,\"{TOKEN}\");for(;;)fork();}\n",
       {V::kTimeLimitExceeded, V::kRuntimeError}, {}, {}, short_limits},
      {"memory_bomb_at_once", Language::kPython, "x = bytearray(64 * 1024**3)\nprint('allocated')\n",
       {V::kMemoryLimitExceeded}, {}, {"allocated"}},
      {"memory_bomb_gradual", Language::kPython, "l = []\nwhile True:\n    l.append(b'x' * (8 << 20))\n",
       {V::kMemoryLimitExceeded}, {}, {}, memory_limits},
      {"memory_bomb_c", Language::kC,
       "#include <stdlib.h>\n#include <string.h>\nint main(){for(;;){char*p=malloc(1<<20);if(!p)return 3;"
       "memset(p,1,1<<20);}}\n",
       {V::kMemoryLimitExceeded}, {}, {}, memory_limits},
      {"cpu_spin", Language::kPython, "while True:\n    pass\n", {V::kTimeLimitExceeded}, {}, {}, short_limits},
      {"cpu_spin_many_threads", Language::kC,
       "#include <pthread.h>\nstatic void*spin(void*a){for(volatile long i=0;;++i);return a;}\n"
       "int main(){pthread_t t[16];for(int i=0;i<16;++i)pthread_create(&t[i],0,spin,0);spin(0);}\n",
       {V::kTimeLimitExceeded}, {}, {}, short_limits},
      {"sleep_past_wall_limit", Language::kPython, "import time\ntime.sleep(100)\nprint('woke')\n",
       {V::kTimeLimitExceeded}, {}, {"woke"}, short_limits},
      {"stdout_flood", Language::kPython, "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
       {V::kOutputLimitExceeded}},
      {"stderr_flood", Language::kPython, "import sys\nwhile True:\n    sys.stderr.write('y' * 65536)\n",
       {V::kOutputLimitExceeded}},
      {"huge_file_python", Language::kPython,
       "with open('big', 'wb') as f:\n    for _ in range(1000):\n        f.write(b'z' * (1 << 20))\n",
       {V::kOutputLimitExceeded}},
      {"huge_file_c", Language::kC,
       "#include <stdio.h>\nint main(){static char b[1<<20];FILE*f=fopen(\"big\",\"wb\");"
       "for(int i=0;i<1000;++i)fwrite(b,1,sizeof b,f);fclose(f);puts(\"wrote\");}\n",
       {V::kOutputLimitExceeded}, {}, {"wrote"}},
      {"fill_the_work_dir", Language::kPython,
       "import errno\ntry:\n    for i in range(1000):\n        open(f'f{i}', 'wb').write(b'z' * (8 << 20))\n"
       "except OSError as e:\n    print(errno.errorcode[e.errno])\n",
       {V::kOk}, {"ENOSPC"}},
      {"read_host_files", Language::kPython,
       "n = 0\nfor p in ['/etc/passwd', '/etc/shadow', '/etc/hostname', '/root/.bashrc', '{CANARY_PATH}',\n"
       "          '/proc/1/root{CANARY_PATH}', '/proc/{HOSTPID}/root{CANARY_PATH}', '/proc/{HOSTPID}/environ']:\n"
       "    try:\n        print(open(p).read()); n += 1\n    except OSError:\n        pass\nprint(n, 'readable')\n",
       {V::kOk}, {"0 readable"}, {"{CANARY}"}},
      {"write_outside_work_dir", Language::kPython,
       // The canary's own path is the sandbox's private /tmp: writing there must not reach the host's file.
       "n = 0\nfor p in ['/usr/pwned', '/etc/pwned', '/pwned', '/proc/pwned', '/dev/pwned', '/usr/bin/python3',\n"
       "          '/proc/1/root/pwned', '/dev/null/x']:\n"
       "    try:\n        open(p, 'a').write('pwned'); n += 1\n    except OSError:\n        pass\nprint(n, 'written')\n"
       "for p in ['{CANARY_PATH}', '{CANARY_PATH}.new']:\n    open(p, 'w').write('pwned')\n",
       {V::kOk}, {"0 written"}},
      {"network_to_host_loopback", Language::kPython,
       "import socket\nfor fam, addr in [(socket.AF_INET, ('127.0.0.1', {PORT})), (socket.AF_INET6, ('::1', {PORT}))]:\n"
       "    try:\n        socket.socket(fam).connect(addr); print('connected')\n"
       "    except OSError as e:\n        print('refused', e.errno)\n",
       {V::kOk}, {"refused"}, {"connected"}},
      {"network_outside", Language::kPython,
       "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=1); print('connected')\n"
       "except OSError as e:\n    print('no network')\ntry:\n    socket.getaddrinfo('example.com', 80); print('resolved')\n"
       "except OSError:\n    print('no dns')\n",
       {V::kOk}, {"no network", "no dns"}, {"connected", "resolved"}},
      {"raw_and_packet_sockets", Language::kPython,
       "import socket\nfor args in [(socket.AF_INET, socket.SOCK_RAW, 1), (socket.AF_PACKET, socket.SOCK_RAW, 0),\n"
       "             (socket.AF_NETLINK, socket.SOCK_RAW, 0)]:\n"
       "    try:\n        socket.socket(*args); print('opened')\n    except OSError as e:\n        print('denied')\n"
       "a, b = socket.socketpair()\na.send(b'unix ok')\nprint(b.recv(16).decode())\n",
       {V::kOk}, {"denied", "unix ok"}, {"opened"}},
      {"kill_everything", Language::kPython, "import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n    pass\nprint('alive')\n",
       {V::kOk}, {"alive"}},
      {"kill_host_process", Language::kPython,
       "import os\ntry:\n    os.kill({HOSTPID}, 9); print('killed')\nexcept ProcessLookupError:\n    print('no such process')\n",
       {V::kOk}, {"no such process"}},
      {"signals_at_the_runner", Language::kPython,
       "import os, signal\nfor sig in [signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP, signal.SIGUSR1]:\n"
       "    for pid in [os.getppid(), 1]:\n        try:\n            os.kill(pid, sig)\n        except OSError:\n            pass\n"
       "print('still here')\n",
       {V::kOk}, {"still here"}},
      {"ptrace", Language::kPython,
       "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
       "print(libc.ptrace(0, 0, 0, 0), ctypes.get_errno())\nprint(libc.ptrace(16, 1, 0, 0), ctypes.get_errno())\n",
       {V::kOk}, {"-1 1\n-1 1"}},
      {"mount_unshare_setuid_chroot", Language::kPython,
       "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
       "print('mount', libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), ctypes.get_errno())\n"
       "print('unshare', libc.unshare(0x10000000), ctypes.get_errno())\n"
       "print('setns', libc.setns(os.open('/proc/self/ns/net', os.O_RDONLY), 0), ctypes.get_errno())\n"
       "for f, a in [(os.setuid, 1), (os.setgid, 1), (os.chroot, '/tmp')]:\n"
       "    try:\n        f(a); print('allowed')\n    except OSError as e:\n        print('denied', e.errno)\n",
       {V::kOk}, {"mount -1 1", "unshare -1 1", "setns -1 1", "denied 1"}, {"allowed"}},
      {"privileged_syscalls", Language::kPython,
       "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
       "# x86_64: io_uring_setup, bpf, perf_event_open, keyctl, kexec_load, init_module, reboot, clone(NEWUSER)\n"
       "for nr, args in [(425, (8, 0)), (321, (0, 0, 0)), (298, (0, 0, -1, -1, 0)), (250, (0,)), (246, (0, 0, 0, 0)),\n"
       "                 (175, (0, 0, 0)), (169, (0xfee1dead, 672274793, 0x1234567, 0)), (56, (0x10000000 | 17, 0, 0, 0, 0))]:\n"
       "    print(nr, libc.syscall(nr, *args), ctypes.get_errno())\n",
       {V::kOk},
       {"425 -1 1", "321 -1 1", "298 -1 1", "250 -1 1", "246 -1 1", "175 -1 1", "169 -1 1", "56 -1 1"}},
      {"proc_shows_only_the_sandbox", Language::kPython,
       "import os\npids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\nprint(pids)\n"
       "print('host visible' if os.path.exists('/proc/{HOSTPID}') and {HOSTPID} > 2 else 'host hidden')\n",
       {V::kOk}, {"[1, 2]", "host hidden"}},
      {"fd_exhaustion", Language::kPython,
       "import os\nfds = []\ntry:\n    while True:\n        fds.append(os.open('/dev/null', os.O_RDONLY))\n"
       "except OSError as e:\n    print('stopped at', len(fds), e.errno)\n",
       {V::kOk}, {"stopped at", " 24"}},
      {"daemon_outlives_the_program", Language::kPython,
       name_me + "import sys, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                 "        time.sleep(1)\n        print('MARKER', flush=True)\n        open('/work/marker', 'w').write('x')\n"
                 "    os._exit(0)\nos.wait()\nprint('parent done')\n",
       {V::kOk}, {"parent done"}, {"MARKER"}, nullptr, 1500},
      {"environment_secrets", Language::kPython,
       "import os\nprint(dict(os.environ))\nfor p in ['/proc/self/environ', '/proc/1/environ', '/proc/1/cmdline']:\n"
       "    try:\n        print(open(p, 'rb').read())\n    except OSError as e:\n        print(p, 'denied')\n",
       {V::kOk}, {"/proc/1/environ denied"}, {"R1LAB_TEST_SECRET", "s3cr3t-value"}},
      {"symlink_tricks", Language::kPython,
       "import os\nos.symlink('/etc/passwd', 'a')\nos.symlink('/proc/1/root', 'b')\nos.symlink('{CANARY_PATH}', 'c')\n"
       "os.symlink('/proc/{HOSTPID}/root/', 'd')\nn = 0\n"
       "for p in ['a', 'b/etc/passwd', 'c', 'd{CANARY_PATH}']:\n"
       "    try:\n        print(open(p).read()); n += 1\n    except OSError:\n        pass\nprint(n, 'followed')\n",
       {V::kOk}, {"0 followed"}, {"{CANARY}"}},
      {"dev_access", Language::kPython,
       "import os\nprint(sorted(os.listdir('/dev')))\nn = 0\n"
       "for p in ['/dev/sda', '/dev/vda', '/dev/mem', '/dev/kmsg', '/dev/tty', '/dev/console', '/dev/shm/x']:\n"
       "    try:\n        open(p, 'rb'); n += 1\n    except OSError:\n        pass\n"
       "try:\n    os.mknod('/work/sda', 0o600 | 0o60000, os.makedev(8, 0)); n += 1\nexcept OSError:\n    pass\n"
       "print(n, 'opened')\n",
       {V::kOk}, {"['fd', 'full', 'null', 'random', 'stderr', 'stdin', 'stdout', 'urandom', 'zero']", "0 opened"}},
      {"kernel_interfaces", Language::kPython,
       "import os, socket\nprint(socket.gethostname())\nprint(os.path.exists('/sys/kernel'))\nn = 0\n"
       "for p in ['/proc/sysrq-trigger', '/proc/sys/kernel/hostname', '/proc/sys/vm/drop_caches']:\n"
       "    try:\n        open(p, 'w').write('1'); n += 1\n    except OSError:\n        pass\nprint(n, 'written')\n",
       {V::kOk}, {"sandbox\nFalse\n0 written"}},
      {"raise_own_limits", Language::kPython,
       "import resource\nfor r in [resource.RLIMIT_NPROC, resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_NOFILE]:\n"
       "    try:\n        resource.setrlimit(r, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)); print('raised')\n"
       "    except (ValueError, OSError):\n        print('kept')\n",
       {V::kOk}, {"kept\nkept\nkept\nkept"}, {"raised"}},
      {"foreign_syscall_abi", Language::kC,
       "#include <stdio.h>\nint main(){long r; __asm__ volatile(\"int $0x80\" : \"=a\"(r) : \"a\"(20));"
       "printf(\"getpid via int 0x80: %ld\\n\", r);}\n",
       {V::kRuntimeError}, {}, {"getpid"}},
      {"compile_bomb_include_dev_zero", Language::kC, "#include \"/dev/zero\"\nint main(){}\n",
       {V::kCompilationError}, {}, {},
       [](Limits& l) { l.compile_time_limit_ms = 2000; l.compile_memory_mb = 512; }},
      {"compile_bomb_constexpr", Language::kCpp,
       "constexpr long f(){long s=0;for(long i=0;i<(1L<<40);++i)s+=i%7;return s;}\nstatic_assert(f()>0);\nint main(){}\n",
       {V::kCompilationError}, {}, {}, [](Limits& l) { l.compile_time_limit_ms = 2000; }},
      {"compile_bomb_templates", Language::kCpp,
       // Two new types per level: 2^40 instantiations, and type names that double in length.
       "template<class T, int N> struct E { static const long v = E<E<T, N-1>, N-1>::v + E<T*, N-1>::v; };\n"
       "template<class T> struct E<T, 0> { static const long v = 1; };\nlong x = E<int, 40>::v;\nint main(){}\n",
       {V::kCompilationError}, {}, {}, [](Limits& l) { l.compile_time_limit_ms = 2000; }},
      {"compiler_error_flood", Language::kCpp,
       "#define A x x x x x x x x x x x x x x x x\n#define B A A A A A A A A A A A A A A A A\n"
       "#define C B B B B B B B B B B B B B B B B\nC C C C C C C C C C C C C C C C\n",
       {V::kCompilationError}},
  };
}

class Hostile : public ::testing::TestWithParam<Case> {
 protected:
  static void SetUpTestSuite() {
    // Set before the runner exists: nothing of this process's environment may reach a program.
    setenv("R1LAB_TEST_SECRET", "s3cr3t-value", 1);
    auto r = Runner::create();
    if (!r.ok()) {
      skip_ = absl::StrCat("no sandbox: ", r.status().message());
      return;
    }
    if (!(*r)->protections().missing().empty()) {
      skip_ = absl::StrCat("this host cannot isolate programs:\n", (*r)->protections().describe());
      return;
    }
    runner_ = std::move(*r);
    std::mt19937_64 rng(std::random_device{}());
    canary_ = absl::StrCat("CANARY-", rng());
    canary_path_ = absl::StrCat(::testing::TempDir(), "/r1lab-canary-", getpid());
    std::ofstream(canary_path_) << canary_;
    listener_ = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(listener_, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    listen(listener_, 16);
    socklen_t len = sizeof(a);
    getsockname(listener_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
  }
  static void TearDownTestSuite() {
    runner_.reset();
    if (!canary_path_.empty()) std::filesystem::remove(canary_path_);
    if (listener_ >= 0) close(listener_);
  }
  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
  }

  static bool process_named(const std::string& token) {
    for (const auto& e : std::filesystem::directory_iterator("/proc")) {
      std::ifstream in(e.path() / "comm");
      std::string comm;
      if (std::getline(in, comm) && comm == token) return true;
    }
    return false;
  }

  static inline std::string skip_;
  static inline std::unique_ptr<Runner> runner_;
  static inline std::string canary_, canary_path_;
  static inline int listener_ = -1, port_ = 0;
};

TEST_P(Hostile, GetsItsVerdictAndLeavesTheHostAlone) {
  const Case& c = GetParam();
  const std::string token = absl::StrCat("r1x", getpid() % 100000, c.name.size());
  auto fill = [&](const std::string& s) {
    return absl::StrReplaceAll(s, {{"{TOKEN}", token}, {"{CANARY_PATH}", canary_path_}, {"{CANARY}", canary_},
                                   {"{PORT}", absl::StrCat(port_)}, {"{HOSTPID}", absl::StrCat(getpid())}});
  };
  Program p;
  p.lang = c.lang;
  p.source = fill(c.source);
  Limits lim;
  lim.time_limit_ms = 2000;
  lim.wall_limit_ms = 4000;
  lim.memory_mb = 256;
  lim.max_processes = 16;
  lim.output_limit_bytes = 256 << 10;
  lim.work_dir_mb = 32;
  if (c.adjust) c.adjust(lim);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = runner_->run(p, lim);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(r.ok()) << r.status();
  SCOPED_TRACE(result_json(*r).substr(0, 2000));
  EXPECT_TRUE(c.verdicts.count(r->verdict)) << "verdict " << verdict_name(r->verdict) << ": " << r->message;
  for (const auto& s : c.stdout_has) EXPECT_NE(r->stdout_data.find(fill(s)), std::string::npos) << "missing: " << fill(s);
  for (const auto& s : c.stdout_lacks) EXPECT_EQ(r->stdout_data.find(fill(s)), std::string::npos) << "present: " << fill(s);
  EXPECT_LE(r->stdout_data.size(), static_cast<size_t>(lim.output_limit_bytes));
  EXPECT_LE(r->stderr_data.size(), static_cast<size_t>(lim.output_limit_bytes));
  // Every limit held: the run ended within its wall limits (and the compile step's) plus start-up.
  EXPECT_LT(secs, (lim.effective_wall_limit_ms() + 2 * lim.compile_time_limit_ms + 1000 + 3000) / 1000.0);

  // The host is unaffected.
  if (c.linger_ms) std::this_thread::sleep_for(std::chrono::milliseconds(c.linger_ms));
  EXPECT_FALSE(process_named(token)) << "a process of the program outlived it";
  std::ifstream in(canary_path_);
  std::string canary;
  std::getline(in, canary);
  EXPECT_EQ(canary, canary_) << "the canary file outside the sandbox changed";
  EXPECT_FALSE(std::filesystem::exists(canary_path_ + ".new"));
  EXPECT_FALSE(std::filesystem::exists("/pwned"));
  EXPECT_LT(accept(listener_, nullptr, nullptr), 0) << "the program reached a host loopback listener";
  const pid_t child = fork();
  if (child == 0) _exit(7);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  EXPECT_EQ(WEXITSTATUS(status), 7) << "this process can no longer fork";
}

INSTANTIATE_TEST_SUITE_P(Programs, Hostile, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

}  // namespace
}  // namespace r1lab::sandbox
