// cpu_affinity: threads kvtier starts run on the union of the process's
// thread affinities, not only on their creator's core.
#include "cc/common/cpu_affinity.h"

#include <gtest/gtest.h>
#include <pthread.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>

#include "cc/common/thread_guard.h"

namespace kvtier {
namespace {

cpu_set_t One(int cpu) {
  cpu_set_t s;
  CPU_ZERO(&s);
  CPU_SET(cpu, &s);
  return s;
}

cpu_set_t Mine() {
  cpu_set_t s;
  CPU_ZERO(&s);
  EXPECT_EQ(pthread_getaffinity_np(pthread_self(), sizeof(s), &s), 0);
  return s;
}

// The calling thread pinned to CPU a and a helper thread to CPU b (as vLLM
// pins its main thread and its OpenMP threads) for the test's lifetime.
class Pinned : public ::testing::Test {
 protected:
  void SetUp() override {
    cpu_set_t all;
    ASSERT_EQ(sched_getaffinity(0, sizeof(all), &all), 0);
    for (int c = 0; c < CPU_SETSIZE && b_ < 0; ++c) {
      if (!CPU_ISSET(c, &all)) continue;
      (a_ < 0 ? a_ : b_) = c;
    }
    if (b_ < 0) GTEST_SKIP() << "needs two CPUs";
    saved_ = Mine();
    cpu_set_t a = One(a_);
    ASSERT_EQ(pthread_setaffinity_np(pthread_self(), sizeof(a), &a), 0);
    helper_ = std::thread([this] {
      cpu_set_t b = One(b_);
      pthread_setaffinity_np(pthread_self(), sizeof(b), &b);
      std::unique_lock<std::mutex> lock(mu_);
      pinned_ = true;
      cv_.notify_all();
      cv_.wait(lock, [&] { return done_; });
    });
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return pinned_; });
  }
  void TearDown() override {
    if (helper_.joinable()) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        done_ = true;
      }
      cv_.notify_all();
      helper_.join();
      pthread_setaffinity_np(pthread_self(), sizeof(saved_), &saved_);
    }
    unsetenv("KVTIER_THREAD_AFFINITY");
  }
  cpu_set_t Started() {
    cpu_set_t got;
    CPU_ZERO(&got);
    std::thread t;
    EXPECT_TRUE(StartThread(&t, [&] { got = Mine(); }).ok());
    t.join();
    return got;
  }

  int a_ = -1, b_ = -1;
  cpu_set_t saved_;
  std::thread helper_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool pinned_ = false, done_ = false;
};

TEST_F(Pinned, ProcessCpuSetIsTheUnionOfTheThreads) {
  cpu_set_t s;
  ASSERT_TRUE(ProcessCpuSet(&s));
  EXPECT_TRUE(CPU_ISSET(a_, &s));
  EXPECT_TRUE(CPU_ISSET(b_, &s));
}

TEST_F(Pinned, StartThreadRunsOnTheProcessCpusNotTheCreatorsCore) {
  const cpu_set_t got = Started();
  EXPECT_TRUE(CPU_ISSET(a_, &got));
  EXPECT_TRUE(CPU_ISSET(b_, &got));
  const cpu_set_t a = One(a_);
  const cpu_set_t still = Mine();
  EXPECT_TRUE(CPU_EQUAL(&still, &a)) << "the creator's own affinity must not change";
}

TEST_F(Pinned, ScopedProcessCpusWidensForTheScopeAndRestores) {
  cpu_set_t inside, child;
  CPU_ZERO(&child);
  {
    ScopedProcessCpus wide;
    inside = Mine();
    std::thread t([&] { child = Mine(); });  // a thread kvtier does not start
    t.join();
  }
  EXPECT_TRUE(CPU_ISSET(a_, &inside) && CPU_ISSET(b_, &inside));
  EXPECT_TRUE(CPU_ISSET(a_, &child) && CPU_ISSET(b_, &child));
  const cpu_set_t a = One(a_);
  const cpu_set_t after = Mine();
  EXPECT_TRUE(CPU_EQUAL(&after, &a));
}

TEST_F(Pinned, InheritTurnsItOff) {
  setenv("KVTIER_THREAD_AFFINITY", "inherit", 1);
  cpu_set_t s;
  EXPECT_FALSE(ProcessCpuSet(&s));
  const cpu_set_t got = Started();
  const cpu_set_t a = One(a_);
  EXPECT_TRUE(CPU_EQUAL(&got, &a));
  {
    ScopedProcessCpus wide;  // a no-op
    const cpu_set_t inside = Mine();
    EXPECT_TRUE(CPU_EQUAL(&inside, &a));
  }
}

TEST_F(Pinned, UnknownValueMeansTheDefault) {
  for (const char* v : {"process", "", "inherrit"}) {
    SCOPED_TRACE(v);
    setenv("KVTIER_THREAD_AFFINITY", v, 1);
    cpu_set_t s;
    ASSERT_TRUE(ProcessCpuSet(&s));
    EXPECT_TRUE(CPU_ISSET(a_, &s) && CPU_ISSET(b_, &s));
    const cpu_set_t got = Started();
    EXPECT_TRUE(CPU_ISSET(a_, &got) && CPU_ISSET(b_, &got));
  }
}

}  // namespace
}  // namespace kvtier
