#include "cc/memory/slab_allocator.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace kvtier {
namespace {

constexpr size_t kMinDefaultPartial = size_t{64} << 10;
constexpr size_t kDefaultSlabTarget = size_t{4} << 20;
constexpr size_t kMaxClasses = 64;

size_t RoundUp(size_t v, size_t a) { return (v + a - 1) / a * a; }

uint64_t Tag(uint64_t head) { return head >> 32; }
uint32_t IndexPlusOne(uint64_t head) { return static_cast<uint32_t>(head); }
uint64_t MakeHead(uint64_t tag, uint32_t index_plus_one) { return (tag << 32) | index_plus_one; }

[[noreturn]] void Die(const char* what) {
  std::fprintf(stderr, "SlabAllocator::Free: %s\n", what);
  std::abort();
}

}  // namespace

SlabAllocator::~SlabAllocator() = default;

StatusOr<std::unique_ptr<SlabAllocator>> SlabAllocator::Create(std::span<std::byte> memory,
                                                               const SlabAllocatorOptions& o) {
  if (o.chunk_bytes == 0) return InvalidArgument("SlabAllocator: chunk_bytes must be > 0");
  if (o.alignment == 0 || (o.alignment & (o.alignment - 1)) != 0) {
    return InvalidArgument("SlabAllocator: alignment must be a power of two, got " + std::to_string(o.alignment));
  }
  const size_t full = RoundUp(o.chunk_bytes, o.alignment);
  std::vector<size_t> caps;
  if (o.partial_classes.empty()) {
    for (size_t c = o.chunk_bytes / 2; c >= kMinDefaultPartial; c /= 2) caps.push_back(RoundUp(c, o.alignment));
  } else {
    for (size_t c : o.partial_classes) {
      if (c == 0 || c > o.chunk_bytes) {
        return InvalidArgument("SlabAllocator: partial class " + std::to_string(c) + " must be in (0, chunk_bytes=" +
                               std::to_string(o.chunk_bytes) + "]");
      }
      caps.push_back(RoundUp(c, o.alignment));
    }
  }
  caps.push_back(full);
  std::sort(caps.begin(), caps.end());
  caps.erase(std::unique(caps.begin(), caps.end()), caps.end());
  if (caps.size() > kMaxClasses) return InvalidArgument("SlabAllocator: more than 64 size classes");

  size_t slab = o.slab_bytes;
  if (slab == 0) {
    slab = full * ((kDefaultSlabTarget + full - 1) / full);
  } else if (slab < full || slab % o.alignment != 0) {
    return InvalidArgument("SlabAllocator: slab_bytes=" + std::to_string(slab) +
                           " must be >= the chunk class (" + std::to_string(full) + ") and a multiple of alignment");
  }

  auto a = std::unique_ptr<SlabAllocator>(new SlabAllocator());
  const auto raw = reinterpret_cast<uintptr_t>(memory.data());
  const uintptr_t aligned = RoundUp(raw, o.alignment);
  const size_t lost = aligned - raw;
  const size_t usable = memory.size() > lost ? memory.size() - lost : 0;
  if (memory.data() == nullptr || usable < caps.front()) {
    return InvalidArgument("SlabAllocator: memory of " + std::to_string(memory.size()) +
                           " bytes holds no block of the smallest class (" + std::to_string(caps.front()) + ")");
  }
  size_t n = (usable + slab - 1) / slab;
  size_t last = usable - (n - 1) * slab;
  if (last < caps.front()) {  // a tail too short for any block is not a slab
    --n;
    last = slab;
  }
  const size_t per_slab = slab / caps.front();
  if (n * per_slab >= (uint64_t{1} << 32) - 1) {
    return InvalidArgument("SlabAllocator: too many blocks for 32-bit indices; use larger partial classes");
  }
  a->base_ = reinterpret_cast<std::byte*>(aligned);
  a->total_bytes_ = (n - 1) * slab + last;
  a->slab_bytes_ = slab;
  a->last_slab_len_ = last;
  a->num_slabs_ = static_cast<uint32_t>(n);
  a->blocks_per_slab_ = static_cast<uint32_t>(per_slab);
  a->chunk_bytes_ = o.chunk_bytes;
  a->num_classes_ = static_cast<uint32_t>(caps.size());
  a->classes_ = std::make_unique<Class[]>(caps.size());
  for (size_t i = 0; i < caps.size(); ++i) a->classes_[i].capacity = caps[i];
  a->next_ = std::make_unique<std::atomic<uint32_t>[]>(n * per_slab);
  a->slab_owner_.assign(n, kNoClass);
  // Popped from the back: slab 0 first, the short tail slab last.
  for (size_t s = n; s-- > 0;) a->free_slabs_.push_back(static_cast<uint32_t>(s));
  return a;
}

int SlabAllocator::ClassFor(size_t bytes) const {
  if (bytes == 0 || bytes > chunk_bytes_) return -1;
  for (uint32_t i = 0; i < num_classes_; ++i) {
    if (classes_[i].capacity >= bytes) return static_cast<int>(i);
  }
  return -1;
}

size_t SlabAllocator::CapacityFor(size_t bytes) const {
  const int c = ClassFor(bytes);
  return c < 0 ? 0 : classes_[c].capacity;
}

SlabAllocation SlabAllocator::MakeAllocation(uint32_t cls, uint32_t block) const {
  const uint32_t slab = block / blocks_per_slab_;
  const uint32_t i = block % blocks_per_slab_;
  const size_t cap = classes_[cls].capacity;
  return SlabAllocation{base_ + size_t{slab} * slab_bytes_ + size_t{i} * cap, cap, cls};
}

bool SlabAllocator::TryPop(Class& c, uint32_t* block) {
  // acquire: pairs with the release CAS in PushChain, so next_[top] and the
  // freeing thread's writes to the block are visible here.
  uint64_t head = c.free_head.load(std::memory_order_acquire);
  while (IndexPlusOne(head) != 0) {
    const uint32_t top = IndexPlusOne(head) - 1;
    // relaxed: if `top` was popped and re-pushed meanwhile this value may be
    // stale, but then the tag has moved and the CAS below fails.
    const uint32_t next = next_[top].load(std::memory_order_relaxed);
    // acquire on success: same pairing as the load above (the RMW chain of
    // pushes and pops forms one release sequence).
    if (c.free_head.compare_exchange_weak(head, MakeHead(Tag(head) + 1, next), std::memory_order_acquire,
                                          std::memory_order_acquire)) {
      *block = top;
      return true;
    }
  }
  return false;
}

bool SlabAllocator::TryCarve(Class& c, uint32_t* block) {
  // acquire: pairs with the release store in AllocateSlow that installs a slab.
  uint64_t cur = c.carve.load(std::memory_order_acquire);
  while (cur != 0) {
    const uint32_t slab = static_cast<uint32_t>(cur >> 32) - 1;
    const uint32_t next = static_cast<uint32_t>(cur);
    if (next >= BlocksIn(slab, c.capacity)) return false;
    // acquire on success: pairs with the same installing release store.
    if (c.carve.compare_exchange_weak(cur, cur + 1, std::memory_order_acquire, std::memory_order_acquire)) {
      *block = slab * blocks_per_slab_ + next;
      return true;
    }
  }
  return false;
}

void SlabAllocator::PushChain(Class& c, uint32_t first, uint32_t last) {
  // relaxed load: the CAS validates it.
  uint64_t head = c.free_head.load(std::memory_order_relaxed);
  do {
    // relaxed: published by the release CAS below.
    next_[last].store(IndexPlusOne(head), std::memory_order_relaxed);
    // release: pairs with the acquire in TryPop / ReclaimLocked, handing the
    // block bytes and the link to the next owner.
  } while (!c.free_head.compare_exchange_weak(head, MakeHead(Tag(head) + 1, first + 1), std::memory_order_release,
                                              std::memory_order_relaxed));
}

StatusOr<SlabAllocation> SlabAllocator::Allocate(size_t bytes) {
  const int ci = ClassFor(bytes);
  if (ci < 0) {
    return InvalidArgument("SlabAllocator::Allocate: bytes=" + std::to_string(bytes) + " must be in (0, " +
                           std::to_string(chunk_bytes_) + "]");
  }
  const auto cls = static_cast<uint32_t>(ci);
  Class& c = classes_[cls];
  uint32_t block;
  if (!TryPop(c, &block) && !TryCarve(c, &block)) {
    KVT_ASSIGN_OR_RETURN(block, AllocateSlow(cls));
  }
  // relaxed: a statistic; nothing is ordered by it.
  c.in_use.fetch_add(1, std::memory_order_relaxed);
  return MakeAllocation(cls, block);
}

void SlabAllocator::Free(const SlabAllocation& a) {
  if (a.size_class >= num_classes_) Die("bad size class");
  Class& c = classes_[a.size_class];
  if (a.ptr < base_ || a.ptr >= base_ + total_bytes_) Die("pointer outside the managed memory");
  const size_t off = static_cast<size_t>(a.ptr - base_);
  const size_t slab = off / slab_bytes_;
  const size_t in_slab = off % slab_bytes_;
  if (in_slab % c.capacity != 0) Die("pointer not at a block boundary of its class");
  const auto block = static_cast<uint32_t>(slab * blocks_per_slab_ + in_slab / c.capacity);
  // relaxed: a statistic.
  c.in_use.fetch_sub(1, std::memory_order_relaxed);
  PushChain(c, block, block);
}

bool SlabAllocator::TakeSlabLocked(size_t min_len, uint32_t* slab) {
  for (size_t i = free_slabs_.size(); i-- > 0;) {
    if (SlabLen(free_slabs_[i]) >= min_len) {
      *slab = free_slabs_[i];
      free_slabs_.erase(free_slabs_.begin() + static_cast<ptrdiff_t>(i));
      return true;
    }
  }
  return false;
}

StatusOr<uint32_t> SlabAllocator::AllocateSlow(uint32_t cls) {
  std::lock_guard<std::mutex> lock(mu_);
  Class& c = classes_[cls];
  uint32_t block;
  // Another thread may have installed a slab or freed blocks while we waited.
  if (TryPop(c, &block) || TryCarve(c, &block)) return block;
  uint32_t slab;
  if (!TakeSlabLocked(c.capacity, &slab)) {
    for (uint32_t other = 0; other < num_classes_; ++other) {
      if (other != cls) ReclaimLocked(other);
    }
    if (!TakeSlabLocked(c.capacity, &slab)) {
      return ResourceExhausted("SlabAllocator: no free block or slab for class " + std::to_string(cls) + " (" +
                               std::to_string(c.capacity) + " bytes)");
    }
  }
  slab_owner_[slab] = cls;
  // The old cursor is exhausted (checked by TryCarve under mu_, and only the
  // slow path resets it), so no carver can race this store.
  // release: pairs with the acquire load/CAS in TryCarve.
  c.carve.store((uint64_t{slab} + 1) << 32 | 1, std::memory_order_release);
  return slab * blocks_per_slab_;
}

void SlabAllocator::ReclaimLocked(uint32_t cls) {
  Class& c = classes_[cls];
  // acq_rel: acquire pairs with the release store that installed the slab;
  // concurrent carvers now fail over to the slow path (blocked on mu_).
  const uint64_t carve = c.carve.exchange(0, std::memory_order_acq_rel);
  uint64_t head = c.free_head.load(std::memory_order_relaxed);
  // acquire: pairs with the release CAS of every Free that pushed a block.
  while (!c.free_head.compare_exchange_weak(head, MakeHead(Tag(head) + 1, 0), std::memory_order_acquire,
                                            std::memory_order_relaxed)) {
  }
  std::vector<uint32_t> blocks;
  std::vector<uint32_t> free_count(num_slabs_, 0);
  for (uint32_t p = IndexPlusOne(head); p != 0;) {
    const uint32_t b = p - 1;
    blocks.push_back(b);
    ++free_count[b / blocks_per_slab_];
    // relaxed: the list is private now and its links were published by the
    // release CASes acquired above.
    p = next_[b].load(std::memory_order_relaxed);
  }
  uint32_t carve_slab = kNoClass;
  uint32_t carved = 0;
  if (carve != 0) {
    carve_slab = static_cast<uint32_t>(carve >> 32) - 1;
    carved = static_cast<uint32_t>(carve);
    for (uint32_t i = carved; i < BlocksIn(carve_slab, c.capacity); ++i) {
      blocks.push_back(carve_slab * blocks_per_slab_ + i);
      ++free_count[carve_slab];
    }
  }
  std::vector<bool> reclaimed(num_slabs_, false);
  for (uint32_t s = 0; s < num_slabs_; ++s) {
    if (slab_owner_[s] != cls) continue;
    if (free_count[s] == BlocksIn(s, c.capacity)) {
      reclaimed[s] = true;
      slab_owner_[s] = kNoClass;
      free_slabs_.push_back(s);
    }
  }
  // Push back what stays with this class as one chain.
  uint32_t first = kNoClass, last = kNoClass;
  for (uint32_t b : blocks) {
    if (reclaimed[b / blocks_per_slab_]) continue;
    if (first == kNoClass) {
      first = last = b;
    } else {
      // relaxed: published by PushChain's release CAS.
      next_[last].store(b + 1, std::memory_order_relaxed);
      last = b;
    }
  }
  if (first != kNoClass) PushChain(c, first, last);
}

SlabAllocator::Stats SlabAllocator::GetStats() const {
  Stats s;
  s.total_bytes = total_bytes_;
  s.slabs_total = num_slabs_;
  for (uint32_t i = 0; i < num_classes_; ++i) {
    // relaxed: statistics only.
    const auto n = static_cast<size_t>(std::max<int64_t>(0, classes_[i].in_use.load(std::memory_order_relaxed)));
    s.class_capacity.push_back(classes_[i].capacity);
    s.class_in_use.push_back(n);
    s.used_bytes += n * classes_[i].capacity;
  }
  std::lock_guard<std::mutex> lock(mu_);
  s.slabs_free = free_slabs_.size();
  return s;
}

}  // namespace kvtier
