// SlabAllocator: fixed-size-class allocator over memory it does not own.
//
// Layering (after CacheLib): region -> slabs -> allocation classes.
//   - The caller owns the memory (a MemoryRegion, a CUDA-pinned block, an
//     RDMA-registered block) and keeps it alive longer than the allocator.
//   - The memory is cut into equal slabs of slab_bytes (the last one may be
//     shorter: a region of k * chunk_bytes yields exactly k full chunks).
//   - Each slab, once taken, belongs to one allocation class and is carved
//     into blocks of that class's capacity. Classes: the full-chunk class
//     (chunk_bytes rounded up to alignment) plus partial-chunk classes.
//
// Contract
// - Allocate(bytes) hands out a block of the smallest class whose capacity
//   >= bytes. Returns kInvalidArgument (bytes == 0 or > chunk_bytes) or
//   kResourceExhausted (no block and no slab left for that class, even after
//   reclaiming empty slabs of other classes). Never kNotFound.
// - Free(a) takes exactly what Allocate returned, once. Freeing anything else
//   is a bug and aborts when detectable (pointer outside the memory,
//   misaligned for its class).
// - Every block is aligned to `alignment` (default 4 KiB: O_DIRECT and DMA).
// - Accounting is exact: used_bytes is the sum of capacities handed out and
//   not freed (exact whenever no call is in progress; a snapshot taken during
//   concurrent calls reads each class's counter independently).
// - No fragmentation with uniform chunks: full-chunk allocations use every
//   byte of every slab when slab_bytes is a multiple of the chunk capacity.
//
// Progress and memory ordering
// - Fast path is lock-free: a per-class free list (Treiber stack of block
//   indices, head tagged with a 32-bit counter against ABA) and a per-class
//   carve cursor (slab, next block) advanced by CAS. Free() is lock-free.
// - Slow path (class needs a fresh slab) takes one mutex: it pops a slab from
//   the pool or, when the pool is empty, reclaims slabs of other classes all
//   of whose blocks are free (drains that class's free list, returns the
//   fully-free slabs, pushes the rest back). A concurrent fast-path
//   allocation of the drained class may fail over to the slow path and wait.
// - A block's bytes written by the freeing thread happen-before any write by
//   the next owner: Free publishes with a release CAS on the list head and
//   Allocate pops with acquire; slab hand-over goes through the mutex and a
//   release store of the carve cursor.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "cc/common/status.h"

namespace kvtier {

struct SlabAllocatorOptions {
  size_t chunk_bytes = 0;               // the full-chunk class; also the largest allocation
  std::vector<size_t> partial_classes;  // empty -> chunk_bytes/2, /4, ... while >= 64 KiB
  size_t slab_bytes = 0;                // 0 -> the smallest multiple of the chunk class >= 4 MiB
  size_t alignment = 4096;              // power of two
};

struct SlabAllocation {
  std::byte* ptr = nullptr;
  size_t capacity = 0;
  uint32_t size_class = 0;
};

class SlabAllocator {
 public:
  // kInvalidArgument for a zero chunk size, a non-power-of-two alignment,
  // partial classes outside (0, chunk_bytes], a slab smaller than a chunk or
  // not a multiple of the alignment, or memory too small for one block.
  static StatusOr<std::unique_ptr<SlabAllocator>> Create(std::span<std::byte> memory,
                                                         const SlabAllocatorOptions& options);
  ~SlabAllocator();
  SlabAllocator(const SlabAllocator&) = delete;
  SlabAllocator& operator=(const SlabAllocator&) = delete;

  StatusOr<SlabAllocation> Allocate(size_t bytes);
  void Free(const SlabAllocation& allocation);

  struct Stats {
    size_t total_bytes = 0;  // bytes under management (after alignment)
    size_t used_bytes = 0;   // sum of capacities handed out
    size_t slabs_total = 0;
    size_t slabs_free = 0;  // slabs owned by no class
    std::vector<size_t> class_capacity;
    std::vector<size_t> class_in_use;  // blocks handed out per class
  };
  Stats GetStats() const;

  size_t num_classes() const { return num_classes_; }
  size_t class_capacity(uint32_t c) const { return classes_[c].capacity; }
  size_t slab_bytes() const { return slab_bytes_; }
  // Capacity of the block Allocate(bytes) would return, or 0 if bytes is out
  // of range. Lets callers account before allocating.
  size_t CapacityFor(size_t bytes) const;

 private:
  struct alignas(64) Class {
    size_t capacity = 0;
    // (tag << 32) | (block index + 1); low half 0 = empty.
    std::atomic<uint64_t> free_head{0};
    // ((slab + 1) << 32) | next block to carve; 0 = no slab being carved.
    std::atomic<uint64_t> carve{0};
    std::atomic<int64_t> in_use{0};
  };
  static constexpr uint32_t kNoClass = ~0u;

  SlabAllocator() = default;

  int ClassFor(size_t bytes) const;
  bool TryPop(Class& c, uint32_t* block);
  bool TryCarve(Class& c, uint32_t* block);
  void PushChain(Class& c, uint32_t first, uint32_t last);
  StatusOr<uint32_t> AllocateSlow(uint32_t cls);
  void ReclaimLocked(uint32_t cls);  // mu_ held
  bool TakeSlabLocked(size_t min_len, uint32_t* slab);
  uint32_t BlocksIn(uint32_t slab, size_t capacity) const { return static_cast<uint32_t>(SlabLen(slab) / capacity); }
  size_t SlabLen(uint32_t slab) const { return slab + 1 == num_slabs_ ? last_slab_len_ : slab_bytes_; }
  SlabAllocation MakeAllocation(uint32_t cls, uint32_t block) const;

  std::byte* base_ = nullptr;
  size_t total_bytes_ = 0;
  size_t slab_bytes_ = 0;
  size_t last_slab_len_ = 0;
  uint32_t num_slabs_ = 0;
  uint32_t blocks_per_slab_ = 0;  // index stride: slab_bytes / smallest class
  size_t chunk_bytes_ = 0;
  uint32_t num_classes_ = 0;
  std::unique_ptr<Class[]> classes_;
  std::unique_ptr<std::atomic<uint32_t>[]> next_;  // free-list links, by block index

  mutable std::mutex mu_;  // slow path: slab pool and slab ownership
  std::vector<uint32_t> free_slabs_;
  std::vector<uint32_t> slab_owner_;
};

}  // namespace kvtier
