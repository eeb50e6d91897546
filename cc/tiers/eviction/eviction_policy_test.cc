#include "cc/tiers/eviction/eviction_policy.h"

#include <gtest/gtest.h>

#include <set>
#include <string>
#include <unordered_set>

#include "cc/tiers/eviction/lru_policy.h"
#include "cc/tiers/eviction/s3fifo_policy.h"

namespace kvtier {
namespace {

ChunkKey K(uint64_t i) { return ChunkKey{i, 0x5eed}; }
bool Any(const ChunkKey&) { return true; }

// A count-limited cache driven only by the policy, like a tier with uniform
// chunks. Returns whether the access hit.
struct Sim {
  EvictionPolicy* policy;
  size_t capacity;
  std::unordered_set<ChunkKey, ChunkKeyHash> present;
  bool Access(const ChunkKey& k) {
    if (present.count(k) != 0) {
      policy->OnAccess(k);
      return true;
    }
    while (present.size() >= capacity) {
      auto v = policy->NextVictim(Any);
      EXPECT_TRUE(v.has_value());
      EXPECT_EQ(present.erase(*v), 1u) << "victim not in the cache";
    }
    present.insert(k);
    policy->OnInsert(k, 1);
    return false;
  }
};

TEST(EvictionPolicyTest, FactoryAcceptsKnownNamesOnly) {
  auto lru = MakeEvictionPolicy("lru");
  ASSERT_TRUE(lru.ok());
  EXPECT_EQ((*lru)->name(), "lru");
  auto s3 = MakeEvictionPolicy("s3fifo");
  ASSERT_TRUE(s3.ok());
  EXPECT_EQ((*s3)->name(), "s3fifo");
  auto bad = MakeEvictionPolicy("LRU2");
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("LRU2"), std::string_view::npos);
  EXPECT_NE(bad.status().message().find("lru, s3fifo"), std::string_view::npos);
  EXPECT_EQ(MakeEvictionPolicy("").status().code(), StatusCode::kInvalidArgument);
}

TEST(LruPolicyTest, EvictsLeastRecentlyUsedFirst) {
  LruPolicy p;
  for (uint64_t i = 1; i <= 4; ++i) p.OnInsert(K(i), 100);
  p.OnAccess(K(1));
  p.OnAccess(K(3));
  std::vector<uint64_t> order;
  while (auto v = p.NextVictim(Any)) order.push_back(v->lo);
  EXPECT_EQ(order, (std::vector<uint64_t>{2, 4, 1, 3}));
  EXPECT_EQ(p.size(), 0u);
}

TEST(LruPolicyTest, SkipsUnevictableWithoutLosingThem) {
  LruPolicy p;
  for (uint64_t i = 1; i <= 3; ++i) p.OnInsert(K(i), 1);
  auto not_one = [](const ChunkKey& k) { return k.lo != 1; };
  EXPECT_EQ(p.NextVictim(not_one)->lo, 2u);
  EXPECT_EQ(p.NextVictim(not_one)->lo, 3u);
  EXPECT_FALSE(p.NextVictim(not_one).has_value());
  EXPECT_EQ(p.size(), 1u);
  EXPECT_EQ(p.NextVictim(Any)->lo, 1u);
}

TEST(LruPolicyTest, RemoveAndDuplicateInsertAreHandled) {
  LruPolicy p;
  p.OnInsert(K(1), 1);
  p.OnInsert(K(2), 1);
  p.OnInsert(K(1), 1);  // duplicate: ignored, not a second entry
  EXPECT_EQ(p.size(), 2u);
  p.OnRemove(K(1));
  p.OnRemove(K(99));  // untracked: ignored
  p.OnAccess(K(99));
  EXPECT_EQ(p.NextVictim(Any)->lo, 2u);
  EXPECT_FALSE(p.NextVictim(Any).has_value());
}

TEST(S3FifoPolicyTest, NewKeysEnterSmallAndOneHitKeysGoToGhost) {
  S3FifoPolicy p;
  for (uint64_t i = 1; i <= 10; ++i) p.OnInsert(K(i), 1);
  EXPECT_EQ(p.QueueOf(K(1)), 0);
  p.OnAccess(K(2));
  // Key 1 is the oldest and was never reused: first victim, remembered.
  EXPECT_EQ(p.NextVictim(Any)->lo, 1u);
  EXPECT_TRUE(p.InGhost(K(1)));
  // Key 2 was reused: promoted to main rather than evicted.
  EXPECT_EQ(p.NextVictim(Any)->lo, 3u);
  EXPECT_EQ(p.QueueOf(K(2)), 1);
  // A ghost hit on insert goes straight to main.
  p.OnInsert(K(1), 1);
  EXPECT_EQ(p.QueueOf(K(1)), 1);
  EXPECT_FALSE(p.InGhost(K(1)));
}

TEST(S3FifoPolicyTest, MainUsesFrequencyAsSecondChances) {
  S3FifoPolicy p;
  // Route A and B into main through ghost: evicted once unused, then back.
  p.OnInsert(K(1), 1);
  p.OnInsert(K(2), 1);
  EXPECT_EQ(p.NextVictim(Any)->lo, 1u);
  EXPECT_EQ(p.NextVictim(Any)->lo, 2u);
  p.OnInsert(K(1), 1);
  p.OnInsert(K(2), 1);
  ASSERT_EQ(p.QueueOf(K(1)), 1);
  ASSERT_EQ(p.QueueOf(K(2)), 1);
  // A is older in main but was used: it gets a second chance, B goes first.
  p.OnAccess(K(1));
  EXPECT_EQ(p.NextVictim(Any)->lo, 2u);
  EXPECT_EQ(p.NextVictim(Any)->lo, 1u);
  EXPECT_FALSE(p.InGhost(K(1))) << "main evictions are not remembered";
}

TEST(S3FifoPolicyTest, SkipsUnevictableInBothQueues) {
  S3FifoPolicy p;
  for (uint64_t i = 1; i <= 5; ++i) p.OnInsert(K(i), 1);
  p.OnAccess(K(5));
  auto only_five = [](const ChunkKey& k) { return k.lo == 5; };
  auto v = p.NextVictim(only_five);
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(v->lo, 5u);  // promoted to main first, then evicted from main
  EXPECT_FALSE(p.NextVictim(only_five).has_value());
  EXPECT_EQ(p.size(), 4u);
  std::set<uint64_t> rest;
  while (auto r = p.NextVictim(Any)) rest.insert(r->lo);
  EXPECT_EQ(rest, (std::set<uint64_t>{1, 2, 3, 4}));
}

// Scan resistance: a hot set that keeps getting hit survives a long one-hit
// scan under S3-FIFO, while LRU loses all of it. (The LRU half shows the
// scenario is hard enough to fail.)
size_t HotSurvivorsAfterScan(EvictionPolicy* p) {
  Sim sim{p, 100, {}};
  for (int round = 0; round < 5; ++round) {
    for (uint64_t h = 0; h < 50; ++h) sim.Access(K(h));
  }
  for (uint64_t s = 0; s < 1000; ++s) {
    sim.Access(K(1'000'000 + s));
    if (s % 50 == 0) sim.Access(K(s % 50));  // the hot set is still used, rarely
  }
  size_t survivors = 0;
  for (uint64_t h = 0; h < 50; ++h) survivors += sim.present.count(K(h));
  return survivors;
}

TEST(S3FifoPolicyTest, OneHitScanDoesNotFlushHotSet) {
  S3FifoPolicy s3;
  EXPECT_GE(HotSurvivorsAfterScan(&s3), 45u);
  LruPolicy lru;
  EXPECT_LE(HotSurvivorsAfterScan(&lru), 5u);
}

class AnyPolicyTest : public ::testing::TestWithParam<std::string> {};

TEST_P(AnyPolicyTest, EveryKeyLeavesExactlyOnceAndPinnedNever) {
  auto p = std::move(MakeEvictionPolicy(GetParam())).value();
  for (uint64_t i = 0; i < 200; ++i) p->OnInsert(K(i), 1 + i % 7);
  for (uint64_t i = 0; i < 200; i += 3) p->OnAccess(K(i));
  for (uint64_t i = 0; i < 200; i += 10) p->OnRemove(K(i));
  auto unpinned = [](const ChunkKey& k) { return k.lo % 4 != 1; };
  std::set<uint64_t> out;
  while (auto v = p->NextVictim(unpinned)) {
    EXPECT_TRUE(out.insert(v->lo).second) << "returned twice: " << v->lo;
    EXPECT_NE(v->lo % 4, 1u);
    EXPECT_NE(v->lo % 10, 0u) << "removed key came back";
  }
  size_t pinned = 0, removed_or_pinned = 0;
  for (uint64_t i = 0; i < 200; ++i) {
    if (i % 10 == 0 || i % 4 == 1) ++removed_or_pinned;
    if (i % 4 == 1 && i % 10 != 0) ++pinned;
  }
  EXPECT_EQ(out.size(), 200 - removed_or_pinned);
  EXPECT_EQ(p->size(), pinned);
  // Unpinned later, they all come out.
  size_t late = 0;
  while (p->NextVictim(Any)) ++late;
  EXPECT_EQ(late, pinned);
}

INSTANTIATE_TEST_SUITE_P(Policies, AnyPolicyTest, ::testing::Values("lru", "s3fifo"));

}  // namespace
}  // namespace kvtier
