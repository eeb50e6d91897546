#include "cc/common/thread_pool.h"

#include <atomic>
#include <chrono>
#include <stdexcept>

#include <gtest/gtest.h>

#include "cc/common/thread_guard.h"

namespace kvtier {
namespace {

std::unique_ptr<ThreadPool> Make(size_t threads, size_t queue) {
  auto p = ThreadPool::Create(threads, queue, "test");
  EXPECT_TRUE(p.ok()) << p.status().ToString();
  return std::move(p).value();
}

TEST(ThreadPoolTest, RunsEveryTaskBeforeShutdownReturns) {
  std::atomic<int> ran{0};
  {
    auto pool = Make(3, 10000);
    EXPECT_EQ(pool->num_threads(), 3u);
    for (int i = 0; i < 5000; ++i) {
      ASSERT_TRUE(pool->Submit([&] { ran.fetch_add(1, std::memory_order_relaxed); }).ok());
    }
  }  // destructor drains
  EXPECT_EQ(ran.load(), 5000);
}

TEST(ThreadPoolTest, FullQueueIsUnavailableNotBlocking) {
  auto pool = Make(1, 2);
  std::atomic<bool> release{false};
  ASSERT_TRUE(pool->Submit([&] {
    while (!release.load(std::memory_order_acquire)) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }).ok());
  // The worker may or may not have dequeued the blocker yet: fill until refused.
  int accepted = 0;
  Status s;
  for (int i = 0; i < 10; ++i) {
    s = pool->Submit([] {});
    if (!s.ok()) break;
    ++accepted;
  }
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_LE(accepted, 3);
  release.store(true, std::memory_order_release);
  pool->Shutdown();
  EXPECT_EQ(pool->Submit([] {}).code(), StatusCode::kFailedPrecondition);
}

// Issue 14 item 7: a throwing task used to reach std::terminate.
TEST(ThreadPoolTest, AThrowingTaskIsCountedAndTheWorkerGoesOn) {
  auto pool = Make(1, 100);
  std::atomic<int> ran{0};
  ASSERT_TRUE(pool->Submit([] { throw std::runtime_error("task failed"); }).ok());
  ASSERT_TRUE(pool->Submit([] { throw 7; }).ok());
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(pool->Submit([&] { ran.fetch_add(1); }).ok());
  pool->Shutdown();  // drains: the one worker ran everything after the throws
  EXPECT_EQ(ran.load(), 10);
  EXPECT_EQ(pool->task_exceptions(), 2u);
}

TEST(ThreadPoolTest, AFailedThreadStartFailsCreateCleanly) {
  // The third worker cannot start: the two running ones must be stopped and
  // joined, not destroyed joinable (std::terminate).
  thread_guard_internal::FailThreadStarts(/*skip=*/2, /*n=*/1);
  auto p = ThreadPool::Create(3, 10, "test");
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(p.status().message().find("worker 2 of 3"), std::string_view::npos) << p.status().ToString();
  EXPECT_EQ(Make(3, 10)->num_threads(), 3u);  // the injection is used up
}

}  // namespace
}  // namespace kvtier
