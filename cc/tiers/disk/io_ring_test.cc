#include "cc/tiers/disk/io_ring.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cc/tiers/disk/disk_test_util.h"

namespace kvtier::disk {
namespace {

std::string TmpFile(const char* name) {
  const char* base = std::getenv("TEST_TMPDIR");
  return std::string(base != nullptr ? base : "/var/tmp") + "/" + name + std::to_string(getpid());
}

struct Aligned {
  std::byte* p;
  explicit Aligned(size_t n) : p(static_cast<std::byte*>(std::aligned_alloc(4096, n))) {}
  ~Aligned() { std::free(p); }
};

TEST(IoRing, ManyOpsThroughASmallQueueWithCallbacksOncePerOp) {
  auto ring = IoRing::Create(4);
  ASSERT_TRUE(ring.ok()) << ring.status().ToString();
  const std::string path = TmpFile("ioring_many");
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0644);
  ASSERT_GE(fd, 0);
  constexpr int kOps = 37;  // > queue depth: several submission waves
  Aligned buf(kOps * 8192);
  std::vector<IoOp> ops(kOps);
  std::vector<int> prepared(kOps, 0), done(kOps, 0);
  for (int i = 0; i < kOps; ++i) {
    // Two iovecs per op: writev path.
    ops[i] = IoOp{IoOp::Kind::kWrite, fd, static_cast<uint64_t>(i) * 8192,
                  {{buf.p + i * 8192, 4096}, {buf.p + i * 8192 + 4096, 4096}}, 2};
  }
  (*ring)->Run(
      ops,
      [&](size_t i) {
        ++prepared[i];
        EXPECT_EQ(done[i], 0);
        std::memset(buf.p + i * 8192, static_cast<int>(i + 1), 8192);  // filled just in time
      },
      [&](size_t i) { ++done[i]; });
  for (int i = 0; i < kOps; ++i) {
    EXPECT_EQ(ops[i].result, 0) << i;
    EXPECT_EQ(prepared[i], 1);
    EXPECT_EQ(done[i], 1);
  }
  Aligned back(kOps * 8192);
  std::vector<IoOp> reads(kOps);
  for (int i = 0; i < kOps; ++i) {
    reads[i] = IoOp{IoOp::Kind::kRead, fd, static_cast<uint64_t>(i) * 8192, {{back.p + i * 8192, 8192}}, 1};
  }
  (*ring)->Run(reads);
  for (int i = 0; i < kOps; ++i) {
    ASSERT_EQ(reads[i].result, 0);
    EXPECT_EQ(back.p[i * 8192 + 100], static_cast<std::byte>(i + 1));
  }
  close(fd);
  unlink(path.c_str());
}

TEST(IoRing, ErrorsArePerOp) {
  auto ring = IoRing::Create(8);
  ASSERT_TRUE(ring.ok());
  const std::string path = TmpFile("ioring_err");
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0644);
  ASSERT_GE(fd, 0);
  Aligned buf(3 * 4096);
  std::memset(buf.p, 1, 3 * 4096);
  std::vector<IoOp> ops = {
      IoOp{IoOp::Kind::kWrite, fd, 0, {{buf.p, 4096}}, 1},
      IoOp{IoOp::Kind::kRead, fd, 1 << 20, {{buf.p + 4096, 4096}}, 1},   // past end of file
      IoOp{IoOp::Kind::kWrite, -1, 0, {{buf.p + 8192, 4096}}, 1},        // bad fd
      IoOp{IoOp::Kind::kWrite, fd, 4096, {{buf.p + 8192 + 1, 4096}}, 1},  // misaligned for O_DIRECT
  };
  (*ring)->Run(ops);
  EXPECT_EQ(ops[0].result, 0);
  EXPECT_EQ(ops[1].result, -ENODATA);
  EXPECT_EQ(ops[2].result, -EBADF);
  EXPECT_EQ(ops[3].result, -EINVAL);
  close(fd);
  unlink(path.c_str());
  EXPECT_EQ(IoRing::Create(0).status().code(), StatusCode::kInvalidArgument);
}

TEST(IoRing, FixedBufferLookup) {
  auto ring = IoRing::Create(4);
  ASSERT_TRUE(ring.ok());
  Aligned region(1 << 20);
  ASSERT_TRUE((*ring)->RegisterRegion({region.p, 1 << 20}).ok());
  EXPECT_EQ((*ring)->FixedIndexFor(region.p, 4096), 0);
  EXPECT_EQ((*ring)->FixedIndexFor(region.p + (1 << 20) - 4096, 4096), 0);
  EXPECT_EQ((*ring)->FixedIndexFor(region.p + (1 << 20) - 4096, 8192), -1) << "runs past the region";
  int x;
  EXPECT_EQ((*ring)->FixedIndexFor(&x, 4), -1);
}

// Issue 14 item 7: when a submit fails, Run tears the ring down and builds
// it again; a failed rebuild used to be ignored, and the next Run wrote SQEs
// into unmapped rings (SIGSEGV). Now the ring says it is broken and every
// later Run fails its ops without touching the rings.
TEST(IoRing, AFailedRebuildBreaksTheRingForGood) {
  const std::string path = TmpFile("ioring_broken");
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto ring = IoRing::Create(4);
    const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0644);
    if (!ring.ok() || fd < 0) _exit(2);
    Aligned buf(4096);
    std::memset(buf.p, 7, 4096);
    std::vector<IoOp> ops = {IoOp{IoOp::Kind::kWrite, fd, 0, {{buf.p, 4096}}, 1}};
    (*ring)->Run(ops);
    if (ops[0].result != 0 || !(*ring)->status().ok()) _exit(3);
    // From here io_uring_enter (submit) and io_uring_setup (the rebuild) fail.
    if (!disk_test::ForbidSyscalls({__NR_io_uring_setup, __NR_io_uring_enter})) _exit(77);
    (*ring)->Run(ops);
    if (ops[0].result != -EPERM) _exit(4);
    const Status& st = (*ring)->status();
    if (st.code() != StatusCode::kIoError || st.message().find("io_uring_queue_init") == std::string_view::npos) _exit(5);
    int done = 0;
    (*ring)->Run(ops, nullptr, [&](size_t) { ++done; });
    if (ops[0].result != -EBADFD || done != 1) _exit(6);
    if ((*ring)->RegisterRegion({buf.p, 4096}).ok()) _exit(7);
    ring = Status(StatusCode::kInternal, "destroyed");  // the destructor must not exit the ring twice
    close(fd);
    _exit(0);
  }
  const int rc = disk_test::WaitExit(pid);
  unlink(path.c_str());
  if (rc == 77) GTEST_SKIP() << "seccomp filters unavailable";
  EXPECT_EQ(rc, 0) << "2: setup, 3: first run, 4: submit error not reported, 5: status, 6: broken ring reused, "
                      "7: register on a broken ring; 139: SIGSEGV";
}

TEST(IoRing, CreateReportsAForbiddenIoUring) {
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    if (!disk_test::ForbidSyscalls({__NR_io_uring_setup})) _exit(77);
    auto ring = IoRing::Create(4);
    if (ring.ok()) _exit(2);
    if (ring.status().code() != StatusCode::kIoError) _exit(3);
    if (ring.status().message().find("Operation not permitted") == std::string_view::npos) _exit(4);
    _exit(0);
  }
  const int rc = disk_test::WaitExit(pid);
  if (rc == 77) GTEST_SKIP() << "seccomp filters unavailable";
  EXPECT_EQ(rc, 0);
}

}  // namespace
}  // namespace kvtier::disk
