#include "cc/memory/memory_region.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <limits>

namespace kvtier {
namespace {

TEST(MemoryRegionTest, AllocatesWritableAlignedMemory) {
  auto r = MemoryRegion::Allocate({.bytes = 3 << 20, .huge_pages = HugePages::kOff, .prefault = true});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_GE((*r)->size(), size_t{3} << 20);
  EXPECT_EQ(reinterpret_cast<uintptr_t>((*r)->data()) % 4096, 0u);
  EXPECT_FALSE((*r)->huge_pages());
  std::memset((*r)->data(), 0xAB, (*r)->size());
  EXPECT_EQ((*r)->data()[(*r)->size() - 1], std::byte{0xAB});
}

TEST(MemoryRegionTest, AutoHugePagesRoundsToTwoMiB) {
  auto r = MemoryRegion::Allocate({.bytes = 1, .huge_pages = HugePages::kAuto});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ((*r)->size(), size_t{2} << 20);
  (*r)->data()[0] = std::byte{1};
}

TEST(MemoryRegionTest, HugePagesOnFailsClearlyOrGivesHugetlb) {
  auto r = MemoryRegion::Allocate({.bytes = 2 << 20, .huge_pages = HugePages::kOn});
  if (r.ok()) {
    EXPECT_TRUE((*r)->hugetlb());
  } else {
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("huge_pages"), std::string_view::npos);
  }
}

TEST(MemoryRegionTest, RejectsBadSizes) {
  auto zero = MemoryRegion::Allocate({.bytes = 0});
  EXPECT_EQ(zero.status().code(), StatusCode::kInvalidArgument);
  auto huge = MemoryRegion::Allocate({.bytes = std::numeric_limits<size_t>::max() / 2});
  EXPECT_EQ(huge.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(huge.status().message().find("physical memory"), std::string_view::npos);
}

TEST(MemoryRegionTest, NumaNodeZeroBindsOrNonexistentNodeFails) {
  auto r0 = MemoryRegion::Allocate({.bytes = 1 << 20, .numa_node = 0, .prefault = true});
  if (r0.ok()) {
    EXPECT_EQ((*r0)->numa_node(), 0);
  } else {
    // Machines without NUMA support say so rather than crash.
    EXPECT_EQ(r0.status().code(), StatusCode::kInvalidArgument) << r0.status().ToString();
  }
  auto bad = MemoryRegion::Allocate({.bytes = 1 << 20, .numa_node = 999});
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("999"), std::string_view::npos);
  auto neg = MemoryRegion::Allocate({.bytes = 1 << 20, .numa_node = -7});
  EXPECT_EQ(neg.status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvtier
