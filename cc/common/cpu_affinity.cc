#include "cc/common/cpu_affinity.h"

#include <dirent.h>
#include <pthread.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace kvtier {

namespace {

bool ScanProcessCpus(cpu_set_t* out) {
  CPU_ZERO(out);
  DIR* d = opendir("/proc/self/task");
  if (d == nullptr) return false;
  bool any = false;
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    const long tid = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0' || tid <= 0) continue;
    cpu_set_t s;
    CPU_ZERO(&s);
    // A thread that exits meanwhile is skipped (ESRCH).
    if (sched_getaffinity(static_cast<pid_t>(tid), sizeof(s), &s) != 0) continue;
    CPU_OR(out, out, &s);
    any = true;
  }
  closedir(d);
  return any && CPU_COUNT(out) > 0;
}

// KVTIER_THREAD_AFFINITY: unset, empty or "process" (the default) or
// "inherit". Anything else is a typo: said once on stderr, then the default
// (the Python config refuses it outright: kvtier.config).
bool InheritFromEnv() {
  const char* v = std::getenv("KVTIER_THREAD_AFFINITY");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "process") == 0) return false;
  if (std::strcmp(v, "inherit") == 0) return true;
  static std::once_flag warned;
  std::call_once(warned, [v] {
    std::fprintf(stderr, "kvtier: KVTIER_THREAD_AFFINITY=%s is neither 'process' nor 'inherit'; using 'process'\n", v);
  });
  return false;
}

}  // namespace

bool ProcessCpuSet(cpu_set_t* out) {
  if (InheritFromEnv()) return false;
  // StartThread runs on the copy path (cpu_copy starts helper threads per
  // large copy): the /proc scan is done at most every 100 ms.
  static std::mutex mu;
  static cpu_set_t cached;
  static bool valid = false;
  static std::chrono::steady_clock::time_point scanned;
  const auto now = std::chrono::steady_clock::now();
  std::lock_guard<std::mutex> lock(mu);
  if (!valid || now - scanned > std::chrono::milliseconds(100)) {
    valid = ScanProcessCpus(&cached);
    scanned = now;
  }
  if (valid) *out = cached;
  return valid;
}

void RunOnProcessCpus(const cpu_set_t* cpus) {
  if (cpus == nullptr) return;
  (void)pthread_setaffinity_np(pthread_self(), sizeof(*cpus), cpus);
}

ScopedProcessCpus::ScopedProcessCpus() {
  cpu_set_t wide;
  if (!ProcessCpuSet(&wide)) return;
  CPU_ZERO(&saved_);
  if (pthread_getaffinity_np(pthread_self(), sizeof(saved_), &saved_) != 0) return;
  if (CPU_EQUAL(&saved_, &wide)) return;
  restore_ = pthread_setaffinity_np(pthread_self(), sizeof(wide), &wide) == 0;
}

ScopedProcessCpus::~ScopedProcessCpus() {
  if (restore_) (void)pthread_setaffinity_np(pthread_self(), sizeof(saved_), &saved_);
}

}  // namespace kvtier
