// Helpers shared by the disk tier's tests and benchmark: scratch
// directories on a real file system, deterministic chunk contents and
// 4096-aligned buffers.
#pragma once

#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <initializer_list>
#include <vector>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <span>
#include <string>

#include "cc/common/chunk_key.h"
#include "cc/tiers/tier.h"

namespace kvtier::disk_test {

// A fresh, empty directory under $TEST_TMPDIR (Bazel puts it on the output
// base's disk, which takes O_DIRECT), else under /var/tmp.
inline std::string FreshDir(const std::string& name) {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string d = std::string(base != nullptr ? base : "/var/tmp") + "/kvtier_disk_" + name + "_" +
                  std::to_string(getpid());
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

inline ChunkKey KeyFor(uint64_t i) { return ChunkKey{i * 0x9E3779B97F4A7C15ull + 1, i ^ 0xABCDEF}; }
inline uint64_t FingerprintFor(uint64_t i) { return i * 31 + 7; }
inline ChunkMeta MetaFor(uint64_t i) {
  ChunkMeta m;
  m.key = KeyFor(i);
  m.fingerprint = FingerprintFor(i);
  m.layout_id = 0x1a1a + i % 3;
  m.num_tokens = static_cast<uint32_t>(1 + i % 256);
  return m;
}

// Contents are a function of (i, size), so a reader can check them without
// keeping a copy.
inline void FillFor(uint64_t i, std::span<std::byte> out) {
  uint64_t x = i * 0x2545F4914F6CDD1Dull + out.size() + 1;
  for (size_t k = 0; k < out.size(); ++k) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    out[k] = static_cast<std::byte>(x);
  }
}
inline bool MatchesFor(uint64_t i, std::span<const std::byte> got) {
  uint64_t x = i * 0x2545F4914F6CDD1Dull + got.size() + 1;
  for (size_t k = 0; k < got.size(); ++k) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    if (got[k] != static_cast<std::byte>(x)) return false;
  }
  return true;
}

// 4096-aligned bytes; `misalign` shifts the span start to test the bounce path.
class Buffer {
 public:
  explicit Buffer(size_t n, size_t misalign = 0) : n_(n), misalign_(misalign) {
    p_ = static_cast<std::byte*>(std::aligned_alloc(4096, ((n + misalign + 4095) / 4096) * 4096 + 4096));
  }
  ~Buffer() { std::free(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  std::span<std::byte> span() { return {p_ + misalign_, n_}; }
  std::span<const std::byte> cspan() const { return {p_ + misalign_, n_}; }

 private:
  std::byte* p_;
  size_t n_, misalign_;
};

// Makes the given syscalls fail with EPERM in this process from now on, as a
// container's seccomp profile does (Docker's default forbids io_uring). Needs
// no privilege (no_new_privs). Irreversible: call it in a forked child.
inline bool ForbidSyscalls(std::initializer_list<int> nrs) {
  std::vector<sock_filter> f;
  f.push_back(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)));
  f.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0));
  f.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
  f.push_back(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)));
  for (int nr : nrs) {
    f.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, static_cast<uint32_t>(nr), 0, 1));
    f.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)));
  }
  f.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
  sock_fprog prog{static_cast<unsigned short>(f.size()), f.data()};
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return false;
  return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0;
}

// Moves this process into a private mount namespace, so it may mount (a
// tmpfs, a read-only bind mount) without touching anyone else: directly with
// CAP_SYS_ADMIN, else inside a new user namespace that maps this uid to root
// there (no privilege needed where the kernel allows user namespaces).
// False if neither works. Irreversible: call it in a forked child.
inline bool EnterPrivateMountNamespace() {
  if (unshare(CLONE_NEWNS) != 0) {
    const uid_t uid = getuid();
    const gid_t gid = getgid();
    if (unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0) return false;
    auto put = [](const char* path, const std::string& text) {
      const int fd = open(path, O_WRONLY | O_CLOEXEC);
      if (fd < 0) return false;
      const bool ok = write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
      close(fd);
      return ok;
    };
    put("/proc/self/setgroups", "deny");  // absent on old kernels: then gid_map may still work
    if (!put("/proc/self/uid_map", "0 " + std::to_string(uid) + " 1") ||
        !put("/proc/self/gid_map", "0 " + std::to_string(gid) + " 1")) {
      return false;
    }
  }
  return mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) == 0;
}

// Exit code of a child, or 128 + signal.
inline int WaitExit(pid_t pid) {
  int st = 0;
  while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

}  // namespace kvtier::disk_test
