#include "cc/common/thread_guard.h"

#include <cerrno>
#include <cstdio>
#include <exception>
#include <mutex>
#include <string>
#include <system_error>

#include "cc/common/cpu_affinity.h"

namespace kvtier {
namespace {

// Test injection (FailThreadStarts). Thread starts are rare and slow, so a
// mutex costs nothing here.
std::mutex g_inject_mu;
int g_inject_skip = 0;  // guarded by g_inject_mu
int g_inject_fail = 0;  // guarded by g_inject_mu

// True when a test asked for this start to fail.
bool TakeInjectedFailure() {
  std::lock_guard<std::mutex> lock(g_inject_mu);
  if (g_inject_fail == 0) return false;
  if (g_inject_skip > 0) {
    --g_inject_skip;
    return false;
  }
  --g_inject_fail;
  return true;
}

}  // namespace

Status StatusFromCurrentException(std::string_view where) {
  std::string m(where);
  try {
    throw;
  } catch (const std::exception& e) {
    m += ": exception: ";
    m += e.what();
  } catch (...) {
    m += ": unknown exception";
  }
  return Internal(std::move(m));
}

bool LogOnce(std::atomic<bool>* logged, const Status& s) {
  // exchange is the one-time gate; the write it guards is to stderr, so
  // relaxed suffices.
  if (logged->exchange(true, std::memory_order_relaxed)) return false;
  std::fprintf(stderr, "kvtier: %s (further errors of this kind are counted, not logged)\n",
               s.ToString().c_str());
  return true;
}

Status StartThread(std::thread* thread, std::function<void()> fn) {
  try {
    if (TakeInjectedFailure()) {
      throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again),
                              "injected by a test");
    }
    // Run on the process's CPUs, not only the creator's (cpu_affinity.h).
    cpu_set_t cpus;
    if (ProcessCpuSet(&cpus)) {
      *thread = std::thread([cpus, fn = std::move(fn)] {
        RunOnProcessCpus(&cpus);
        fn();
      });
    } else {
      *thread = std::thread(std::move(fn));
    }
    return Status::Ok();
  } catch (const std::system_error& e) {
    return ResourceExhausted(std::string("cannot start a thread: ") + e.what());
  } catch (...) {
    return StatusFromCurrentException("starting a thread");
  }
}

namespace thread_guard_internal {
void FailThreadStarts(int skip, int n) {
  std::lock_guard<std::mutex> lock(g_inject_mu);
  g_inject_skip = skip;
  g_inject_fail = n;
}
}  // namespace thread_guard_internal

}  // namespace kvtier
