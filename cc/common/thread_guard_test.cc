#include "cc/common/thread_guard.h"

#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

namespace kvtier {
namespace {

TEST(ThreadGuardTest, CallNoThrowTurnsExceptionsIntoInternal) {
  EXPECT_TRUE(CallNoThrow("ok", [] { return Status::Ok(); }).ok());
  EXPECT_EQ(CallNoThrow("plain", [] { return DataLoss("x"); }).code(), StatusCode::kDataLoss);
  Status s = CallNoThrow("filling", []() -> Status { throw std::runtime_error("boom"); });
  EXPECT_EQ(s.code(), StatusCode::kInternal);
  EXPECT_NE(s.message().find("filling"), std::string_view::npos) << s.ToString();
  EXPECT_NE(s.message().find("boom"), std::string_view::npos) << s.ToString();
  s = CallNoThrow("odd", []() -> Status { throw 42; });
  EXPECT_EQ(s.code(), StatusCode::kInternal);
  EXPECT_NE(s.message().find("unknown exception"), std::string_view::npos) << s.ToString();
}

TEST(ThreadGuardTest, LogOnceWritesOnce) {
  std::atomic<bool> logged{false};
  testing::internal::CaptureStderr();
  EXPECT_TRUE(LogOnce(&logged, Internal("first")));
  EXPECT_FALSE(LogOnce(&logged, Internal("second")));
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("first"), std::string::npos) << err;
  EXPECT_EQ(err.find("second"), std::string::npos) << err;
}

TEST(ThreadGuardTest, StartThreadReportsAFailedStart) {
  std::thread t;
  std::atomic<bool> ran{false};
  ASSERT_TRUE(StartThread(&t, [&] { ran.store(true); }).ok());
  t.join();
  EXPECT_TRUE(ran.load());

  thread_guard_internal::FailThreadStarts(/*skip=*/1, /*n=*/1);
  std::thread u;
  ASSERT_TRUE(StartThread(&u, [] {}).ok());  // skipped
  u.join();
  Status s = StartThread(&u, [] {});
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_FALSE(u.joinable());
  ASSERT_TRUE(StartThread(&u, [] {}).ok());  // only one was to fail
  u.join();
}

}  // namespace
}  // namespace kvtier
