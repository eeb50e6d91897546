#include "cc/common/thread_pool.h"

#include <atomic>
#include <chrono>

#include <gtest/gtest.h>

namespace kvtier {
namespace {

TEST(ThreadPoolTest, RunsEveryTaskBeforeShutdownReturns) {
  std::atomic<int> ran{0};
  {
    ThreadPool pool(3, 10000, "test");
    for (int i = 0; i < 5000; ++i) {
      ASSERT_TRUE(pool.Submit([&] { ran.fetch_add(1, std::memory_order_relaxed); }).ok());
    }
  }  // destructor drains
  EXPECT_EQ(ran.load(), 5000);
}

TEST(ThreadPoolTest, FullQueueIsUnavailableNotBlocking) {
  ThreadPool pool(1, 2, "test");
  std::atomic<bool> release{false};
  ASSERT_TRUE(pool.Submit([&] {
    while (!release.load(std::memory_order_acquire)) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }).ok());
  // The worker may or may not have dequeued the blocker yet: fill until refused.
  int accepted = 0;
  Status s;
  for (int i = 0; i < 10; ++i) {
    s = pool.Submit([] {});
    if (!s.ok()) break;
    ++accepted;
  }
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_LE(accepted, 3);
  release.store(true, std::memory_order_release);
  pool.Shutdown();
  EXPECT_EQ(pool.Submit([] {}).code(), StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace kvtier
