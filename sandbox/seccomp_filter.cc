#include "sandbox/seccomp_filter.h"

#include <sched.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>


#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x00000080
#endif

namespace r1lab::sandbox {

scmp_filter_ctx build_seccomp_filter(std::string* error) {
  scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
  if (ctx == nullptr) {
    *error = "seccomp_init failed";
    return nullptr;
  }
  // Syscalls of other ABIs than the native one: kill (the default action for a bad arch).
  seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS);
  const char* denied[] = {
      "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
      "mount", "umount", "umount2", "mount_setattr", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
      "fspick", "pivot_root", "chroot", "unshare", "setns",
      "kexec_load", "kexec_file_load", "reboot", "init_module", "finit_module", "delete_module",
      "bpf", "perf_event_open", "keyctl", "add_key", "request_key",
      "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "userfaultfd",
      "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "fanotify_init",
      "io_uring_setup", "io_uring_enter", "io_uring_register",
      "syslog", "vhangup", "iopl", "ioperm", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
      "nfsservctl", "uselib",
  };
  for (const char* name : denied) {
    const int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;  // not on this architecture
    const int rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 0);
    if (rc != 0) {
      seccomp_release(ctx);
      *error = std::string("seccomp rule for ") + name + ": " + std::strerror(-rc);
      return nullptr;
    }
  }
  int rc = 0;
  // clone: no new namespaces. clone3 passes its flags in memory the filter cannot read: ENOSYS.
  const unsigned long ns_flags[] = {CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWIPC,
                                    CLONE_NEWUTS, CLONE_NEWCGROUP, CLONE_NEWTIME};
  for (unsigned long f : ns_flags)
    rc = rc ? rc : seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(clone), 1, SCMP_A0(SCMP_CMP_MASKED_EQ, f, f));
  rc = rc ? rc : seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0);
  // Sockets: AF_UNIX only (the network namespace has no route out either).
  rc = rc ? rc : seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(socket), 1, SCMP_A0(SCMP_CMP_NE, AF_UNIX));
  if (rc != 0) {
    seccomp_release(ctx);
    *error = std::string("seccomp rule: ") + std::strerror(-rc);
    return nullptr;
  }
  return ctx;
}

}  // namespace r1lab::sandbox
