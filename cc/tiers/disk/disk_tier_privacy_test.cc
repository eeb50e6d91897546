// Privacy and file-safety of the disk tier (issue 13): the KV on disk can be
// turned back into the prompts it encodes, so its files are 0600 and its
// directories 0700 whatever the umask, a directory others could read or
// plant files in is refused, and a symbolic link (or another user's file)
// planted under one of the tier's names is never read or written through.
// The ownership cases chown to uid 65534 and skip where that is not allowed
// (not root, or a user namespace that maps no other uid).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "cc/tiers/disk/disk_test_util.h"
#include "cc/tiers/disk/disk_tier.h"

namespace kvtier {
namespace {

using disk_test::Buffer;
using disk_test::FreshDir;
using disk_test::MetaFor;

constexpr uint64_t kSeg = 256 << 10;
constexpr uid_t kNobody = 65534;

DiskTierOptions Options(const std::string& dir, uint64_t nseg = 4) {
  DiskTierOptions o;
  o.path = dir;
  o.segment_bytes = kSeg;
  o.capacity_bytes = kSeg * nseg;
  o.queue_depth = 8;
  return o;
}

Status PutN(DiskTier& t, uint64_t i, size_t size = 100000) {
  Buffer b(size);
  disk_test::FillFor(i, b.span());
  return t.Put(MetaFor(i), b.cspan());
}

unsigned ModeOf(const std::string& p) {
  struct stat st;
  EXPECT_EQ(lstat(p.c_str(), &st), 0) << p;
  return st.st_mode & 07777;
}

bool Has(std::string_view s, std::string_view part) { return s.find(part) != std::string_view::npos; }

std::string ReadAll(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// A file outside the tier's directory that a planted link points to.
std::string Victim(const std::string& base) {
  const std::string p = base + "/victim";
  std::ofstream(p) << "precious, not the tier's\n";
  return p;
}

class UmaskScope {
 public:
  explicit UmaskScope(mode_t m) : old_(umask(m)) {}
  ~UmaskScope() { umask(old_); }

 private:
  mode_t old_;
};

class DiskTierPrivacy : public ::testing::TestWithParam<mode_t> {};

TEST_P(DiskTierPrivacy, FilesAre0600AndDirectories0700WhateverTheUmask) {
  const std::string base = FreshDir("umask" + std::to_string(GetParam()));
  const std::string parent = base + "/new", dir = parent + "/tier";
  UmaskScope scope(GetParam());
  {
    auto t = DiskTier::Open(Options(dir));
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    for (uint64_t i = 0; i < 4; ++i) ASSERT_TRUE(PutN(**t, i).ok());  // 2 records a segment: 2 segment files
  }
  EXPECT_EQ(ModeOf(parent), 0700u) << "a parent the tier created";
  EXPECT_EQ(ModeOf(dir), 0700u);
  EXPECT_EQ(ModeOf(dir + "/LOCK"), 0600u);
  int segments = 0;
  for (const auto& de : std::filesystem::directory_iterator(dir)) {
    if (de.path().filename() == "LOCK") continue;
    ++segments;
    EXPECT_EQ(ModeOf(de.path()), 0600u) << de.path();
  }
  EXPECT_GE(segments, 2);
}

INSTANTIATE_TEST_SUITE_P(Umask, DiskTierPrivacy, ::testing::Values(mode_t{0000}, mode_t{0022}));

TEST(DiskTierPrivacyFiles, FilesOfAnEarlierVersionMade0644AreTightenedAtOpen) {
  const std::string dir = FreshDir("tighten");
  {
    auto t = DiskTier::Open(Options(dir));
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    ASSERT_TRUE(PutN(**t, 1).ok());
  }
  for (const auto& de : std::filesystem::directory_iterator(dir)) ASSERT_EQ(chmod(de.path().c_str(), 0644), 0);
  auto t = DiskTier::Open(Options(dir));
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  for (const auto& de : std::filesystem::directory_iterator(dir)) EXPECT_EQ(ModeOf(de.path()), 0600u) << de.path();
  EXPECT_EQ((*t)->Stats().entries, 1u) << "the data is kept";
}

TEST(DiskTierPrivacyDirectory, WorldWritableWithoutStickyBitIsRefused) {
  const std::string dir = FreshDir("worldw");
  ASSERT_EQ(chmod(dir.c_str(), 0777), 0);
  auto r = DiskTier::Open(Options(dir));
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Has(r.status().message(), dir) && Has(r.status().message(), "world-writable without the sticky bit") &&
              Has(r.status().message(), "0777"))
      << r.status().ToString();
  EXPECT_FALSE(std::filesystem::exists(dir + "/LOCK")) << "nothing is created in a refused directory";

  ASSERT_EQ(chmod(dir.c_str(), 01777), 0);  // like /tmp: others cannot replace our files
  auto t = DiskTier::Open(Options(dir));
  EXPECT_TRUE(t.ok()) << t.status().ToString();
}

TEST(DiskTierPrivacyDirectory, DirectoryOwnedByAnotherUserIsRefused) {
  const std::string dir = FreshDir("otheruser");
  if (chown(dir.c_str(), kNobody, kNobody) != 0) GTEST_SKIP() << "cannot chown to uid 65534 here: " << strerror(errno);
  auto r = DiskTier::Open(Options(dir));
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Has(r.status().message(), dir) && Has(r.status().message(), "owned by uid 65534"))
      << r.status().ToString();
  EXPECT_FALSE(std::filesystem::exists(dir + "/LOCK"));
}

TEST(DiskTierPrivacyDirectory, SymlinkedDirectoryIsRefused) {
  const std::string base = FreshDir("dirlink");
  ASSERT_TRUE(std::filesystem::create_directory(base + "/real"));
  std::filesystem::create_directory_symlink(base + "/real", base + "/link");
  auto r = DiskTier::Open(Options(base + "/link"));
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Has(r.status().message(), "is a symbolic link") && Has(r.status().message(), base + "/real"))
      << r.status().ToString();
  EXPECT_TRUE(std::filesystem::is_empty(base + "/real"));
}

TEST(DiskTierPrivacyPlanted, LockSymlinkIsNotFollowed) {
  const std::string base = FreshDir("locklink");
  const std::string dir = base + "/tier", victim = Victim(base);
  const std::string before = ReadAll(victim);
  ASSERT_TRUE(std::filesystem::create_directory(dir));
  std::filesystem::create_symlink(victim, dir + "/LOCK");
  auto r = DiskTier::Open(Options(dir));
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Has(r.status().message(), dir + "/LOCK") && Has(r.status().message(), "is a symbolic link"))
      << r.status().ToString();
  EXPECT_EQ(ReadAll(victim), before) << "the link's target was written (pid over its contents)";
  EXPECT_EQ(ModeOf(victim), 0644u) << "the link's target was chmod'ed";
}

TEST(DiskTierPrivacyPlanted, SegmentSymlinkAtOpenIsRefused) {
  const std::string base = FreshDir("seglinkopen");
  const std::string dir = base + "/tier", victim = Victim(base);
  const std::string before = ReadAll(victim);
  {
    auto t = DiskTier::Open(Options(dir));
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    ASSERT_TRUE(PutN(**t, 1).ok());  // seg_00000.kvt exists, seg_00001.kvt does not
  }
  std::filesystem::create_symlink(victim, dir + "/seg_00001.kvt");
  auto r = DiskTier::Open(Options(dir));
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Has(r.status().message(), dir + "/seg_00001.kvt") && Has(r.status().message(), "is a symbolic link"))
      << r.status().ToString();
  EXPECT_EQ(ReadAll(victim), before);

  // Once the link is gone the tier opens with its data.
  ASSERT_EQ(unlink((dir + "/seg_00001.kvt").c_str()), 0);
  auto t = DiskTier::Open(Options(dir));
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ((*t)->Stats().entries, 1u);
}

TEST(DiskTierPrivacyPlanted, SegmentSymlinkPlantedWhileOpenIsNotWritten) {
  const std::string base = FreshDir("seglinklive");
  const std::string dir = base + "/tier", victim = Victim(base);
  const std::string before = ReadAll(victim);
  auto t = DiskTier::Open(Options(dir));
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_TRUE(PutN(**t, 1).ok());  // segment 0 open, 2 records fit
  std::filesystem::create_symlink(victim, dir + "/seg_00001.kvt");
  ASSERT_TRUE(PutN(**t, 2).ok());
  // The third record rolls to segment 1, whose name is now the link.
  const Status s = PutN(**t, 3);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Has(s.message(), dir + "/seg_00001.kvt") && Has(s.message(), "is a symbolic link")) << s.ToString();
  EXPECT_EQ(ReadAll(victim), before) << "the tier wrote through a planted link";
  EXPECT_TRUE(std::filesystem::is_symlink(dir + "/seg_00001.kvt"));
  Buffer b(100000);
  EXPECT_TRUE((*t)->Get(MetaFor(1).key, MetaFor(1).fingerprint, b.span()).ok()) << "earlier chunks are still served";
}

TEST(DiskTierPrivacyPlanted, SegmentFileOfAnotherUserIsRefused) {
  const std::string dir = FreshDir("segother");
  {
    auto t = DiskTier::Open(Options(dir));
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    ASSERT_TRUE(PutN(**t, 1).ok());
  }
  const std::string seg = dir + "/seg_00000.kvt";
  if (chown(seg.c_str(), kNobody, kNobody) != 0) GTEST_SKIP() << "cannot chown to uid 65534 here: " << strerror(errno);
  auto r = DiskTier::Open(Options(dir));
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Has(r.status().message(), seg) && Has(r.status().message(), "owned by uid 65534"))
      << r.status().ToString();
}

// Item "a disk capacity larger than the file system's free space is warned
// about at start": a log line, not an error.
TEST(DiskTierPrivacyDirectory, CapacityAboveFreeSpaceIsWarnedAboutAtOpen) {
  const std::string dir = FreshDir("bigcap");
  struct statvfs vfs;
  ASSERT_EQ(statvfs(dir.c_str(), &vfs), 0);
  const uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
  DiskTierOptions o = Options(dir);
  o.segment_bytes = 1ull << 30;
  o.capacity_bytes = (free_bytes / o.segment_bytes + 4) * o.segment_bytes;
  ::testing::internal::CaptureStderr();
  auto t = DiskTier::Open(o);
  const std::string err = ::testing::internal::GetCapturedStderr();
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_TRUE(Has(err, "warning: " + dir + " has room for")) << err;

  o.capacity_bytes = 2 * o.segment_bytes;
  t = StatusOr<std::unique_ptr<DiskTier>>(InvalidArgument("closed"));  // releases the directory
  ::testing::internal::CaptureStderr();
  if (free_bytes >= o.capacity_bytes) {
    t = DiskTier::Open(o);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
  }
  EXPECT_FALSE(Has(::testing::internal::GetCapturedStderr(), "has room for"));
}

}  // namespace
}  // namespace kvtier
