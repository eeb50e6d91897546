// The operations API (engine.h: ClearChunks, PinWithTtl / ExpirePins, Move,
// LookupTiers, Verify, Health, the stats additions). Time moves through
// EngineOptions::now, never by sleeping.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include "cc/engine/engine.h"

namespace kvtier {
namespace {

constexpr uint32_t kChunk = 16;
constexpr size_t kBytesPerToken = 256;
constexpr uint64_t kLayout = 7;

std::string TempDir(const char* tag) {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string dir = std::string(base ? base : "/var/tmp") + "/" + tag + "-" + std::to_string(::getpid()) + "-" +
                    std::to_string(std::random_device{}());
  std::filesystem::create_directories(dir);
  return dir;
}

// A clock the test moves by hand.
struct FakeClock {
  std::shared_ptr<std::atomic<int64_t>> ns = std::make_shared<std::atomic<int64_t>>(1'000'000'000'000);
  std::function<std::chrono::steady_clock::time_point()> Fn() const {
    return [ns = ns] { return std::chrono::steady_clock::time_point(std::chrono::nanoseconds(ns->load())); };
  }
  void Advance(std::chrono::nanoseconds d) const { ns->fetch_add(d.count()); }
};

EngineOptions Options(const std::string& disk_dir, const FakeClock* clock = nullptr) {
  EngineOptions o;
  o.hash_namespace.model = "ops-test";
  o.chunk_tokens = kChunk;
  o.cpu.capacity_bytes = 4 << 20;
  o.cpu.chunk_bytes = kChunk * kBytesPerToken;
  if (!disk_dir.empty()) {
    o.disk.path = disk_dir;
    o.disk.capacity_bytes = 16 << 20;
  }
  if (clock != nullptr) o.now = clock->Fn();
  return o;
}

std::vector<int32_t> Tokens(size_t n, int32_t first) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

size_t BytesFor(uint32_t n) { return size_t{n} * kBytesPerToken; }

std::byte Pattern(int32_t token, size_t byte) { return static_cast<std::byte>((token * 131 + byte) & 0xff); }

void Store(Engine& e, const std::vector<int32_t>& tokens) {
  auto h = e.Store(tokens, 0, kLayout, BytesFor, [&tokens](const ChunkHash& c, std::span<std::byte> dst) {
    for (size_t i = 0; i < dst.size(); ++i) dst[i] = Pattern(tokens[c.begin + i / kBytesPerToken], i % kBytesPerToken);
    return Status();
  });
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  ASSERT_TRUE((*h)->Wait().ok());
  e.Flush();  // on disk too
}

// Tokens served, every byte checked.
size_t RetrieveChecked(Engine& e, const std::vector<int32_t>& tokens, uint64_t layout = kLayout) {
  size_t bad = 0;
  auto n = e.Retrieve(tokens, 0, layout, [&](const ChunkHash& c, std::span<const std::byte> src) {
    for (size_t i = 0; i < src.size(); ++i) bad += src[i] != Pattern(tokens[c.begin + i / kBytesPerToken], i % kBytesPerToken);
    return Status();
  });
  EXPECT_TRUE(n.ok());
  EXPECT_EQ(bad, 0u);
  return n.ok() ? *n : 0;
}

uint32_t TiersOf(Engine& e, const std::vector<int32_t>& tokens, size_t chunk) {
  auto l = e.LookupTiers(tokens);
  EXPECT_TRUE(l.ok());
  return l.ok() && chunk < l->chunks.size() ? l->chunks[chunk].tiers : 0;
}

std::unique_ptr<Engine> Make(const EngineOptions& o) {
  auto e = Engine::Create(o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return e.ok() ? std::move(e).value() : nullptr;
}

// ---------------------------------------------------------------------------
// Clear

TEST(EngineOpsTest, ClearByTierDropsOnlyThoseCopies) {
  auto e = Make(Options(TempDir("ops-clear-tier")));
  const auto a = Tokens(4 * kChunk, 1);
  Store(*e, a);
  ASSERT_EQ(TiersOf(*e, a, 0), kTierBitCpu | kTierBitDisk);

  auto n = e->ClearChunks({.tiers = kTierBitCpu});
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 4u);
  EXPECT_EQ(e->Lookup(a), a.size()) << "the disk copies keep the chunks catalogued";
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(TiersOf(*e, a, i), kTierBitDisk);
  EXPECT_EQ(e->Stats().cpu_evictions.clear, 4u);
  EXPECT_EQ(e->Stats().disk_evictions.clear, 0u);

  n = e->ClearChunks({.tiers = kTierBitDisk});
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 4u);
  EXPECT_EQ(e->Lookup(a), 0u);
  EXPECT_EQ(e->Stats().catalogue_entries, 0u) << "no copy left: out of the catalogue";
  EXPECT_EQ(e->Stats().disk_evictions.clear, 4u);
}

TEST(EngineOpsTest, ClearAllReturnsChunksDropped) {
  auto e = Make(Options(TempDir("ops-clear-all")));
  const auto a = Tokens(3 * kChunk, 1);
  Store(*e, a);
  EXPECT_EQ(e->Clear(), 3u);
  EXPECT_EQ(e->Lookup(a), 0u);
}

TEST(EngineOpsTest, ClearByTokensDropsOnlyTheirPrefix) {
  auto e = Make(Options(TempDir("ops-clear-tokens")));
  const auto a = Tokens(2 * kChunk, 1);
  const auto b = Tokens(2 * kChunk, 5000);
  Store(*e, a);
  Store(*e, b);
  auto n = e->ClearChunks({.by_tokens = true, .tokens = a});
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 2u);
  EXPECT_EQ(e->Lookup(a), 0u);
  EXPECT_EQ(e->Lookup(b), b.size());
  EXPECT_EQ(RetrieveChecked(*e, b), b.size());
}

TEST(EngineOpsTest, ClearOlderThanUsesLastUse) {
  FakeClock clock;
  auto e = Make(Options(TempDir("ops-clear-old"), &clock));
  const auto a = Tokens(kChunk, 1);
  const auto b = Tokens(kChunk, 5000);
  const auto c = Tokens(kChunk, 9000);
  Store(*e, a);
  Store(*e, c);
  clock.Advance(std::chrono::seconds(100));
  Store(*e, b);
  EXPECT_EQ(RetrieveChecked(*e, c), c.size());  // a read is a use: c is recent again
  auto n = e->ClearChunks({.older_than = std::chrono::seconds(50)});
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 1u);
  EXPECT_EQ(e->Lookup(a), 0u);
  EXPECT_EQ(e->Lookup(b), b.size());
  EXPECT_EQ(e->Lookup(c), c.size());
}

TEST(EngineOpsTest, ClearNeverDropsPinnedChunks) {
  auto e = Make(Options(TempDir("ops-clear-pin")));
  const auto a = Tokens(2 * kChunk, 1);
  Store(*e, a);
  ASSERT_EQ(e->Pin(a), 2u);
  EXPECT_EQ(e->Clear(), 0u);
  auto n = e->ClearChunks({.by_tokens = true, .tokens = a});
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 0u);
  EXPECT_EQ(e->Lookup(a), a.size());
  ASSERT_EQ(e->Unpin(a), 2u);
  EXPECT_EQ(e->Clear(), 2u);
}

TEST(EngineOpsTest, ClearRejectsBadInputAndChangesNothing) {
  auto e = Make(Options(TempDir("ops-clear-bad")));
  const auto a = Tokens(2 * kChunk, 1);
  Store(*e, a);
  EXPECT_EQ(e->ClearChunks({.tiers = 0}).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(e->ClearChunks({.tiers = 1u << 5}).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(e->ClearChunks({.older_than = std::chrono::seconds(-1)}).status().code(), StatusCode::kInvalidArgument);
  KeyExtras bad;
  bad.spans.push_back(KeySpan{5, 5, IdentityKey("x")});  // empty span
  EXPECT_EQ(e->ClearChunks({.by_tokens = true, .tokens = a, .extras = &bad}).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(e->Lookup(a), a.size());
  EXPECT_EQ(TiersOf(*e, a, 0), kTierBitCpu | kTierBitDisk);
}

// ---------------------------------------------------------------------------
// TTL pins

TEST(EngineOpsTest, PinTtlIsReleasedWhenDue) {
  FakeClock clock;
  auto e = Make(Options(TempDir("ops-pin-ttl"), &clock));
  const auto a = Tokens(3 * kChunk, 1);
  Store(*e, a);
  auto n = e->PinWithTtl(a, nullptr, std::chrono::seconds(10));
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 3u);
  EXPECT_EQ(e->Stats().pins_with_ttl, 3u);
  EXPECT_EQ(e->ExpirePins(), 0u) << "not due yet";
  EXPECT_EQ(e->Clear(), 0u) << "pinned";
  clock.Advance(std::chrono::seconds(11));
  EXPECT_EQ(e->ExpirePins(), 3u);
  EXPECT_EQ(e->Stats().pins_expired, 3u);
  EXPECT_EQ(e->Stats().pins_with_ttl, 0u);
  auto l = e->LookupTiers(a);
  ASSERT_TRUE(l.ok());
  for (const auto& c : l->chunks) EXPECT_FALSE(c.pinned);
  EXPECT_EQ(e->Unpin(a), 0u) << "the TTL released the only pin";
  EXPECT_EQ(e->Clear(), 3u);
}

TEST(EngineOpsTest, ExpirePinsAheadReleasesPinsDueBy) {
  auto e = Make(Options(""));
  const auto a = Tokens(kChunk, 1);
  Store(*e, a);
  ASSERT_TRUE(e->PinWithTtl(a, nullptr, std::chrono::hours(1)).ok());
  ASSERT_EQ(e->Pin(a), 1u);  // an ordinary pin too: it stays
  EXPECT_EQ(e->ExpirePins(std::chrono::minutes(59)), 0u);
  EXPECT_EQ(e->ExpirePins(std::chrono::minutes(61)), 1u);
  EXPECT_EQ(e->Clear(), 0u) << "the ordinary pin holds";
  EXPECT_EQ(e->Unpin(a), 1u);
}

TEST(EngineOpsTest, PinTtlThreadReleasesWithoutHelp) {
  auto e = Make(Options(""));
  const auto a = Tokens(2 * kChunk, 1);
  Store(*e, a);
  ASSERT_TRUE(e->PinWithTtl(a, nullptr, std::chrono::milliseconds(1)).ok());
  // Waits for the thread's effect (not a fixed time): ends as soon as it happened.
  for (int i = 0; i < 60000 && e->Stats().pins_expired < 2; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(e->Stats().pins_expired, 2u);
  EXPECT_EQ(e->Clear(), 2u);
}

TEST(EngineOpsTest, PinTtlRejectsBadTtl) {
  auto e = Make(Options(""));
  const auto a = Tokens(kChunk, 1);
  Store(*e, a);
  EXPECT_EQ(e->PinWithTtl(a, nullptr, std::chrono::seconds(0)).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(e->PinWithTtl(a, nullptr, std::chrono::seconds(-5)).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(e->Clear(), 1u) << "nothing was pinned";
}

// ---------------------------------------------------------------------------
// Move

TEST(EngineOpsTest, MoveToCpuPromotesDiskChunks) {
  auto e = Make(Options(TempDir("ops-move-cpu")));
  const auto a = Tokens(3 * kChunk, 1);
  Store(*e, a);
  ASSERT_TRUE(e->ClearChunks({.tiers = kTierBitCpu}).ok());
  ASSERT_EQ(TiersOf(*e, a, 0), kTierBitDisk);
  auto t = e->Move(a, kTierBitCpu);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_TRUE((*t)->Wait());
  const MoveTask::Result r = (*t)->result();
  EXPECT_TRUE(r.done);
  EXPECT_EQ(r.chunks, 3u);
  EXPECT_EQ(r.moved, 3u);
  EXPECT_EQ(r.failed, 0u) << r.error;
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(TiersOf(*e, a, i), kTierBitCpu | kTierBitDisk);
  const uint64_t disk_loads = e->Stats().chunks_loaded_disk;
  EXPECT_EQ(RetrieveChecked(*e, a), a.size());
  EXPECT_EQ(e->Stats().chunks_loaded_disk, disk_loads) << "served from CPU";
  auto again = e->Move(a, kTierBitCpu);
  ASSERT_TRUE(again.ok());
  ASSERT_TRUE((*again)->Wait());
  EXPECT_EQ((*again)->result().already, 3u);
}

TEST(EngineOpsTest, MoveToDiskWritesThenDropsCpuCopy) {
  auto e = Make(Options(TempDir("ops-move-disk")));
  const auto a = Tokens(2 * kChunk, 1);
  Store(*e, a);
  ASSERT_TRUE(e->ClearChunks({.tiers = kTierBitDisk}).ok());  // CPU-only now
  ASSERT_EQ(TiersOf(*e, a, 0), kTierBitCpu);
  auto t = e->Move(a, kTierBitDisk);
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE((*t)->Wait());
  EXPECT_EQ((*t)->result().moved, 2u) << (*t)->result().error;
  for (size_t i = 0; i < 2; ++i) EXPECT_EQ(TiersOf(*e, a, i), kTierBitDisk);
  EXPECT_EQ(RetrieveChecked(*e, a), a.size()) << "the bytes written by the move";
  EXPECT_GE(e->Stats().store_disk_us.count, 3u);
}

TEST(EngineOpsTest, MoveToDiskKeepsPinnedCpuCopy) {
  auto e = Make(Options(TempDir("ops-move-pin")));
  const auto a = Tokens(kChunk, 1);
  Store(*e, a);
  ASSERT_EQ(e->Pin(a), 1u);
  auto t = e->Move(a, kTierBitDisk);
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE((*t)->Wait());
  EXPECT_EQ((*t)->result().failed, 1u);
  EXPECT_NE((*t)->result().error.find("pinned"), std::string::npos) << (*t)->result().error;
  EXPECT_EQ(TiersOf(*e, a, 0), kTierBitCpu | kTierBitDisk);
  EXPECT_EQ(e->Unpin(a), 1u);
}

TEST(EngineOpsTest, MoveRejectsBadInput) {
  auto e = Make(Options(""));
  const auto a = Tokens(kChunk, 1);
  Store(*e, a);
  EXPECT_EQ(e->Move(a, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(e->Move(a, kTierBitCpu | kTierBitDisk).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(e->Move(a, kTierBitDisk).status().code(), StatusCode::kFailedPrecondition) << "no disk tier";
  EXPECT_EQ(TiersOf(*e, a, 0), kTierBitCpu);
}

// ---------------------------------------------------------------------------
// LookupTiers

TEST(EngineOpsTest, LookupTiersDoesNotCountAsLookup) {
  auto e = Make(Options(TempDir("ops-lookup")));
  const auto a = Tokens(3 * kChunk + 5, 1);
  Store(*e, a);
  ASSERT_TRUE(e->ClearChunks({.tiers = kTierBitCpu}).ok());
  ASSERT_EQ(e->Pin(Tokens(kChunk, 1)), 1u);
  const EngineStats before = e->Stats();
  auto l = e->LookupTiers(a);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->tokens, a.size());
  EXPECT_EQ(l->chunk_tokens, kChunk);
  ASSERT_EQ(l->chunks.size(), 4u);
  EXPECT_TRUE(l->chunks[0].pinned);
  EXPECT_FALSE(l->chunks[1].pinned);
  EXPECT_EQ(l->disk_chunks, 4u);
  EXPECT_EQ(l->cpu_chunks, 0u);
  const EngineStats after = e->Stats();
  EXPECT_EQ(after.lookups, before.lookups);
  EXPECT_EQ(after.lookup_query_tokens, before.lookup_query_tokens);
  EXPECT_EQ(after.cpu.gets, before.cpu.gets);
  EXPECT_EQ(e->Unpin(Tokens(kChunk, 1)), 1u);
}

// ---------------------------------------------------------------------------
// Verify

TEST(EngineOpsTest, VerifyFindsMissingOrphanAndCorrupt) {
  auto e = Make(Options(TempDir("ops-verify")));
  const auto a = Tokens(4 * kChunk, 1);
  Store(*e, a);
  VerifyReport v = e->Verify(/*deep=*/true);
  EXPECT_TRUE(v.consistent());
  EXPECT_EQ(v.entries, 4u);
  EXPECT_EQ(v.ok, 4u);

  std::vector<ChunkHash> chunks;
  e->hasher().Hash(a, &chunks);
  // Missing: the CPU tier loses chunk 0 behind the catalogue's back.
  ASSERT_TRUE(e->cpu_tier()->Remove(chunks[0].key).ok());
  // Orphans: the catalogue loses chunk 1 while both tiers keep it.
  ASSERT_TRUE(e->index().Remove(chunks[1].key).ok());
  // Corrupt: flip a payload byte of chunk 2's disk record.
  auto loc = e->disk_tier()->LocationOf(chunks[2].key);
  ASSERT_TRUE(loc.ok());
  {
    const int fd = ::open(loc->file.c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    const off_t at = static_cast<off_t>(loc->offset + 4096 + 17);  // past the 4 KiB header block
    std::byte b;
    ASSERT_EQ(::pread(fd, &b, 1, at), 1);
    b ^= std::byte{0xff};
    ASSERT_EQ(::pwrite(fd, &b, 1, at), 1);
    ASSERT_EQ(::fsync(fd), 0);
    ::close(fd);
  }
  const TierStats disk_before = e->Stats().disk;
  v = e->Verify(/*deep=*/false);
  EXPECT_EQ(v.missing_cpu, 1u);
  EXPECT_EQ(v.missing_disk, 0u);
  EXPECT_EQ(v.orphans_cpu, 1u);
  EXPECT_EQ(v.orphans_disk, 1u);
  EXPECT_EQ(v.corrupt, 0u) << "shallow reads no record";
  EXPECT_FALSE(v.consistent());
  v = e->Verify(/*deep=*/true);
  EXPECT_EQ(v.corrupt, 1u);
  EXPECT_EQ(v.checked, 3u);
  EXPECT_EQ(v.ok, 1u);
  // Read-only: the corrupt record is still there, nothing counted as a get.
  EXPECT_TRUE(e->disk_tier()->Contains(chunks[2].key));
  EXPECT_EQ(e->Stats().disk.gets, disk_before.gets);
  EXPECT_EQ(e->Stats().disk.entries, disk_before.entries);
}

TEST(EngineOpsTest, VerifyWhileStoringStaysConsistent) {
  auto e = Make(Options(TempDir("ops-verify-live")));
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    for (int32_t i = 0; i < 200 && !stop.load(); ++i) {
      const auto t = Tokens(2 * kChunk, 100000 + i * 64);
      auto h = e->Store(t, 0, kLayout, BytesFor, [](const ChunkHash&, std::span<std::byte> dst) {
        std::fill(dst.begin(), dst.end(), std::byte{1});
        return Status();
      });
      if (h.ok()) (void)(*h)->Wait();
    }
  });
  size_t runs = 0;
  while (runs < 20) {
    const VerifyReport v = e->Verify(false);
    EXPECT_TRUE(v.consistent()) << "missing " << v.missing_cpu << "/" << v.missing_disk << " orphans "
                                << v.orphans_cpu << "/" << v.orphans_disk;
    ++runs;
  }
  stop = true;
  writer.join();
  e->Flush();
  EXPECT_TRUE(e->Verify(true).consistent());
}

// ---------------------------------------------------------------------------
// Health

TEST(EngineOpsTest, HealthOkThenDegradedWhenDiskDirectoryReplaced) {
  const std::string dir = TempDir("ops-health");
  auto e = Make(Options(dir));
  HealthReport h = e->Health();
  EXPECT_EQ(h.status, HealthStatus::kOk);
  EXPECT_TRUE(h.reasons.empty());
  EXPECT_TRUE(h.disk.enabled);
  EXPECT_FALSE(h.remote.enabled);
  EXPECT_EQ(h.write_behind_capacity, 1024u);
  // What fails writes even for root: the directory is replaced by a file, so
  // no new segment file can be created in it.
  std::filesystem::remove_all(dir);
  std::ofstream(dir) << "not a directory";
  h = e->Health();
  EXPECT_EQ(h.status, HealthStatus::kDegraded);
  EXPECT_EQ(h.disk.status, HealthStatus::kDegraded);
  ASSERT_FALSE(h.disk.reasons.empty());
  EXPECT_NE(h.disk.reasons[0].find(dir), std::string::npos) << h.disk.reasons[0];
  ASSERT_FALSE(h.reasons.empty());
  EXPECT_EQ(h.reasons[0].rfind("disk: ", 0), 0u) << h.reasons[0];
  std::filesystem::remove(dir);
}

TEST(EngineOpsTest, HealthDegradedForRecentDiskFailuresOnly) {
  FakeClock clock;
  EngineOptions o = Options(TempDir("ops-health-fail"), &clock);
  o.write_behind_retries = 1;
  std::atomic<bool> fail{true};
  o.test_disk_write_results = [&](std::span<Status> results) {
    if (fail.load()) {
      for (Status& s : results) s = InvalidArgument("injected permanent failure");
    }
  };
  auto e = Make(o);
  Store(*e, Tokens(kChunk, 1));
  ASSERT_EQ(e->Stats().write_behind_failed, 1u);
  HealthReport h = e->Health();
  EXPECT_EQ(h.disk.status, HealthStatus::kDegraded);
  EXPECT_EQ(h.status, HealthStatus::kDegraded);
  clock.Advance(std::chrono::seconds(61));
  h = e->Health();
  EXPECT_EQ(h.status, HealthStatus::kOk) << (h.reasons.empty() ? "" : h.reasons[0]);
}

TEST(EngineOpsTest, HealthDegradedAfterWriteBehindDrops) {
  EngineOptions o = Options(TempDir("ops-health-drop"));
  o.write_behind_queue = 1;
  // The writer blocks in its first disk write until released, so the
  // one-slot queue fills and further chunks are dropped (not a timing bet:
  // at most one chunk is in the writer's hands and one queued).
  std::mutex mu;
  std::condition_variable cv;
  bool release = false;
  o.test_disk_write_results = [&](std::span<Status>) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return release; });
  };
  auto unblock = [&] {
    {
      std::lock_guard<std::mutex> lock(mu);
      release = true;
    }
    cv.notify_all();
  };
  auto e = Make(o);
  // Destroyed before e, on every exit: the writer must not stay blocked.
  struct Unblock {
    std::function<void()> fn;
    ~Unblock() { fn(); }
  } guard{unblock};
  for (int32_t i = 0; i < 4; ++i) {
    const auto t = Tokens(kChunk, 1 + i * 1000);
    auto h = e->Store(t, 0, kLayout, BytesFor, [](const ChunkHash&, std::span<std::byte> dst) {
      std::fill(dst.begin(), dst.end(), std::byte{3});
      return Status();
    });
    ASSERT_TRUE(h.ok());
    ASSERT_TRUE((*h)->Wait().ok());
  }
  EXPECT_GE(e->Stats().write_behind_dropped, 2u);
  const HealthReport h = e->Health();
  EXPECT_EQ(h.disk.status, HealthStatus::kDegraded);
  ASSERT_FALSE(h.disk.reasons.empty());
  EXPECT_NE(h.disk.reasons[0].find("write-behind queue was full"), std::string::npos) << h.disk.reasons[0];
  EXPECT_EQ(h.write_behind_capacity, 1u);
  unblock();
  e->Flush();
}

TEST(EngineOpsTest, HealthRemoteDownAfterAFailedCall) {
  EngineOptions o = Options("");
  o.remote.url = "redis://127.0.0.1:1";  // nothing listens on port 1
  o.remote.timeout = std::chrono::milliseconds(200);
  auto e = Make(o);
  HealthReport h = e->Health();
  EXPECT_TRUE(h.remote.enabled);
  EXPECT_EQ(h.remote.status, HealthStatus::kOk) << "no call made yet";
  const auto a = Tokens(kChunk, 1);
  EXPECT_EQ(e->LookupRemote(a), 0u);
  h = e->Health();
  EXPECT_EQ(h.remote.status, HealthStatus::kDown);
  ASSERT_FALSE(h.remote.reasons.empty());
  EXPECT_EQ(h.status, HealthStatus::kDegraded) << "the local tiers still serve";
  EXPECT_EQ(h.reasons[0].rfind("remote: ", 0), 0u) << h.reasons[0];
}

// ---------------------------------------------------------------------------
// Stats additions

TEST(EngineOpsTest, HistogramsAndEvictionReasons) {
  FakeClock clock;
  EngineOptions o = Options(TempDir("ops-stats"), &clock);
  o.cpu.ttl_ms = 1000;
  auto e = Make(o);
  const auto a = Tokens(3 * kChunk, 1);
  Store(*e, a);
  EngineStats s = e->Stats();
  EXPECT_EQ(s.store_cpu_us.count, 3u);
  EXPECT_GE(s.store_disk_us.count, 1u);
  EXPECT_GT(s.catalogue_capacity, 0u);
  EXPECT_EQ(RetrieveChecked(*e, a), a.size());
  s = e->Stats();
  EXPECT_EQ(s.load_cpu_us.count, 3u);
  uint64_t in_buckets = 0;
  for (uint64_t c : s.load_cpu_us.counts) in_buckets += c;
  EXPECT_EQ(in_buckets, 3u) << "non-cumulative: each sample in one bucket";
  // TTL: the CPU copies expire; a retrieve meets them (expired), promotes from disk.
  clock.Advance(std::chrono::seconds(2));
  EXPECT_EQ(RetrieveChecked(*e, a), a.size());
  s = e->Stats();
  EXPECT_EQ(s.cpu_evictions.expired, 3u);
  EXPECT_EQ(s.load_disk_us.count, 3u);
  // Another layout: dropped from both tiers as layout mismatches.
  EXPECT_EQ(RetrieveChecked(*e, a, kLayout + 1), 0u);
  s = e->Stats();
  EXPECT_EQ(s.cpu_evictions.layout_mismatch, 3u);
  EXPECT_EQ(s.disk_evictions.layout_mismatch, 3u);
  EXPECT_EQ(s.cpu_evictions.capacity, 0u);
}

TEST(LatencyHistogramTest, BucketsAreUpperInclusive) {
  LatencyHistogram h;
  h.Record(0);
  h.Record(10);
  h.Record(11);
  h.Record(10'000'000);
  h.Record(10'000'001);
  const auto s = h.Get();
  EXPECT_EQ(s.counts[0], 2u);
  EXPECT_EQ(s.counts[1], 1u);
  EXPECT_EQ(s.counts[LatencyHistogram::kBounds.size() - 1], 1u);
  EXPECT_EQ(s.counts[LatencyHistogram::kBounds.size()], 1u) << "+Inf";
  EXPECT_EQ(s.count, 5u);
  EXPECT_EQ(s.sum_us, 0u + 10 + 11 + 10'000'000 + 10'000'001);
}

}  // namespace
}  // namespace kvtier
