// The seccomp-bpf filter every sandboxed program runs under (libseccomp).
#pragma once

#include <seccomp.h>

#include <string>

namespace r1lab::sandbox {

// Allows what ordinary programs, interpreters and compilers do; denies with EPERM: ptrace and cross-process
// memory access, mount/umount and the new mount API, unshare/setns and clone with namespace flags (clone3
// answers ENOSYS so that libc falls back to clone, whose flags the filter can see), chroot/pivot_root,
// kexec, bpf, perf_event_open, keyctl/add_key/request_key, reboot, module loading, swap, acct, quotactl,
// userfaultfd, handle-based opens, io_uring (its operations bypass seccomp), syslog, and socket() for any
// family other than AF_UNIX. Foreign syscall ABIs (i386, x32) kill the process.
// nullptr with *error set when libseccomp fails.
scmp_filter_ctx build_seccomp_filter(std::string* error);

}  // namespace r1lab::sandbox
