// The CPUs kvtier's own threads run on.
//
// An inference engine often pins its compute threads one per core: vLLM's
// CPU backend binds its OpenMP threads, the main thread included, with
// VLLM_CPU_OMP_THREADS_BIND. A new thread inherits its creator's affinity,
// so every thread kvtier starts from such a thread (copy pool, write-behind,
// the transport's progress thread, UCX's async thread) would share that one
// core with the compute threads and with each other. Under load they then
// stay runnable for seconds without running: a P/D producer's UCX async
// thread never accepted a consumer's connection before the consumer timed
// out, while the other core was idle.
//
// Contract: kvtier's threads run on the process's CPUs, the union of the
// affinities of all its threads at the time a thread starts. That is the
// set of cores the process was given (a taskset or a cpuset on the process
// still bounds it; nothing widens past what some thread of the process may
// already use). KVTIER_THREAD_AFFINITY=inherit turns this off: threads then
// inherit their creator's affinity ("process", empty or unset: the default;
// another value is reported once on stderr and means the default).
//
// Thread safety: every function here may be called from any thread. A
// thread's affinity is per thread; only the calling thread's is changed.
#pragma once

#include <sched.h>

namespace kvtier {

// The union of the affinity masks of every thread of this process (read
// from /proc at most every 100 ms; a cached answer in between). False when
// it cannot be read, or when KVTIER_THREAD_AFFINITY=inherit.
bool ProcessCpuSet(cpu_set_t* out);

// Sets the calling thread's affinity to cpus, a ProcessCpuSet answer (no-op
// for null or when the call fails: the thread keeps what it inherited).
void RunOnProcessCpus(const cpu_set_t* cpus);

// For threads created by code kvtier does not own (UCX starts its async
// thread inside ucp_worker_create): widens the calling thread to the
// process's CPUs for the scope, so threads it creates inherit that, and
// restores the calling thread's own affinity at the end.
class ScopedProcessCpus {
 public:
  ScopedProcessCpus();
  ~ScopedProcessCpus();
  ScopedProcessCpus(const ScopedProcessCpus&) = delete;
  ScopedProcessCpus& operator=(const ScopedProcessCpus&) = delete;

 private:
  bool restore_ = false;
  cpu_set_t saved_;
};

}  // namespace kvtier
