// ThreadPool: a fixed set of workers draining one FIFO of tasks.
//
// Contract
// - Submit() never blocks on a full queue: it returns kUnavailable once
//   max_queue tasks are waiting (bounded queues, see DESIGN.md), so callers
//   decide what to shed. kFailedPrecondition after Shutdown().
// - Shutdown() (and the destructor) stops accepting work, runs every task
//   already queued, then joins. Tasks must not call Shutdown().
// - Tasks run without any pool lock held.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cc/common/status.h"

namespace kvtier {

class ThreadPool {
 public:
  ThreadPool(size_t num_threads, size_t max_queue, std::string name);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  Status Submit(std::function<void()> task);
  void Shutdown();

  size_t num_threads() const { return workers_.size(); }
  size_t queue_depth() const;

 private:
  void WorkerLoop();

  const size_t max_queue_;
  const std::string name_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace kvtier
