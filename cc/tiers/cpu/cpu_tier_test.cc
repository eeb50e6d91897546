#include "cc/tiers/cpu/cpu_tier.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

namespace kvtier {
namespace {

constexpr size_t kKiB = 1024;
// Small chunks keep the byte-by-byte fills fast under sanitizers.
constexpr size_t kChunk = 128 * kKiB;

ChunkMeta Meta(uint64_t i, uint64_t fp = 7) { return ChunkMeta{ChunkKey{i, 0xC0FFEE}, fp, 1, 256}; }

std::vector<std::byte> Bytes(size_t n, uint64_t seed) {
  std::vector<std::byte> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>((seed * 131 + i * 7) & 0xff);
  return v;
}

std::unique_ptr<CpuTier> Make(CpuTierOptions o) {
  auto t = CpuTier::Create(o);
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return std::move(t).value();
}

CpuTierOptions Small(size_t chunks, size_t chunk = kChunk) {
  CpuTierOptions o;
  o.capacity_bytes = chunks * chunk;
  o.chunk_bytes = chunk;
  o.huge_pages = HugePages::kOff;
  return o;
}

TEST(CpuTierTest, PutGetRoundTripAndStats) {
  auto t = Make(Small(8));
  const auto data = Bytes(kChunk, 1);
  ASSERT_TRUE(t->Put(Meta(1), data).ok());
  EXPECT_TRUE(t->Contains(Meta(1).key));
  EXPECT_EQ(*t->SizeOf(Meta(1).key), kChunk);
  std::vector<std::byte> out(kChunk);
  ASSERT_TRUE(t->Get(Meta(1).key, 7, out).ok());
  EXPECT_EQ(out, data);
  auto s = t->Stats();
  EXPECT_EQ(s.capacity_bytes, 8 * kChunk);
  EXPECT_EQ(s.used_bytes, kChunk);
  EXPECT_EQ(s.entries, 1u);
  EXPECT_EQ(s.puts, 1u);
  EXPECT_EQ(s.get_hits, 1u);
  // The bytes live inside memory(), where a device registration would see them.
  auto lease = t->Acquire(Meta(1).key, 7);
  ASSERT_TRUE(lease.ok());
  EXPECT_GE(lease->data().data(), t->memory().data());
  EXPECT_LE(lease->data().data() + kChunk, t->memory().data() + t->memory().size());
  EXPECT_EQ(lease->meta().num_tokens, 256u);
}

TEST(CpuTierTest, HeldCommitIsNeverEvictedBeforeReleaseHold) {
  auto t = std::move(CpuTier::Create(Small(4))).value();
  {
    auto lease = std::move(t->BeginPut(Meta(1), kChunk)).value();
    std::memset(lease.data().data(), 9, kChunk);
    ASSERT_TRUE(t->Commit(std::move(lease), /*held=*/true).ok());
  }
  // Far more puts than the tier holds: everything else may go, chunk 1 stays.
  for (uint64_t i = 2; i < 40; ++i) ASSERT_TRUE(t->Put(Meta(i), Bytes(kChunk, 1)).ok());
  EXPECT_TRUE(t->Contains(Meta(1).key));
  EXPECT_GT(t->Stats().evictions, 0u);
  // A hold is not a user pin: Unpin cannot release it.
  EXPECT_EQ(t->Unpin(Meta(1).key).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(t->ReleaseHold(Meta(1).key).ok());
  EXPECT_EQ(t->ReleaseHold(Meta(1).key).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(t->ReleaseHold(Meta(99).key).code(), StatusCode::kNotFound);
  for (uint64_t i = 40; i < 80; ++i) ASSERT_TRUE(t->Put(Meta(i), Bytes(kChunk, 1)).ok());
  EXPECT_FALSE(t->Contains(Meta(1).key));  // evictable again once released
}

// Issue 14 item 2: user pins, read leases and holds are counted apart, so
// no owner can release another's pin. An Unpin used to drop a reader's
// lease pin; eviction then reused the slab under the reader.
TEST(CpuTierTest, PinsAreCountedByOwner) {
  auto t = Make(Small(4));
  const auto data = Bytes(kChunk, 42);
  ASSERT_TRUE(t->Put(Meta(1), data).ok());
  auto lease = t->Acquire(Meta(1).key, 7);
  ASSERT_TRUE(lease.ok());
  EXPECT_EQ(t->Unpin(Meta(1).key).code(), StatusCode::kFailedPrecondition) << "a lease is not a user pin";
  // A user pin on top, released while the lease lives: the lease still pins.
  ASSERT_TRUE(t->Pin(Meta(1).key).ok());
  ASSERT_TRUE(t->Unpin(Meta(1).key).ok());
  EXPECT_EQ(t->Unpin(Meta(1).key).code(), StatusCode::kFailedPrecondition);
  for (uint64_t i = 2; i < 40; ++i) ASSERT_TRUE(t->Put(Meta(i), Bytes(kChunk, i)).ok());
  EXPECT_GT(t->Stats().evictions, 0u);
  EXPECT_TRUE(t->Contains(Meta(1).key));
  EXPECT_EQ(t->Remove(Meta(1).key).code(), StatusCode::kFailedPrecondition);
  t->Clear();
  EXPECT_TRUE(t->Contains(Meta(1).key));
  EXPECT_EQ(std::vector<std::byte>(lease->data().begin(), lease->data().end()), data);
  // A user pin outlives the lease.
  ASSERT_TRUE(t->Pin(Meta(1).key).ok());
  *lease = std::move(t->Acquire(Meta(1).key, 7)).value();  // re-acquire, releasing the old lease
  lease = Internal("dropped");                                 // and drop the new one
  t->Clear();
  EXPECT_TRUE(t->Contains(Meta(1).key));
  ASSERT_TRUE(t->Unpin(Meta(1).key).ok());
  t->Clear();
  EXPECT_FALSE(t->Contains(Meta(1).key));
}

TEST(CpuTierTest, GetMetaSeesCommittedEntriesOnly) {
  auto t = Make(Small(4));
  ChunkMeta m = Meta(1);
  m.layout_id = 99;
  ASSERT_TRUE(t->Put(m, Bytes(kChunk, 1)).ok());
  auto got = t->GetMeta(m.key);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->layout_id, 99u);
  EXPECT_EQ(got->fingerprint, 7u);
  auto w = t->BeginPut(Meta(2), kChunk);
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(t->GetMeta(Meta(2).key).status().code(), StatusCode::kNotFound);  // in flight
  EXPECT_EQ(t->GetMeta(Meta(3).key).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(t->Stats().gets, 0u);
}

TEST(CpuTierTest, PartialChunksUseSmallerClasses) {
  auto t = Make(Small(16, 256 * kKiB));  // classes: 64, 128, 256 KiB
  const auto data = Bytes(100 * kKiB, 2);
  ASSERT_TRUE(t->Put(Meta(1), data).ok());
  EXPECT_EQ(t->Stats().used_bytes, 128 * kKiB);
  ASSERT_TRUE(t->Put(Meta(2), Bytes(30 * kKiB, 3)).ok());
  EXPECT_EQ(t->Stats().used_bytes, 192 * kKiB);
  std::vector<std::byte> out(100 * kKiB);
  ASSERT_TRUE(t->Get(Meta(1).key, 7, out).ok());
  EXPECT_EQ(out, data);
}

TEST(CpuTierTest, MissesAndBadSizes) {
  auto t = Make(Small(4));
  ASSERT_TRUE(t->Put(Meta(1), Bytes(kChunk, 1)).ok());
  std::vector<std::byte> out(kChunk);
  EXPECT_EQ(t->Get(Meta(1).key, 8, out).code(), StatusCode::kNotFound);  // fingerprint mismatch
  EXPECT_EQ(t->Get(Meta(2).key, 7, out).code(), StatusCode::kNotFound);
  std::vector<std::byte> small(kChunk - 1);
  auto wrong = t->Get(Meta(1).key, 7, small);
  EXPECT_EQ(wrong.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.message().find(std::to_string(kChunk - 1)), std::string_view::npos);
  EXPECT_EQ(t->Put(Meta(3), Bytes(kChunk + 1, 1)).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(t->Put(Meta(3), {}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(t->BeginPut(Meta(3), 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(t->BeginPut(ChunkMeta{}, 10).status().code(), StatusCode::kInvalidArgument);
  // Duplicate put leaves the stored bytes alone.
  EXPECT_EQ(t->Put(Meta(1), Bytes(kChunk, 9)).code(), StatusCode::kAlreadyExists);
  ASSERT_TRUE(t->Get(Meta(1).key, 7, out).ok());
  EXPECT_EQ(out, Bytes(kChunk, 1));
  EXPECT_EQ(t->Stats().used_bytes, kChunk);
  EXPECT_EQ(t->Remove(Meta(2).key).code(), StatusCode::kNotFound);
  EXPECT_EQ(t->Unpin(Meta(1).key).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(t->Pin(Meta(2).key).code(), StatusCode::kNotFound);
}

TEST(CpuTierTest, InFlightEntriesAreInvisibleAndAbortFrees) {
  auto t = Make(Small(4));
  auto w = t->BeginPut(Meta(1), kChunk);
  ASSERT_TRUE(w.ok());
  std::vector<std::byte> out(kChunk);
  EXPECT_EQ(t->Get(Meta(1).key, 7, out).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(t->Acquire(Meta(1).key, 7).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_FALSE(t->Contains(Meta(1).key));
  EXPECT_EQ(t->Remove(Meta(1).key).code(), StatusCode::kNotFound);
  EXPECT_EQ(t->BeginPut(Meta(1), kChunk).status().code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(t->Stats().entries, 0u);
  EXPECT_EQ(t->Stats().used_bytes, kChunk);  // reserved
  const auto data = Bytes(kChunk, 5);
  std::memcpy(w->data().data(), data.data(), kChunk);
  ASSERT_TRUE(t->Commit(std::move(*w)).ok());
  ASSERT_TRUE(t->Get(Meta(1).key, 7, out).ok());
  EXPECT_EQ(out, data);
  // A committed (now empty) lease cannot be committed twice.
  EXPECT_EQ(t->Commit(std::move(*w)).code(), StatusCode::kInvalidArgument);

  { auto dropped = t->BeginPut(Meta(2), kChunk); ASSERT_TRUE(dropped.ok()); }
  EXPECT_FALSE(t->Contains(Meta(2).key));
  EXPECT_EQ(t->Stats().used_bytes, kChunk);
  EXPECT_TRUE(t->Put(Meta(2), Bytes(kChunk, 2)).ok());
}

TEST(CpuTierTest, InFlightAndPinnedAreNeverEvicted) {
  auto t = Make(Small(4));
  std::vector<CpuTier::WriteLease> writes;
  for (uint64_t i = 1; i <= 2; ++i) writes.push_back(std::move(t->BeginPut(Meta(i), kChunk)).value());
  ASSERT_TRUE(t->Put(Meta(3), Bytes(kChunk, 3)).ok());
  ASSERT_TRUE(t->Pin(Meta(3).key).ok());
  ASSERT_TRUE(t->Put(Meta(4), Bytes(kChunk, 4)).ok());
  auto read = t->Acquire(Meta(4).key, 7);
  ASSERT_TRUE(read.ok());
  // Full: two in flight, one pinned, one leased. No victim -> clear error.
  auto full = t->Put(Meta(5), Bytes(kChunk, 5));
  EXPECT_EQ(full.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(full.message().find("pinned or in flight"), std::string_view::npos);
  EXPECT_EQ(t->Stats().evictions, 0u);
  EXPECT_EQ(std::vector<std::byte>(read->data().begin(), read->data().end()), Bytes(kChunk, 4));
  EXPECT_EQ(t->Remove(Meta(3).key).code(), StatusCode::kFailedPrecondition);
  // Releasing the read lease makes key 4 the only victim.
  *read = std::move(t->Acquire(Meta(3).key, 7)).value();  // swap the lease to key 3
  ASSERT_TRUE(t->Put(Meta(5), Bytes(kChunk, 5)).ok());
  EXPECT_FALSE(t->Contains(Meta(4).key));
  EXPECT_TRUE(t->Contains(Meta(3).key));
  EXPECT_EQ(t->Stats().evictions, 1u);
}

TEST(CpuTierTest, WatermarksAndListener) {
  CpuTierOptions o = Small(10);
  o.high_watermark = 0.9;
  o.low_watermark = 0.5;
  o.eviction_policy = "lru";
  auto t = Make(o);
  std::vector<ChunkKey> evicted;
  t->SetEvictionListener([&](const ChunkKey& k) { evicted.push_back(k); });
  for (uint64_t i = 1; i <= 9; ++i) ASSERT_TRUE(t->Put(Meta(i), Bytes(kChunk, i)).ok());
  EXPECT_TRUE(evicted.empty()) << "at the high watermark, not above it";
  std::vector<std::byte> out(kChunk);
  ASSERT_TRUE(t->Get(Meta(1).key, 7, out).ok());  // key 1 becomes most recent
  ASSERT_TRUE(t->Put(Meta(10), Bytes(kChunk, 10)).ok());
  // Above 9 chunks: evict down to 5 including the new one -> 5 victims,
  // the least recently used ones.
  std::set<uint64_t> got;
  for (auto& k : evicted) got.insert(k.lo);
  EXPECT_EQ(got, (std::set<uint64_t>{2, 3, 4, 5, 6}));
  auto s = t->Stats();
  EXPECT_EQ(s.entries, 5u);
  EXPECT_EQ(s.used_bytes, 5 * kChunk);
  EXPECT_EQ(s.evictions, 5u);
  EXPECT_EQ(s.evicted_bytes, 5 * kChunk);
  for (uint64_t i : {1, 7, 8, 9, 10}) EXPECT_TRUE(t->Contains(Meta(i).key)) << i;
}

// A clock the test moves by hand: TTL tests need no sleeps.
struct FakeClock {
  std::shared_ptr<std::atomic<int64_t>> ms = std::make_shared<std::atomic<int64_t>>(1000);
  std::function<std::chrono::steady_clock::time_point()> Fn() const {
    return [ms = ms] { return std::chrono::steady_clock::time_point(std::chrono::milliseconds(ms->load())); };
  }
  void Advance(int64_t d) { ms->fetch_add(d); }
};

TEST(CpuTierTest, TtlExpiresEntries) {
  FakeClock clock;
  CpuTierOptions o = Small(4);
  o.ttl_ms = 300;
  o.now = clock.Fn();
  auto t = Make(o);
  std::vector<ChunkKey> evicted;
  t->SetEvictionListener([&](const ChunkKey& k) { evicted.push_back(k); });
  ASSERT_TRUE(t->Put(Meta(1), Bytes(kChunk, 1)).ok());
  ASSERT_TRUE(t->Put(Meta(2), Bytes(kChunk, 2)).ok());
  ASSERT_TRUE(t->Pin(Meta(2).key).ok());
  std::vector<std::byte> out(kChunk);
  clock.Advance(299);  // one millisecond before expiry: still a hit
  EXPECT_TRUE(t->Get(Meta(1).key, 7, out).ok());
  EXPECT_TRUE(t->Contains(Meta(1).key));
  clock.Advance(1);  // exactly ttl_ms after Commit: expired
  EXPECT_EQ(t->Get(Meta(1).key, 7, out).code(), StatusCode::kNotFound);
  EXPECT_FALSE(t->Contains(Meta(1).key));
  ASSERT_EQ(evicted.size(), 1u);
  EXPECT_EQ(evicted[0], Meta(1).key);
  // Pinned: a miss too, but its memory stays until unpinned.
  EXPECT_EQ(t->Get(Meta(2).key, 7, out).code(), StatusCode::kNotFound);
  EXPECT_EQ(t->Stats().used_bytes, kChunk);
  ASSERT_TRUE(t->Unpin(Meta(2).key).ok());
  // Re-putting an expired key replaces it, with a fresh TTL.
  ASSERT_TRUE(t->Put(Meta(2), Bytes(kChunk, 22)).ok());
  ASSERT_TRUE(t->Get(Meta(2).key, 7, out).ok());
  EXPECT_EQ(out, Bytes(kChunk, 22));
  EXPECT_EQ(t->Stats().entries, 1u);
  clock.Advance(299);
  EXPECT_TRUE(t->Get(Meta(2).key, 7, out).ok());
}

TEST(CpuTierTest, ExpiredEntriesAreSweptBeforePolicyEviction) {
  FakeClock clock;
  CpuTierOptions o = Small(4);
  o.ttl_ms = 1000;
  o.high_watermark = 1.0;
  o.low_watermark = 1.0;
  o.eviction_policy = "lru";
  o.now = clock.Fn();
  auto t = Make(o);
  std::vector<ChunkKey> evicted;
  t->SetEvictionListener([&](const ChunkKey& k) { evicted.push_back(k); });
  ASSERT_TRUE(t->Put(Meta(1), Bytes(kChunk, 1)).ok());
  ASSERT_TRUE(t->Put(Meta(2), Bytes(kChunk, 2)).ok());
  clock.Advance(500);
  ASSERT_TRUE(t->Put(Meta(3), Bytes(kChunk, 3)).ok());
  ASSERT_TRUE(t->Put(Meta(4), Bytes(kChunk, 4)).ok());
  clock.Advance(600);  // 1 and 2 expired, 3 and 4 not
  // Full: the new put takes the expired entries' space, not LRU victims.
  ASSERT_TRUE(t->Put(Meta(5), Bytes(kChunk, 5)).ok());
  std::set<uint64_t> got;
  for (auto& k : evicted) got.insert(k.lo);
  EXPECT_EQ(got, (std::set<uint64_t>{1, 2}));
  EXPECT_TRUE(t->Contains(Meta(3).key));
  EXPECT_TRUE(t->Contains(Meta(4).key));
  EXPECT_EQ(t->Stats().entries, 3u);
}

TEST(CpuTierTest, ClearDropsUnpinnedOnly) {
  auto t = Make(Small(4));
  for (uint64_t i = 1; i <= 3; ++i) ASSERT_TRUE(t->Put(Meta(i), Bytes(kChunk, i)).ok());
  ASSERT_TRUE(t->Pin(Meta(2).key).ok());
  t->Clear();
  EXPECT_FALSE(t->Contains(Meta(1).key));
  EXPECT_TRUE(t->Contains(Meta(2).key));
  EXPECT_EQ(t->Stats().entries, 1u);
  EXPECT_EQ(t->Stats().used_bytes, kChunk);
  EXPECT_EQ(t->Stats().evictions, 0u);
}

TEST(CpuTierTest, BadOptionsNameTheOption) {
  struct Case {
    CpuTierOptions o;
    const char* name;
  };
  std::vector<Case> cases;
  auto base = Small(4);
  { auto o = base; o.capacity_bytes = 0; cases.push_back({o, "capacity_bytes"}); }
  { auto o = base; o.chunk_bytes = 0; cases.push_back({o, "chunk_bytes"}); }
  { auto o = base; o.chunk_bytes = o.capacity_bytes + 1; cases.push_back({o, "chunk_bytes"}); }
  { auto o = base; o.high_watermark = 1.5; cases.push_back({o, "high_watermark"}); }
  { auto o = base; o.high_watermark = 0; cases.push_back({o, "high_watermark"}); }
  { auto o = base; o.low_watermark = 0.95; cases.push_back({o, "low_watermark"}); }
  { auto o = base; o.low_watermark = -1; cases.push_back({o, "low_watermark"}); }
  { auto o = base; o.eviction_policy = "arc"; cases.push_back({o, "lru, s3fifo"}); }
  { auto o = base; o.ttl_ms = ~0ull; cases.push_back({o, "ttl_ms"}); }
  { auto o = base; o.numa_node = 4096; cases.push_back({o, "numa_node"}); }
  { auto o = base; o.capacity_bytes = ~size_t{0} >> 1; cases.push_back({o, "physical memory"}); }
  for (const auto& c : cases) {
    auto t = CpuTier::Create(c.o);
    EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument) << c.name;
    EXPECT_NE(t.status().message().find(c.name), std::string_view::npos) << t.status().ToString();
  }
}

// Threads put, get, acquire, pin and remove over a key space larger than
// the tier, so evictions run all the time. Every chunk carries its key in
// its bytes; a read that sees another key's bytes (a block reused while
// still readable) fails the test.
TEST(CpuTierTest, ConcurrentStress) {
  constexpr size_t kStressChunk = 64 * kKiB;
  CpuTierOptions o = Small(16, kStressChunk);
  auto t = Make(o);
  std::atomic<uint64_t> notified{0};
  t->SetEvictionListener([&](const ChunkKey&) { notified.fetch_add(1, std::memory_order_relaxed); });
  std::atomic<int> bad{0};
  auto fill = [](std::span<std::byte> d, uint64_t k) {
    std::memset(d.data(), static_cast<int>(k & 0xff), d.size());
    std::memcpy(d.data(), &k, sizeof(k));
  };
  auto check = [](std::span<const std::byte> d, uint64_t k) {
    uint64_t got;
    std::memcpy(&got, d.data(), sizeof(got));
    return got == k && d[d.size() - 1] == static_cast<std::byte>(k & 0xff);
  };
  std::vector<std::thread> ts;
  for (int th = 0; th < 4; ++th) {
    ts.emplace_back([&, th] {
      std::mt19937 rng(th);
      std::vector<std::byte> buf(kStressChunk);
      for (int i = 0; i < 3000; ++i) {
        const uint64_t k = 1 + rng() % 48;
        const ChunkMeta m = Meta(k, k * 3);
        switch (rng() % 6) {
          case 0: {  // zero-copy put
            auto w = t->BeginPut(m, kStressChunk);
            if (w.ok()) {
              fill(w->data(), k);
              if (!t->Commit(std::move(*w)).ok()) bad.fetch_add(1);
            } else if (w.status().code() != StatusCode::kAlreadyExists &&
                       w.status().code() != StatusCode::kResourceExhausted) {
              bad.fetch_add(1);
            }
            break;
          }
          case 1: {
            fill(buf, k);
            Status s = t->Put(m, buf);
            if (!s.ok() && s.code() != StatusCode::kAlreadyExists && s.code() != StatusCode::kResourceExhausted) {
              bad.fetch_add(1);
            }
            break;
          }
          case 2: {
            Status s = t->Get(m.key, m.fingerprint, buf);
            if (s.ok() ? !check(buf, k)
                       : (s.code() != StatusCode::kNotFound && s.code() != StatusCode::kFailedPrecondition)) {
              bad.fetch_add(1);
            }
            break;
          }
          case 3: {  // hold a read lease across other threads' puts
            auto r = t->Acquire(m.key, m.fingerprint);
            if (r.ok()) {
              std::this_thread::yield();
              if (!check(r->data(), k)) bad.fetch_add(1);
            }
            break;
          }
          case 4:
            if (t->Pin(m.key).ok()) {
              std::this_thread::yield();
              if (!t->Unpin(m.key).ok()) bad.fetch_add(1);
            }
            break;
          case 5:
            (void)t->Remove(m.key);
            break;
        }
      }
    });
  }
  for (auto& th : ts) th.join();
  EXPECT_EQ(bad.load(), 0);
  auto s = t->Stats();
  EXPECT_EQ(s.evictions, notified.load());
  EXPECT_GT(s.evictions, 0u);
  size_t present = 0;
  for (uint64_t k = 1; k <= 48; ++k) present += t->Contains(Meta(k).key) ? 1 : 0;
  EXPECT_EQ(s.entries, present);
  EXPECT_EQ(s.used_bytes, present * kStressChunk);
  EXPECT_LE(s.used_bytes, s.capacity_bytes);
}

}  // namespace
}  // namespace kvtier
