#include "cc/common/status.h"

#include <cerrno>

#include <gtest/gtest.h>

namespace kvtier {
namespace {

TEST(StatusTest, OkCarriesNoMessage) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kOk);
  EXPECT_EQ(s.ToString(), "OK");
}

TEST(StatusTest, ErrorKeepsCodeAndMessage) {
  Status s = InvalidArgument("chunk_size must be > 0");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.ToString(), "INVALID_ARGUMENT: chunk_size must be > 0");
  EXPECT_EQ(s.Annotate("config").ToString(), "INVALID_ARGUMENT: config: chunk_size must be > 0");
}

TEST(StatusTest, ErrnoMapsDiskFullToResourceExhausted) {
  EXPECT_EQ(ErrnoError("pwrite", ENOSPC).code(), StatusCode::kResourceExhausted);
  Status io = ErrnoError("open /x", ENOENT);
  EXPECT_EQ(io.code(), StatusCode::kIoError);
  EXPECT_NE(io.message().find("open /x"), std::string_view::npos);
}

StatusOr<int> Half(int x) {
  if (x % 2) return InvalidArgument("odd");
  return x / 2;
}

Status UseHalf(int x, int* out) {
  KVT_ASSIGN_OR_RETURN(*out, Half(x));
  return Status();
}

TEST(StatusOrTest, ValueAndErrorPropagate) {
  int out = 0;
  EXPECT_TRUE(UseHalf(8, &out).ok());
  EXPECT_EQ(out, 4);
  EXPECT_EQ(UseHalf(3, &out).code(), StatusCode::kInvalidArgument);
  StatusOr<int> bad = Status();
  EXPECT_EQ(bad.status().code(), StatusCode::kInternal);
}

}  // namespace
}  // namespace kvtier
