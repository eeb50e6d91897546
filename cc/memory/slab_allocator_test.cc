#include "cc/memory/slab_allocator.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "cc/memory/memory_region.h"

namespace kvtier {
namespace {

constexpr size_t kKiB = 1024;
constexpr size_t kMiB = 1024 * 1024;

std::unique_ptr<MemoryRegion> Region(size_t bytes) {
  auto r = MemoryRegion::Allocate({.bytes = bytes, .huge_pages = HugePages::kOff});
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return std::move(r).value();
}

std::unique_ptr<SlabAllocator> Make(const MemoryRegion& r, SlabAllocatorOptions o) {
  auto a = SlabAllocator::Create(std::span<std::byte>(r.data(), r.size()), o);
  EXPECT_TRUE(a.ok()) << a.status().ToString();
  return std::move(a).value();
}

TEST(SlabAllocatorTest, DefaultClassesHalveDownTo64KiB) {
  auto r = Region(8 * kMiB);
  auto a = Make(*r, {.chunk_bytes = kMiB});
  auto s = a->GetStats();
  EXPECT_EQ(s.class_capacity, (std::vector<size_t>{64 * kKiB, 128 * kKiB, 256 * kKiB, 512 * kKiB, kMiB}));
  EXPECT_EQ(s.slabs_total, 2u);  // default slab: 4 MiB
  EXPECT_EQ(s.total_bytes, 8 * kMiB);
}

TEST(SlabAllocatorTest, UniformChunksFillRegionExactly) {
  // 10 chunks with 4 MiB slabs: two full slabs and a 2 MiB tail slab.
  auto r = Region(10 * kMiB);
  auto a = Make(*r, {.chunk_bytes = kMiB});
  std::vector<SlabAllocation> got;
  for (int i = 0; i < 10; ++i) {
    auto x = a->Allocate(kMiB);
    ASSERT_TRUE(x.ok()) << i << " " << x.status().ToString();
    got.push_back(*x);
  }
  auto full = a->Allocate(kMiB);
  EXPECT_EQ(full.status().code(), StatusCode::kResourceExhausted);
  auto s = a->GetStats();
  EXPECT_EQ(s.used_bytes, 10 * kMiB);
  EXPECT_EQ(s.used_bytes, s.total_bytes);
  EXPECT_EQ(s.slabs_free, 0u);
  std::set<std::byte*> distinct;
  for (auto& g : got) distinct.insert(g.ptr);
  EXPECT_EQ(distinct.size(), 10u);
  for (auto& g : got) a->Free(g);
  EXPECT_EQ(a->GetStats().used_bytes, 0u);
}

TEST(SlabAllocatorTest, ExactAccountingAndSmallestFittingClass) {
  auto r = Region(16 * kMiB);
  auto a = Make(*r, {.chunk_bytes = kMiB});
  auto x = a->Allocate(1);
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(x->capacity, 64 * kKiB);
  auto y = a->Allocate(64 * kKiB + 1);
  ASSERT_TRUE(y.ok());
  EXPECT_EQ(y->capacity, 128 * kKiB);
  auto z = a->Allocate(kMiB);
  ASSERT_TRUE(z.ok());
  EXPECT_EQ(z->capacity, kMiB);
  auto s = a->GetStats();
  EXPECT_EQ(s.used_bytes, 64 * kKiB + 128 * kKiB + kMiB);
  EXPECT_EQ(s.class_in_use, (std::vector<size_t>{1, 1, 0, 0, 1}));
  EXPECT_EQ(s.slabs_free, 1u);  // three classes took one slab each
  a->Free(*y);
  s = a->GetStats();
  EXPECT_EQ(s.used_bytes, 64 * kKiB + kMiB);
  EXPECT_EQ(s.class_in_use, (std::vector<size_t>{1, 0, 0, 0, 1}));
  a->Free(*x);
  a->Free(*z);
  EXPECT_EQ(a->GetStats().used_bytes, 0u);
}

TEST(SlabAllocatorTest, BlocksAreAlignedAndDisjoint) {
  auto r = Region(16 * kMiB);  // three classes, each needs its own ~4 MiB slab
  auto a = Make(*r, {.chunk_bytes = 100000, .partial_classes = {5000, 30000}, .alignment = 8192});
  std::vector<SlabAllocation> all;
  for (size_t bytes : {1ul, 5000ul, 5001ul, 30000ul, 99999ul, 100000ul}) {
    auto x = a->Allocate(bytes);
    ASSERT_TRUE(x.ok());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(x->ptr) % 8192, 0u);
    EXPECT_GE(x->capacity, bytes);
    EXPECT_EQ(x->capacity % 8192, 0u);
    all.push_back(*x);
  }
  for (size_t i = 0; i < all.size(); ++i) {
    for (size_t j = i + 1; j < all.size(); ++j) {
      const bool overlap = all[i].ptr < all[j].ptr + all[j].capacity && all[j].ptr < all[i].ptr + all[i].capacity;
      EXPECT_FALSE(overlap) << i << " " << j;
    }
    EXPECT_GE(all[i].ptr, r->data());
    EXPECT_LE(all[i].ptr + all[i].capacity, r->data() + r->size());
  }
  for (auto& x : all) a->Free(x);
}

TEST(SlabAllocatorTest, ExhaustionThenRecoveryAfterFree) {
  auto r = Region(4 * kMiB);
  auto a = Make(*r, {.chunk_bytes = kMiB, .slab_bytes = kMiB});
  std::vector<SlabAllocation> got;
  for (int i = 0; i < 4; ++i) got.push_back(*a->Allocate(kMiB));
  auto fail = a->Allocate(kMiB);
  EXPECT_EQ(fail.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(a->Allocate(1).status().code(), StatusCode::kResourceExhausted);
  a->Free(got[2]);
  auto again = a->Allocate(kMiB);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->ptr, got[2].ptr);
}

TEST(SlabAllocatorTest, EmptySlabsMoveBetweenClasses) {
  // All memory goes to the 64 KiB class, is freed, and must then be usable
  // for full chunks: slabs are reclaimed, not stranded.
  auto r = Region(4 * kMiB);
  auto a = Make(*r, {.chunk_bytes = kMiB, .slab_bytes = kMiB});
  std::vector<SlabAllocation> small;
  for (;;) {
    auto x = a->Allocate(64 * kKiB);
    if (!x.ok()) {
      EXPECT_EQ(x.status().code(), StatusCode::kResourceExhausted);
      break;
    }
    small.push_back(*x);
  }
  ASSERT_EQ(small.size(), 64u);
  EXPECT_EQ(a->Allocate(kMiB).status().code(), StatusCode::kResourceExhausted);
  // Free all but one block of the first slab: three slabs become reclaimable.
  for (size_t i = 1; i < small.size(); ++i) a->Free(small[i]);
  std::vector<SlabAllocation> big;
  for (int i = 0; i < 3; ++i) {
    auto x = a->Allocate(kMiB);
    ASSERT_TRUE(x.ok()) << i << " " << x.status().ToString();
    big.push_back(*x);
  }
  EXPECT_EQ(a->Allocate(kMiB).status().code(), StatusCode::kResourceExhausted);
  // The remaining small slab still serves its class.
  auto again = a->Allocate(64 * kKiB);
  ASSERT_TRUE(again.ok());
  auto s = a->GetStats();
  EXPECT_EQ(s.used_bytes, 3 * kMiB + 2 * 64 * kKiB);
  a->Free(small[0]);
  a->Free(*again);
  for (auto& b : big) a->Free(b);
  EXPECT_EQ(a->GetStats().used_bytes, 0u);
}

TEST(SlabAllocatorTest, RejectsBadArguments) {
  auto r = Region(4 * kMiB);
  std::span<std::byte> mem(r->data(), r->size());
  EXPECT_EQ(SlabAllocator::Create(mem, {.chunk_bytes = 0}).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SlabAllocator::Create(mem, {.chunk_bytes = kMiB, .alignment = 3000}).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(SlabAllocator::Create(mem, {.chunk_bytes = kMiB, .partial_classes = {2 * kMiB}}).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(SlabAllocator::Create(mem, {.chunk_bytes = kMiB, .partial_classes = {0}}).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(SlabAllocator::Create(mem, {.chunk_bytes = kMiB, .slab_bytes = kMiB / 2}).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(SlabAllocator::Create(mem.first(1000), {.chunk_bytes = kMiB}).status().code(),
            StatusCode::kInvalidArgument);
  auto a = Make(*r, {.chunk_bytes = kMiB});
  auto zero = a->Allocate(0);
  EXPECT_EQ(zero.status().code(), StatusCode::kInvalidArgument);
  auto big = a->Allocate(kMiB + 1);
  EXPECT_EQ(big.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(big.status().message().find("1048577"), std::string_view::npos);
  EXPECT_EQ(a->GetStats().used_bytes, 0u);
}

TEST(SlabAllocatorDeathTest, FreeOfForeignPointerAborts) {
  auto r = Region(4 * kMiB);
  auto a = Make(*r, {.chunk_bytes = kMiB});
  std::byte local[16];
  EXPECT_DEATH(a->Free({local, kMiB, 4}), "outside");
}

// Threads allocate mixed sizes, stamp every byte they own with their id,
// verify the stamp before freeing: a block handed to two owners at once is
// caught by a mismatched stamp. The memory is small, so the slow path (slab
// hand-over and reclaim between classes) runs constantly.
TEST(SlabAllocatorTest, ConcurrentAllocFreeNeverHandsOutABlockTwice) {
  auto r = Region(8 * kMiB);
  auto a = Make(*r, {.chunk_bytes = 256 * kKiB, .partial_classes = {4 * kKiB, 64 * kKiB}, .slab_bytes = kMiB});
  constexpr int kThreads = 4;
  constexpr int kOps = 20000;
  std::atomic<int> bad{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t) {
    ts.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::vector<SlabAllocation> mine;
      const auto stamp = static_cast<unsigned char>(t + 1);
      for (int i = 0; i < kOps; ++i) {
        if (mine.size() < 12 && (rng() % 3 != 0 || mine.empty())) {
          static constexpr size_t kSizes[] = {100, 4096, 5000, 64 * 1024, 200 * 1024};
          auto x = a->Allocate(kSizes[rng() % 5]);
          if (!x.ok()) {
            if (x.status().code() != StatusCode::kResourceExhausted) bad.fetch_add(1, std::memory_order_relaxed);
            continue;
          }
          // Stamp the first and last 64 bytes (cheap under TSAN, still
          // catches overlapping owners of the same block).
          std::memset(x->ptr, stamp, 64);
          std::memset(x->ptr + x->capacity - 64, stamp, 64);
          mine.push_back(*x);
        } else {
          const size_t k = rng() % mine.size();
          SlabAllocation x = mine[k];
          mine[k] = mine.back();
          mine.pop_back();
          for (size_t j = 0; j < 64; ++j) {
            if (static_cast<unsigned char>(x.ptr[j]) != stamp ||
                static_cast<unsigned char>(x.ptr[x.capacity - 64 + j]) != stamp) {
              bad.fetch_add(1, std::memory_order_relaxed);
              break;
            }
          }
          a->Free(x);
        }
      }
      for (auto& x : mine) a->Free(x);
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(bad.load(), 0);
  auto s = a->GetStats();
  EXPECT_EQ(s.used_bytes, 0u);
  for (size_t n : s.class_in_use) EXPECT_EQ(n, 0u);
  // Everything is free again, so every chunk of the region is obtainable.
  std::vector<SlabAllocation> all;
  for (;;) {
    auto x = a->Allocate(256 * kKiB);
    if (!x.ok()) break;
    all.push_back(*x);
  }
  EXPECT_EQ(all.size(), 8 * kMiB / (256 * kKiB));
  for (auto& x : all) a->Free(x);
}

}  // namespace
}  // namespace kvtier
