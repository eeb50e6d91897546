// MemoryRegion: RAII owner of one anonymous mmap'd block of host memory.
//
// Layering (bottom of the memory stack, CacheLib-like):
//   MemoryRegion (owns pages) -> SlabAllocator (carves slabs, does not own)
//   -> allocation classes -> users (CpuTier, staging buffers).
// A region is the unit that later layers register with devices: cuda/ code
// calls cudaHostRegister(data(), size()) and the disk tier registers it as an
// io_uring fixed buffer. Neither needs anything beyond data()/size().
//
// Contract
// - Allocate() returns kInvalidArgument for 0 bytes, for sizes larger than
//   the machine's physical memory, for a NUMA node that does not exist, or for
//   huge pages requested (kOn) on a machine without a hugetlb pool; and
//   kResourceExhausted when the kernel refuses the mapping or the binding.
//   It never returns kNotFound.
// - size() is bytes rounded up to the page size actually used (4 KiB, or
//   2 MiB for hugetlb pages); data() is aligned to that page size.
// - Huge pages: kOn requires MAP_HUGETLB (fails otherwise); kAuto tries
//   MAP_HUGETLB, then transparent huge pages through madvise(MADV_HUGEPAGE),
//   then plain pages. huge_pages() reports whether either kind was obtained
//   (THP is advisory: the kernel may still back some ranges with 4 KiB pages).
// - NUMA: numa_node >= 0 binds the pages to that node (mbind MPOL_BIND)
//   before they are touched; -1 leaves placement to the kernel.
// - prefault touches every page up front (MAP_POPULATE plus a write pass), so
//   the first store into the region does not pay page faults. Caches want
//   this; scratch buffers usually do not.
// - The object is immutable after creation and safe to share across threads;
//   the bytes themselves are the users' to synchronise.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "cc/common/status.h"

namespace kvtier {

enum class HugePages : uint8_t { kOff, kOn, kAuto };

struct RegionOptions {
  size_t bytes = 0;
  int numa_node = -1;
  HugePages huge_pages = HugePages::kAuto;
  bool prefault = false;
};

class MemoryRegion {
 public:
  static StatusOr<std::unique_ptr<MemoryRegion>> Allocate(const RegionOptions& options);

  ~MemoryRegion();
  MemoryRegion(const MemoryRegion&) = delete;
  MemoryRegion& operator=(const MemoryRegion&) = delete;

  std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  bool huge_pages() const { return huge_pages_; }
  // True only for MAP_HUGETLB pages (guaranteed huge), not for THP.
  bool hugetlb() const { return hugetlb_; }
  int numa_node() const { return numa_node_; }

 private:
  MemoryRegion(std::byte* data, size_t size, bool huge, bool hugetlb, int node)
      : data_(data), size_(size), huge_pages_(huge), hugetlb_(hugetlb), numa_node_(node) {}

  std::byte* const data_;
  const size_t size_;
  const bool huge_pages_;
  const bool hugetlb_;
  const int numa_node_;
};

}  // namespace kvtier
