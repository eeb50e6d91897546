// Thread boundaries: where an exception must stop.
//
// cc/ reports failure with Status and throws nothing, but code it runs on its
// own threads can still throw: callbacks from the layers above (a FillFn from
// the Python bindings, a CUDA gather), std::bad_alloc, std::system_error from
// std::thread. An exception that leaves a thread's entry function calls
// std::terminate and takes the whole inference server down, and a
// std::thread destroyed while joinable does the same. So every thread entry
// in cc/ catches everything, turns it into a kInternal Status where a caller
// is waiting for one, counts it, and logs it once (LogOnce); and threads are
// started through StartThread, which reports a failed start as a Status.
//
// Thread safety: every function here may be called from any thread.
#pragma once

#include <atomic>
#include <functional>
#include <string_view>
#include <thread>

#include "cc/common/status.h"

namespace kvtier {

// Call only inside a catch block: kInternal naming `where` and the exception
// (what() for a std::exception, "unknown exception" otherwise).
Status StatusFromCurrentException(std::string_view where);

// Runs fn; an exception it throws becomes StatusFromCurrentException(where).
template <typename Fn>
Status CallNoThrow(std::string_view where, Fn&& fn) noexcept {
  try {
    return std::forward<Fn>(fn)();
  } catch (...) {
    return StatusFromCurrentException(where);
  }
}

// Writes "kvtier: <s>" to stderr the first time it is called with this flag,
// and nothing after: a failure that repeats per chunk must not flood the log.
// Returns whether it wrote.
bool LogOnce(std::atomic<bool>* logged, const Status& s);

// Starts *thread running fn, on the process's CPUs (cpu_affinity.h).
// kResourceExhausted when the system refuses a thread (std::system_error);
// *thread is then left empty (not joinable).
Status StartThread(std::thread* thread, std::function<void()> fn);

namespace thread_guard_internal {
// Tests only: of the next StartThread calls, `skip` succeed, then `n` fail
// as if the system had no threads left. Process-wide; replaces any earlier
// request.
void FailThreadStarts(int skip, int n);
}  // namespace thread_guard_internal

}  // namespace kvtier
