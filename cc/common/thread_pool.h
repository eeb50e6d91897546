// ThreadPool: a fixed set of workers draining one FIFO of tasks.
//
// Contract
// - Create() starts every worker or none: kResourceExhausted (naming the
//   worker) when the system refuses a thread; the ones already started are
//   stopped and joined first, so nothing is left joinable.
// - Submit() never blocks on a full queue: it returns kUnavailable once
//   max_queue tasks are waiting (bounded queues, see DESIGN.md), so callers
//   decide what to shed. kFailedPrecondition after Shutdown().
// - Shutdown() (and the destructor) stops accepting work, runs every task
//   already queued, then joins. Tasks must not call Shutdown().
// - Tasks run without any pool lock held.
// - A task that throws does not end its worker or the process: the worker
//   catches everything (cc/common/thread_guard.h), counts it in
//   task_exceptions(), logs the first one to stderr and goes on. A task that
//   owes a caller a result must catch its own exceptions to deliver it; the
//   pool cannot know whom to tell.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cc/common/status.h"

namespace kvtier {

class ThreadPool {
 public:
  // num_threads 0 is taken as 1.
  static StatusOr<std::unique_ptr<ThreadPool>> Create(size_t num_threads, size_t max_queue, std::string name);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  Status Submit(std::function<void()> task);
  void Shutdown();

  size_t num_threads() const { return workers_.size(); }
  size_t queue_depth() const;
  // Tasks that threw (and were dropped at the throw).
  uint64_t task_exceptions() const { return task_exceptions_.load(std::memory_order_relaxed); }

 private:
  ThreadPool(size_t max_queue, std::string name) : max_queue_(max_queue), name_(std::move(name)) {}
  void WorkerLoop();

  const size_t max_queue_;
  const std::string name_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> task_exceptions_{0};  // a count only
  std::atomic<bool> exception_logged_{false};
};

}  // namespace kvtier
