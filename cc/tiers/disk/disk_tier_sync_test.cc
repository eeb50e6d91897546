// DiskTierOptions::sync (config key disk_sync): the fdatasyncs are issued
// where each mode says, seen through the IoFaults seam (every fdatasync asks
// it first, IoKind::kSync), never by timing.
//   none:   no sync at all.
//   batch:  one per segment file a PutBatch wrote, after all its writes and
//           before any of its chunks is visible; once per file for Remove
//           and Clear.
//   always: one after every write, each record synced before the next one
//           is written.
// A failed sync fails the records it covered; they are never published.
#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "cc/tiers/disk/disk_format.h"
#include "cc/tiers/disk/disk_test_util.h"
#include "cc/tiers/disk/disk_tier.h"
#include "cc/tiers/disk/io_faults.h"

namespace kvtier {
namespace {

using disk::IoFault;
using disk::IoKind;
using disk::IoRequest;
using disk_test::Buffer;
using disk_test::FingerprintFor;
using disk_test::FreshDir;
using disk_test::KeyFor;
using disk_test::MatchesFor;
using disk_test::MetaFor;

// Records every request; answers with a function the test may set.
class RecordingFaults final : public disk::IoFaults {
 public:
  using Fn = std::function<IoFault(const IoRequest&)>;
  void Set(Fn fn) {
    std::lock_guard<std::mutex> g(mu_);
    fn_ = std::move(fn);
  }
  IoFault Before(const IoRequest& io) override {
    Fn fn;
    {
      std::lock_guard<std::mutex> g(mu_);
      seen_.push_back(io);
      fn = fn_;
    }
    return fn ? fn(io) : IoFault::Run();  // outside mu_: fn may block
  }
  std::vector<IoRequest> Take() {
    std::lock_guard<std::mutex> g(mu_);
    return std::exchange(seen_, {});
  }

 private:
  std::mutex mu_;
  Fn fn_;
  std::vector<IoRequest> seen_;
};

constexpr size_t kSize = 10000;  // a 16 KiB record: 15 fit a 256 KiB segment

struct Rig {
  std::shared_ptr<RecordingFaults> faults = std::make_shared<RecordingFaults>();
  DiskTierOptions o;
  std::unique_ptr<DiskTier> t;
  Rig(const std::string& name, DiskSync sync) {
    o.path = FreshDir(name);
    o.segment_bytes = 256 << 10;
    o.capacity_bytes = o.segment_bytes * 8;
    o.queue_depth = 16;
    o.sync = sync;
    o.io_faults = faults;
    auto opened = DiskTier::Open(o);
    EXPECT_TRUE(opened.ok()) << opened.status().ToString();
    if (opened.ok()) t = std::move(opened).value();
    faults->Take();  // start-up I/O is not what these tests look at
  }
};

std::vector<Status> PutBatchN(DiskTier& t, uint64_t first, size_t n) {
  std::vector<std::unique_ptr<Buffer>> bufs;
  std::vector<ChunkMeta> metas;
  std::vector<std::span<const std::byte>> datas;
  for (size_t k = 0; k < n; ++k) {
    bufs.push_back(std::make_unique<Buffer>(kSize, k % 2 == 0 ? 0 : 8));  // aligned and bounce paths
    disk_test::FillFor(first + k, bufs.back()->span());
    metas.push_back(MetaFor(first + k));
    datas.push_back(bufs.back()->cspan());
  }
  return t.PutBatch(metas, datas);
}

bool Readable(DiskTier& t, uint64_t i) {
  Buffer b(kSize);
  return t.Get(KeyFor(i), FingerprintFor(i), b.span()).ok() && MatchesFor(i, b.cspan());
}

bool IsRecordWrite(const IoRequest& io) { return io.kind == IoKind::kWrite && io.length > disk::kBlock; }

// Only record writes and syncs, in order: "W<seg>" / "S<seg>".
std::vector<std::string> WritesAndSyncs(const std::vector<IoRequest>& seen) {
  std::vector<std::string> out;
  for (const IoRequest& io : seen) {
    if (IsRecordWrite(io)) out.push_back("W" + std::to_string(io.segment));
    if (io.kind == IoKind::kSync) out.push_back("S" + std::to_string(io.segment));
  }
  return out;
}

size_t Syncs(const std::vector<IoRequest>& seen) {
  return static_cast<size_t>(
      std::count_if(seen.begin(), seen.end(), [](const IoRequest& io) { return io.kind == IoKind::kSync; }));
}

TEST(DiskSync, ParsesTheConfigValues) {
  EXPECT_EQ(*ParseDiskSync("none"), DiskSync::kNone);
  EXPECT_EQ(*ParseDiskSync("batch"), DiskSync::kBatch);
  EXPECT_EQ(*ParseDiskSync("always"), DiskSync::kAlways);
  StatusOr<DiskSync> bad = ParseDiskSync("fsync");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("none, batch, always"), std::string::npos) << bad.status().ToString();
  EXPECT_STREQ(DiskSyncName(DiskSync::kBatch), "batch");
  EXPECT_EQ(DiskTierOptions{}.sync, DiskSync::kNone) << "the default stays what it was: no syncs";
}

TEST(DiskSync, NoneNeverSyncs) {
  Rig rig("sync_none", DiskSync::kNone);
  ASSERT_NE(rig.t, nullptr);
  for (const Status& s : PutBatchN(*rig.t, 1, 20)) ASSERT_TRUE(s.ok()) << s.ToString();  // rolls a segment too
  ASSERT_TRUE(rig.t->Remove(KeyFor(3)).ok());
  rig.t->Clear();
  const auto seen = rig.faults->Take();
  EXPECT_GT(std::count_if(seen.begin(), seen.end(), IsRecordWrite), 19);
  EXPECT_EQ(Syncs(seen), 0u);
}

TEST(DiskSync, BatchSyncsEachSegmentFileOnceAfterAllItsWrites) {
  Rig rig("sync_batch", DiskSync::kBatch);
  ASSERT_NE(rig.t, nullptr);
  for (const Status& s : PutBatchN(*rig.t, 1, 4)) ASSERT_TRUE(s.ok()) << s.ToString();
  const uint32_t seg = rig.t->LocationOf(KeyFor(1))->segment;
  EXPECT_EQ(WritesAndSyncs(rig.faults->Take()),
            (std::vector<std::string>{"W" + std::to_string(seg), "W" + std::to_string(seg),
                                      "W" + std::to_string(seg), "W" + std::to_string(seg),
                                      "S" + std::to_string(seg)}));

  // 4 + 14 records do not fit one segment: this batch writes two files and
  // syncs each once, after the last write of the batch.
  for (const Status& s : PutBatchN(*rig.t, 100, 14)) ASSERT_TRUE(s.ok()) << s.ToString();
  std::set<uint32_t> segs;
  for (uint64_t i = 100; i < 114; ++i) segs.insert(rig.t->LocationOf(KeyFor(i))->segment);
  ASSERT_EQ(segs.size(), 2u);
  const auto order = WritesAndSyncs(rig.faults->Take());
  ASSERT_EQ(order.size(), 16u);
  for (size_t k = 0; k < 14; ++k) EXPECT_EQ(order[k][0], 'W') << k;
  EXPECT_EQ((std::set<std::string>{order[14], order[15]}),
            (std::set<std::string>{"S" + std::to_string(*segs.begin()), "S" + std::to_string(*segs.rbegin())}));

  // A single Put is a batch of one; Remove syncs the file it wrote.
  for (const Status& s : PutBatchN(*rig.t, 200, 1)) ASSERT_TRUE(s.ok());
  EXPECT_EQ(Syncs(rig.faults->Take()), 1u);
  ASSERT_TRUE(rig.t->Remove(KeyFor(200)).ok());
  EXPECT_EQ(WritesAndSyncs(rig.faults->Take()).size(), 1u);  // a 4 KiB header write is not a record write
  for (uint64_t i : {1, 2, 3, 4, 100, 113}) EXPECT_TRUE(Readable(*rig.t, i)) << i;
}

// While the batch's sync runs, none of its chunks is visible yet: the sync
// comes before publication, not after.
TEST(DiskSync, BatchPublishesOnlyAfterTheSync) {
  Rig rig("sync_publish", DiskSync::kBatch);
  ASSERT_NE(rig.t, nullptr);
  std::mutex mu;
  std::condition_variable cv;
  enum { kIdle, kSyncing, kChecked } phase = kIdle;
  rig.faults->Set([&](const IoRequest& io) {
    if (io.kind != IoKind::kSync) return IoFault::Run();
    std::unique_lock<std::mutex> l(mu);
    phase = kSyncing;
    cv.notify_all();
    cv.wait(l, [&] { return phase == kChecked; });
    return IoFault::Run();
  });
  std::vector<bool> visible_during_sync;
  std::thread checker([&] {
    std::unique_lock<std::mutex> l(mu);
    cv.wait(l, [&] { return phase == kSyncing; });
    // The tier's lock is not held across I/O, so this thread may ask.
    for (uint64_t i = 1; i <= 4; ++i) visible_during_sync.push_back(rig.t->Contains(KeyFor(i)));
    phase = kChecked;
    cv.notify_all();
  });
  const std::vector<Status> res = PutBatchN(*rig.t, 1, 4);
  checker.join();
  for (const Status& s : res) EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(visible_during_sync, std::vector<bool>(4, false));
  for (uint64_t i = 1; i <= 4; ++i) EXPECT_TRUE(Readable(*rig.t, i)) << i;
}

TEST(DiskSync, AlwaysSyncsAfterEveryWrite) {
  Rig rig("sync_always", DiskSync::kAlways);
  ASSERT_NE(rig.t, nullptr);
  for (const Status& s : PutBatchN(*rig.t, 1, 4)) ASSERT_TRUE(s.ok()) << s.ToString();
  const std::string seg = std::to_string(rig.t->LocationOf(KeyFor(1))->segment);
  // The first S is the new segment's header (a 4 KiB write, not listed).
  EXPECT_EQ(WritesAndSyncs(rig.faults->Take()),
            (std::vector<std::string>{"S" + seg, "W" + seg, "S" + seg, "W" + seg, "S" + seg, "W" + seg, "S" + seg, "W" + seg,
                                      "S" + seg}));
  // Header rewrites too: Remove's dead header is synced.
  ASSERT_TRUE(rig.t->Remove(KeyFor(2)).ok());
  std::vector<IoRequest> seen;
  for (const IoRequest& io : rig.faults->Take()) {
    if (io.kind == IoKind::kWrite || io.kind == IoKind::kSync) seen.push_back(io);
  }
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[0].kind, IoKind::kWrite);
  EXPECT_EQ(seen[1].kind, IoKind::kSync);
  // A batch that rolls: every record (payload, then header block) is synced
  // before the next record is written, and so are the sealing filler and the
  // next segment's header.
  for (const Status& s : PutBatchN(*rig.t, 10, 14)) ASSERT_TRUE(s.ok()) << s.ToString();
  size_t syncs = 0, record_writes = 0;
  bool unsynced = false;
  const auto roll = rig.faults->Take();
  for (const IoRequest& io : roll) {
    if (io.kind == IoKind::kSync) {
      ++syncs;
      unsynced = false;
    } else if (IsRecordWrite(io)) {
      EXPECT_FALSE(unsynced) << "a record was written before the previous one was synced";
      unsynced = true;
      ++record_writes;
    }
  }
  EXPECT_FALSE(unsynced) << "the last record was not synced";
  EXPECT_EQ(record_writes, 14u);
  EXPECT_EQ(syncs, 14u + 2u);  // 14 records, the filler, the segment header
  ASSERT_FALSE(roll.empty());
  EXPECT_EQ(roll.back().kind, IoKind::kSync);
}

TEST(DiskSync, AFailedSyncFailsTheRecordsItCoveredAndPublishesNone) {
  Rig rig("sync_fail", DiskSync::kBatch);
  ASSERT_NE(rig.t, nullptr);
  rig.faults->Set([](const IoRequest& io) { return io.kind == IoKind::kSync ? IoFault::Fail(EIO) : IoFault::Run(); });
  for (const Status& s : PutBatchN(*rig.t, 1, 4)) {
    EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
    EXPECT_NE(s.message().find("fdatasync"), std::string::npos) << s.ToString();
  }
  for (uint64_t i = 1; i <= 4; ++i) EXPECT_FALSE(rig.t->Contains(KeyFor(i))) << i;
  rig.faults->Set(nullptr);
  for (const Status& s : PutBatchN(*rig.t, 1, 4)) EXPECT_TRUE(s.ok()) << s.ToString();
  for (uint64_t i = 1; i <= 4; ++i) EXPECT_TRUE(Readable(*rig.t, i)) << i;
}

}  // namespace
}  // namespace kvtier
