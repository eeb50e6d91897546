#include "cc/common/thread_pool.h"

#include <pthread.h>

#include "cc/common/thread_guard.h"

namespace kvtier {

StatusOr<std::unique_ptr<ThreadPool>> ThreadPool::Create(size_t num_threads, size_t max_queue, std::string name) {
  if (num_threads == 0) num_threads = 1;
  std::unique_ptr<ThreadPool> pool(new ThreadPool(max_queue, std::move(name)));
  pool->workers_.reserve(num_threads);
  for (size_t i = 0; i < num_threads; ++i) {
    std::thread t;
    Status s = StartThread(&t, [p = pool.get()] { p->WorkerLoop(); });
    if (!s.ok()) {
      pool->Shutdown();  // joins the workers already running
      return s.Annotate(pool->name_ + ": worker " + std::to_string(i) + " of " + std::to_string(num_threads));
    }
    // Thread names show up in top/perf; Linux caps them at 15 chars.
    std::string tname = pool->name_.substr(0, 12) + "-" + std::to_string(i);
    pthread_setname_np(t.native_handle(), tname.substr(0, 15).c_str());
    pool->workers_.push_back(std::move(t));  // capacity reserved: cannot throw
  }
  return pool;
}

ThreadPool::~ThreadPool() { Shutdown(); }

Status ThreadPool::Submit(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return FailedPrecondition(name_ + ": thread pool is shut down");
    if (tasks_.size() >= max_queue_) {
      return Unavailable(name_ + ": queue full (" + std::to_string(max_queue_) + " tasks)");
    }
    tasks_.push_back(std::move(task));
  }
  cv_.notify_one();
  return Status();
}

void ThreadPool::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && workers_.empty()) return;
    stopping_ = true;
  }
  cv_.notify_all();
  for (std::thread& t : workers_) {
    if (t.joinable()) t.join();
  }
  workers_.clear();
}

size_t ThreadPool::queue_depth() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tasks_.size();
}

void ThreadPool::WorkerLoop() {
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !tasks_.empty(); });
      if (tasks_.empty()) return;  // stopping and drained
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    // The thread boundary: nothing may escape a worker (std::terminate).
    try {
      task();
    } catch (...) {
      task_exceptions_.fetch_add(1, std::memory_order_relaxed);
      (void)LogOnce(&exception_logged_, StatusFromCurrentException(name_ + ": task threw"));
    }
  }
}

}  // namespace kvtier
