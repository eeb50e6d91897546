// Injected I/O faults (DiskTierOptions::io_faults, io_faults.h): what the
// disk tier does when reads or writes fail, the disk fills in the middle of a
// batch, transfers come back short, io_uring_submit or a ring fails, the
// directory is read-only, or writes never reach the medium. None of it needs
// privilege or a broken disk, so CI runs all of it.
//
// Each fault must give a clear Status, lose nothing acknowledged before it,
// and leave the tier serving what it holds.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mount.h>
#include <unistd.h>

#include <cerrno>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
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

// Faults decided by a function the test sets (and swaps) at any time;
// remembers every request it was asked about.
class ScriptedFaults final : public disk::IoFaults {
 public:
  using Fn = std::function<IoFault(const IoRequest&)>;
  void Set(Fn fn) {
    std::lock_guard<std::mutex> g(mu_);
    fn_ = std::move(fn);
  }
  IoFault Before(const IoRequest& io) override {
    std::lock_guard<std::mutex> g(mu_);
    seen_.push_back(io);
    return fn_ ? fn_(io) : IoFault::Run();
  }
  std::vector<IoRequest> TakeSeen() {
    std::lock_guard<std::mutex> g(mu_);
    return std::exchange(seen_, {});
  }

 private:
  std::mutex mu_;
  Fn fn_;
  std::vector<IoRequest> seen_;
};

// A record write (not a 4096-byte header rewrite).
bool IsRecordWrite(const IoRequest& io) { return io.kind == IoKind::kWrite && io.length > disk::kBlock; }

struct Rig {
  std::shared_ptr<ScriptedFaults> faults = std::make_shared<ScriptedFaults>();
  DiskTierOptions o;
  explicit Rig(const std::string& name, uint64_t segment = 256 << 10, uint64_t nseg = 8) {
    o.path = FreshDir(name);
    o.segment_bytes = segment;
    o.capacity_bytes = segment * nseg;
    o.queue_depth = 16;
    o.io_faults = faults;
  }
  std::unique_ptr<DiskTier> Open() {
    auto t = DiskTier::Open(o);
    EXPECT_TRUE(t.ok()) << t.status().ToString();
    return t.ok() ? std::move(t).value() : nullptr;
  }
};

Status PutN(DiskTier& t, uint64_t i, size_t size, size_t misalign = 0) {
  Buffer b(size, misalign);
  disk_test::FillFor(i, b.span());
  return t.Put(MetaFor(i), b.cspan());
}

// kOk only with exactly FillFor(i, size).
Status CheckN(DiskTier& t, uint64_t i, size_t size, size_t misalign = 0) {
  Buffer b(size, misalign);
  Status s = t.Get(KeyFor(i), FingerprintFor(i), b.span());
  if (s.ok() && !MatchesFor(i, b.cspan())) return Internal("wrong bytes served for chunk " + std::to_string(i));
  return s;
}

std::vector<Status> PutBatchN(DiskTier& t, uint64_t first, size_t n, size_t size) {
  std::vector<std::unique_ptr<Buffer>> bufs;
  std::vector<ChunkMeta> metas;
  std::vector<std::span<const std::byte>> datas;
  for (size_t k = 0; k < n; ++k) {
    bufs.push_back(std::make_unique<Buffer>(size, k % 2 == 0 ? 0 : 8));  // aligned and bounce paths
    disk_test::FillFor(first + k, bufs.back()->span());
    metas.push_back(MetaFor(first + k));
    datas.push_back(bufs.back()->cspan());
  }
  return t.PutBatch(metas, datas);
}

bool Has(std::string_view msg, std::string_view what) { return msg.find(what) != std::string_view::npos; }

constexpr size_t kSize = 10000;

TEST(DiskTierIoFault, ReadEioIsAnIoErrorAndTheChunkStays) {
  Rig rig("eio_read");
  auto t = rig.Open();
  ASSERT_NE(t, nullptr);
  for (uint64_t i = 1; i <= 4; ++i) ASSERT_TRUE(PutN(*t, i, kSize).ok());
  const DiskLocation loc = t->LocationOf(KeyFor(2)).value();
  rig.faults->Set([&](const IoRequest& io) {
    const bool hits = io.kind == IoKind::kRead && io.segment == loc.segment && io.offset < loc.offset + loc.record_bytes &&
                      io.offset + io.length > loc.offset;
    return hits ? IoFault::Fail(EIO) : IoFault::Run();
  });
  Status s = CheckN(*t, 2, kSize);
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  EXPECT_TRUE(Has(s.message(), "Input/output error") && Has(s.message(), loc.file)) << s.ToString();
  EXPECT_TRUE(t->Contains(KeyFor(2))) << "an I/O error is not proof of bad data: the chunk stays";
  EXPECT_EQ(t->batch_counters().checksum_failures, 0u);
  EXPECT_EQ(t->Stats().errors, 1u);
  for (uint64_t i : {1, 3, 4}) EXPECT_TRUE(CheckN(*t, i, kSize).ok()) << i;
  rig.faults->Set(nullptr);  // the device recovers
  EXPECT_TRUE(CheckN(*t, 2, kSize).ok());
}

TEST(DiskTierIoFault, WriteEioFailsThatChunkOnly) {
  Rig rig("eio_write");
  {
    auto t = rig.Open();
    ASSERT_NE(t, nullptr);
    ASSERT_TRUE(PutN(*t, 1, kSize).ok());
    int writes = 0;
    rig.faults->Set([&](const IoRequest& io) {
      return IsRecordWrite(io) && writes++ == 0 ? IoFault::Fail(EIO) : IoFault::Run();
    });
    std::vector<Status> r = PutBatchN(*t, 10, 4, kSize);
    EXPECT_EQ(r[0].code(), StatusCode::kIoError) << r[0].ToString();
    EXPECT_TRUE(Has(r[0].message(), "Input/output error")) << r[0].ToString();
    for (int k = 1; k < 4; ++k) EXPECT_TRUE(r[k].ok()) << k << ": " << r[k].ToString();
    EXPECT_FALSE(t->Contains(KeyFor(10))) << "a failed write is never visible";
    EXPECT_TRUE(CheckN(*t, 1, kSize).ok());
    EXPECT_TRUE(PutN(*t, 10, kSize).ok()) << "a retry may succeed";
  }
  rig.faults->Set(nullptr);
  auto t = rig.Open();  // the failed write left a hole: the scan steps over it
  ASSERT_NE(t, nullptr);
  for (uint64_t i : {1, 10, 11, 12, 13}) EXPECT_TRUE(CheckN(*t, i, kSize).ok()) << i;
  EXPECT_EQ(t->rebuild_stats().chunks, 5u);
}

// Issue 13 (disk write speed): a record's payload is queued before its
// header block, whose CRC of the payload is then computed while the payload
// is being written (a single Put used to checksum first, then write).
TEST(DiskTierIoFault, PayloadIsWrittenBeforeItsHeaderBlock) {
  Rig rig("payload_first", 4 << 20);
  auto t = rig.Open();
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(PutN(*t, 1, kSize).ok());  // creates the segment
  rig.faults->TakeSeen();
  constexpr size_t kBig = (1 << 20) + 100;  // aligned body and a sub-block tail
  ASSERT_TRUE(PutN(*t, 2, kBig).ok());
  const DiskLocation loc = *t->LocationOf(KeyFor(2));
  std::vector<IoRequest> writes;
  for (const IoRequest& io : rig.faults->TakeSeen()) {
    if (io.kind == IoKind::kWrite) writes.push_back(io);
  }
  ASSERT_EQ(writes.size(), 2u);
  EXPECT_EQ(writes[0].offset, loc.offset + disk::kBlock);
  EXPECT_EQ(writes[0].length, loc.record_bytes - disk::kBlock);
  EXPECT_EQ(writes[1].offset, loc.offset);
  EXPECT_EQ(writes[1].length, disk::kBlock);
  EXPECT_TRUE(CheckN(*t, 2, kBig).ok());
}

// With the header written separately, a payload write that fails while its
// header lands would leave a valid header over a missing payload; the tier
// marks it dead, so a restart does not list it (it would fail its CRC at the
// first Get).
TEST(DiskTierIoFault, AFailedPayloadUnderAWrittenHeaderIsNotFoundAtRestart) {
  Rig rig("payload_eio");
  {
    auto t = rig.Open();
    ASSERT_NE(t, nullptr);
    ASSERT_TRUE(PutN(*t, 1, kSize).ok());
    rig.faults->Set([](const IoRequest& io) { return IsRecordWrite(io) ? IoFault::Fail(EIO) : IoFault::Run(); });
    EXPECT_EQ(PutN(*t, 2, kSize).code(), StatusCode::kIoError);
    rig.faults->Set(nullptr);
  }
  auto t = rig.Open();
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->rebuild_stats().chunks, 1u);
  EXPECT_EQ(t->rebuild_stats().corrupt_records, 0u);
  EXPECT_FALSE(t->Contains(KeyFor(2)));
  EXPECT_TRUE(CheckN(*t, 1, kSize).ok());
  EXPECT_EQ(t->batch_counters().checksum_failures, 0u);
}

TEST(DiskTierIoFault, EnospcInTheMiddleOfABatch) {
  Rig rig("enospc_batch");
  {
    auto t = rig.Open();
    ASSERT_NE(t, nullptr);
    ASSERT_TRUE(PutN(*t, 1, kSize).ok());
    int writes = 0;
    rig.faults->Set([&](const IoRequest& io) {
      return IsRecordWrite(io) && writes++ == 3 ? IoFault::Fail(ENOSPC) : IoFault::Run();
    });
    std::vector<Status> r = PutBatchN(*t, 10, 8, kSize);
    for (int k = 0; k < 8; ++k) {
      if (k == 3) {
        EXPECT_EQ(r[k].code(), StatusCode::kResourceExhausted) << r[k].ToString();
        EXPECT_TRUE(Has(r[k].message(), "ENOSPC")) << r[k].ToString();
      } else {
        EXPECT_TRUE(r[k].ok()) << k << ": " << r[k].ToString();
      }
    }
    EXPECT_EQ(t->batch_counters().enospc, 1u);
    EXPECT_FALSE(t->Contains(KeyFor(13)));
    for (uint64_t i : {1, 10, 11, 12, 14, 15, 16, 17}) EXPECT_TRUE(CheckN(*t, i, kSize).ok()) << i;
  }
  rig.faults->Set(nullptr);
  auto t = rig.Open();
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->rebuild_stats().chunks, 8u);
  for (uint64_t i : {1, 10, 11, 12, 14, 15, 16, 17}) EXPECT_TRUE(CheckN(*t, i, kSize).ok()) << i;
}

TEST(DiskTierIoFault, ShortTransfersAreCompleted) {
  Rig rig("short");
  std::atomic<int> shorts{0};
  rig.faults->Set([&](const IoRequest& io) {
    if ((io.kind != IoKind::kRead && io.kind != IoKind::kWrite) || io.length <= disk::kBlock) return IoFault::Run();
    shorts.fetch_add(1, std::memory_order_relaxed);
    return IoFault::Short(disk::kBlock * (1 + io.offset / disk::kBlock % 3));
  });
  const size_t sizes[] = {4096, 5000, 12288, 30001, 65536};
  {
    auto t = rig.Open();
    ASSERT_NE(t, nullptr);
    for (uint64_t i = 0; i < 10; ++i) ASSERT_TRUE(PutN(*t, i, sizes[i % 5], i % 2 == 0 ? 0 : 24).ok()) << i;
    for (uint64_t i = 0; i < 10; ++i) EXPECT_TRUE(CheckN(*t, i, sizes[i % 5], i % 3 == 0 ? 0 : 40).ok()) << i;
  }
  const int before_restart = shorts.load();
  // Every Get, and every Put but the two of 4096 bytes: a record's payload
  // and header block are separate writes, so those two write single blocks,
  // which a short transfer of whole blocks cannot cut.
  EXPECT_GE(before_restart, 18) << "every Put and Get was cut short once";
  auto t = rig.Open();  // start-up preads come back short too
  ASSERT_NE(t, nullptr);
  EXPECT_GT(shorts.load(), before_restart);
  EXPECT_EQ(t->rebuild_stats().chunks, 10u);
  for (uint64_t i = 0; i < 10; ++i) EXPECT_TRUE(CheckN(*t, i, sizes[i % 5]).ok()) << i;
}

TEST(DiskTierIoFault, SubmitAndRingFailuresFailTheCallThenTheTierRecovers) {
  Rig rig("submit");
  auto t = rig.Open();
  ASSERT_NE(t, nullptr);
  for (uint64_t i = 1; i <= 2; ++i) ASSERT_TRUE(PutN(*t, i, kSize).ok());
  // A failed io_uring_submit: the whole batch fails, the ring is rebuilt.
  int submits = 0;
  rig.faults->Set([&](const IoRequest& io) {
    return io.kind == IoKind::kSubmit && submits++ == 0 ? IoFault::Fail(EAGAIN) : IoFault::Run();
  });
  std::vector<Status> r = PutBatchN(*t, 3, 2, kSize);
  for (const Status& s : r) {
    EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
    EXPECT_TRUE(Has(s.message(), "Resource temporarily unavailable")) << s.ToString();
  }
  EXPECT_FALSE(t->Contains(KeyFor(3)));
  EXPECT_TRUE(PutN(*t, 3, kSize).ok()) << "the rebuilt ring works";
  // A failed submit whose ring rebuild fails too: that ring is dropped.
  submits = 0;
  int inits = 0;
  rig.faults->Set([&](const IoRequest& io) {
    if (io.kind == IoKind::kSubmit && submits++ == 0) return IoFault::Fail(EBUSY);
    if (io.kind == IoKind::kRingInit && inits++ == 0) return IoFault::Fail(ENOMEM);
    return IoFault::Run();
  });
  Status g = CheckN(*t, 1, kSize);
  EXPECT_EQ(g.code(), StatusCode::kIoError) << g.ToString();
  EXPECT_TRUE(t->Contains(KeyFor(1)));
  EXPECT_EQ(inits, 1);
  for (uint64_t i = 1; i <= 3; ++i) EXPECT_TRUE(CheckN(*t, i, kSize).ok()) << i << " (a new ring serves it)";
  EXPECT_EQ(inits, 2) << "the broken ring was replaced, not reused";
  // No ring can be made at all: every call says why, nothing is lost.
  rig.faults->Set([&](const IoRequest& io) {
    return io.kind == IoKind::kSubmit || io.kind == IoKind::kRingInit ? IoFault::Fail(EPERM) : IoFault::Run();
  });
  EXPECT_EQ(CheckN(*t, 1, kSize).code(), StatusCode::kIoError);  // breaks the pooled ring
  g = CheckN(*t, 2, kSize);
  EXPECT_EQ(g.code(), StatusCode::kIoError);
  EXPECT_TRUE(Has(g.message(), "io_uring_queue_init")) << g.ToString();
  EXPECT_EQ(PutN(*t, 4, kSize).code(), StatusCode::kIoError);
  rig.faults->Set(nullptr);
  for (uint64_t i = 1; i <= 3; ++i) EXPECT_TRUE(CheckN(*t, i, kSize).ok()) << i;
  EXPECT_TRUE(PutN(*t, 4, kSize).ok());
}

// The twin of DiskTierFault.DiskFullFailsPutsThenRecoversWhenSpaceReturns
// (a real tmpfs, which needs a mount): here the file system "has room" for
// one segment file because fallocate says ENOSPC for the others.
TEST(DiskTierIoFault, FullFileSystemFailsPutsThenRecovers) {
  Rig rig("enospc_falloc", 256 << 10, 16);
  std::set<uint32_t> created;
  bool full = true;
  rig.faults->Set([&](const IoRequest& io) {
    if (io.kind != IoKind::kFallocate) return IoFault::Run();
    if (full && !created.empty()) return IoFault::Fail(ENOSPC);
    created.insert(io.segment);
    return IoFault::Run();
  });
  auto t = rig.Open();
  ASSERT_NE(t, nullptr);
  // Phase 1: the one segment holds a pinned chunk: the Put needing a second
  // segment fails with ENOSPC.
  ASSERT_TRUE(PutN(*t, 0, kSize).ok());
  ASSERT_TRUE(t->Pin(KeyFor(0)).ok());
  uint64_t i = 1;
  Status s;
  for (; i < 64; ++i) {
    s = PutN(*t, i, kSize);
    if (!s.ok()) break;
  }
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.ToString();
  EXPECT_TRUE(Has(s.message(), "ENOSPC")) << s.ToString();
  const uint64_t stored = i;
  EXPECT_GE(stored, 10u);
  EXPECT_EQ(t->Stats().errors, 1u);
  EXPECT_EQ(t->batch_counters().enospc, 1u);
  EXPECT_FALSE(t->Contains(KeyFor(stored)));
  for (uint64_t k = 0; k < stored; ++k) EXPECT_TRUE(CheckN(*t, k, kSize).ok()) << k;
  // Phase 2: space returns; writes resume into new segment files.
  full = false;
  for (uint64_t k = stored; k < stored + 10; ++k) ASSERT_TRUE(PutN(*t, k, kSize).ok()) << k;
  for (uint64_t k = 0; k < stored + 10; ++k) EXPECT_TRUE(CheckN(*t, k, kSize).ok()) << k;
  // Phase 3: full again, nothing pinned: old segments are recycled instead.
  full = true;
  ASSERT_TRUE(t->Unpin(KeyFor(0)).ok());
  const uint64_t enospc = t->batch_counters().enospc;
  for (uint64_t k = stored + 10; k < stored + 60; ++k) ASSERT_TRUE(PutN(*t, k, kSize).ok()) << k;
  EXPECT_GT(t->Stats().evictions, 0u);
  EXPECT_GT(t->batch_counters().enospc, enospc);
  EXPECT_EQ(t->Stats().errors, 1u) << "recycling is not an error";
  for (uint64_t k = stored + 50; k < stored + 60; ++k) EXPECT_TRUE(CheckN(*t, k, kSize).ok()) << k;
}

TEST(DiskTierIoFault, ReadOnlyDirectoryAtStartIsAClearError) {
  // Injected: the file system refuses to open LOCK for writing.
  Rig rig("rodir");
  {
    auto t = rig.Open();  // some data first
    ASSERT_NE(t, nullptr);
    ASSERT_TRUE(PutN(*t, 1, kSize).ok());
  }
  rig.faults->Set([](const IoRequest& io) {
    return io.kind == IoKind::kOpen && io.segment == disk::kNoSegment ? IoFault::Fail(EROFS) : IoFault::Run();
  });
  auto r = DiskTier::Open(rig.o);
  EXPECT_EQ(r.status().code(), StatusCode::kIoError);
  EXPECT_TRUE(Has(r.status().message(), "Read-only file system") && Has(r.status().message(), "LOCK"))
      << r.status().ToString();

  // Real: the directory on a read-only bind mount, in a private mount
  // namespace (chmod 0500 would not stop root).
  rig.faults->Set(nullptr);
  const std::string dir = rig.o.path;
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    if (!disk_test::EnterPrivateMountNamespace()) _exit(77);
    if (mount(dir.c_str(), dir.c_str(), nullptr, MS_BIND, nullptr) != 0) _exit(77);
    if (mount(nullptr, dir.c_str(), nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY, nullptr) != 0) _exit(77);
    DiskTierOptions o = rig.o;
    o.io_faults = nullptr;
    auto t = DiskTier::Open(o);
    if (t.ok()) _exit(2);
    std::fprintf(stderr, "Open on a read-only mount: %s\n", t.status().ToString().c_str());
    if (t.status().code() != StatusCode::kIoError) _exit(3);
    if (!Has(t.status().message(), "Read-only file system")) _exit(4);
    _exit(0);
  }
  const int rc = disk_test::WaitExit(pid);
  if (rc == 77) GTEST_SKIP() << "no private mount namespace here; only the injected read-only case ran";
  EXPECT_EQ(rc, 0) << "2: Open succeeded, 3: wrong code, 4: message does not say read-only";
  auto t = rig.Open();  // writable again: the data is intact
  ASSERT_NE(t, nullptr);
  EXPECT_TRUE(CheckN(*t, 1, kSize).ok());
}

// Start-up reads headers only (issue 14 item 10): a sealed segment costs one
// 4 KiB read per record plus its header and its tail filler, and no payload
// byte of it is read.
TEST(DiskTierIoFault, StartUpReadsOnlyHeadersOfSealedSegments) {
  Rig rig("headers", 1 << 20, 8);
  constexpr size_t kChunk = 100000;  // 9 records a segment, an 84 KiB tail
  std::map<uint32_t, int> records;   // segment -> records
  {
    auto t = rig.Open();
    ASSERT_NE(t, nullptr);
    for (uint64_t i = 0; i < 30; ++i) ASSERT_TRUE(PutN(*t, i, kChunk).ok());
    for (uint64_t i = 0; i < 30; ++i) ++records[t->LocationOf(KeyFor(i))->segment];
  }
  ASSERT_EQ(records.size(), 4u);
  rig.faults->TakeSeen();
  auto t = rig.Open();
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->rebuild_stats().chunks, 30u);
  std::map<uint32_t, int> reads;
  for (const IoRequest& io : rig.faults->TakeSeen()) {
    if (io.kind != IoKind::kRead) continue;
    ++reads[io.segment];
    if (records[io.segment] == 9) {
      EXPECT_EQ(io.length, disk::kBlock) << "sealed segment " << io.segment << " read at " << io.offset;
    }
  }
  for (const auto& [seg, n] : records) {
    if (n == 9) EXPECT_EQ(reads[seg], 1 + 9 + 1) << "segment header, 9 record headers, the filler";
  }
}

// Simulated loss of unsynced writes (RocksDB's fault-injection file system
// idea). The tier never fsyncs: a Put's bytes are in the device when it
// returns, but a power cut may still lose what the device had not yet made
// durable. So from a random "cut" point on, every write the tier issues
// (records, segment headers, dead headers, tail fillers) is randomly kept,
// dropped or torn after some blocks, while the tier, unaware, acknowledges
// and keeps working (rolls, evictions, removes). Then the process "dies"
// and the tier is reopened with a sound disk. What must hold:
// - a chunk acknowledged before the cut, and neither removed nor evicted
//   since, is served byte-exact (nothing after the cut may destroy it);
// - anything else the tier finds is byte-exact, or kDataLoss at its first
//   Get and then gone: never wrong bytes.
TEST(DiskTierIoFault, WritesLostAtAPowerCutNeverServeCorruptData) {
  auto size_for = [](uint64_t i) { return static_cast<size_t>(3000 + (i * 2654435761u) % 17000); };
  uint64_t dropped = 0, torn = 0, kept = 0, data_loss = 0, resurrected = 0;
  for (uint32_t seed = 1; seed <= 16; ++seed) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rig rig("powercut_" + std::to_string(seed), 128 << 10, 8);
    std::mt19937_64 rng(seed);
    std::set<uint64_t> stored;      // acknowledged and neither removed nor evicted
    std::set<uint64_t> before_cut;  // the subset acknowledged before the cut
    std::set<uint64_t> removed_after_cut;
    std::mutex evicted_mu;
    std::set<uint64_t> evicted;
    uint64_t next = 1;
    {
      auto t = rig.Open();
      ASSERT_NE(t, nullptr);
      t->SetEvictionListener([&](const ChunkKey& k) {
        std::lock_guard<std::mutex> g(evicted_mu);
        evicted.insert(k.hi ^ 0xABCDEF);
      });
      auto step = [&](bool after_cut) {
        const uint64_t r = rng() % 10;
        if (r < 8) {  // a batch of 1..3 new chunks, some re-Puts of removed keys
          const size_t n = 1 + rng() % 3;
          std::vector<std::unique_ptr<Buffer>> bufs;
          std::vector<ChunkMeta> metas;
          std::vector<std::span<const std::byte>> datas;
          std::vector<uint64_t> ids;
          for (size_t k = 0; k < n; ++k) ids.push_back(next++);
          for (uint64_t id : ids) {
            bufs.push_back(std::make_unique<Buffer>(size_for(id), id % 2 == 0 ? 0 : 16));
            disk_test::FillFor(id, bufs.back()->span());
            metas.push_back(MetaFor(id));
            datas.push_back(bufs.back()->cspan());
          }
          std::vector<Status> res = t->PutBatch(metas, datas);
          for (size_t k = 0; k < n; ++k) {
            if (res[k].ok()) stored.insert(ids[k]);
          }
        } else if (!stored.empty()) {  // remove a random stored chunk
          auto it = stored.begin();
          std::advance(it, static_cast<long>(rng() % stored.size()));
          const uint64_t id = *it;
          if (t->Remove(KeyFor(id)).ok()) {
            stored.erase(id);
            before_cut.erase(id);
            if (after_cut) removed_after_cut.insert(id);
          }
        }
        std::lock_guard<std::mutex> g(evicted_mu);
        for (uint64_t id : evicted) {
          stored.erase(id);
          before_cut.erase(id);
        }
      };
      const int before = 20 + static_cast<int>(rng() % 40);
      for (int k = 0; k < before; ++k) step(false);
      before_cut = stored;
      // The cut: from here each write lands, is lost, or lands torn.
      std::mt19937_64 fate(seed * 7919);
      rig.faults->Set([&](const IoRequest& io) {
        if (io.kind != IoKind::kWrite) return IoFault::Run();
        const uint64_t r = fate() % 3;
        if (r == 0) {
          ++kept;
          return IoFault::Run();
        }
        if (r == 1) {
          ++dropped;
          return IoFault::Drop();
        }
        ++torn;
        return IoFault::Tear(disk::kBlock * (fate() % (io.length / disk::kBlock)));
      });
      const int after = 10 + static_cast<int>(rng() % 30);
      for (int k = 0; k < after; ++k) step(true);
    }  // the process dies: nothing more reaches the disk
    rig.faults->Set(nullptr);
    auto t = rig.Open();
    ASSERT_NE(t, nullptr);
    for (uint64_t id : before_cut) {
      Status s = CheckN(*t, id, size_for(id));
      EXPECT_TRUE(s.ok()) << "chunk " << id << " acknowledged before the cut: " << s.ToString();
    }
    std::vector<uint64_t> found;
    t->ForEachChunk([&](const ChunkMeta& m, size_t size) {
      found.push_back(m.key.hi ^ 0xABCDEF);
      EXPECT_EQ(size, size_for(found.back()));
    });
    for (uint64_t id : found) {
      Status s = CheckN(*t, id, size_for(id));
      if (s.code() == StatusCode::kDataLoss) {
        ++data_loss;
        EXPECT_FALSE(t->Contains(KeyFor(id)));
        continue;
      }
      ASSERT_TRUE(s.ok()) << "chunk " << id << ": " << s.ToString();
      if (!stored.count(id)) ++resurrected;  // a lost remove or reclaim: still its own bytes
    }
    EXPECT_TRUE(PutN(*t, 1000000, 5000).ok());
    EXPECT_TRUE(CheckN(*t, 1000000, 5000).ok());
  }
  std::printf("writes after the cut: %lu kept, %lu dropped, %lu torn; after restart: %lu kDataLoss, %lu resurrected\n",
              static_cast<unsigned long>(kept), static_cast<unsigned long>(dropped), static_cast<unsigned long>(torn),
              static_cast<unsigned long>(data_loss), static_cast<unsigned long>(resurrected));
  EXPECT_GT(dropped, 0u);
  EXPECT_GT(torn, 0u);
  EXPECT_GT(data_loss, 0u) << "some torn record must have been found at restart and caught by its Get";
}

}  // namespace
}  // namespace kvtier
