// CpuTier: chunks in host DRAM (the "open shelves"), one MemoryRegion carved
// by a SlabAllocator, ordered for eviction by a pluggable EvictionPolicy.
//
// Layering: CpuTier -> {MemoryRegion -> SlabAllocator} + EvictionPolicy.
// memory() exposes the whole region so that cuda/ can cudaHostRegister it
// and the disk tier can register it with io_uring; chunk bytes never move
// once placed, so such registrations stay valid for the tier's lifetime.
//
// Contract (in addition to tier.h)
// - Zero-copy put: BeginPut reserves space and returns a WriteLease; the
//   entry is "in flight": invisible to Get/Acquire/SizeOf/Contains (Acquire
//   says kFailedPrecondition), never evicted, and a second BeginPut of the
//   key gets kAlreadyExists. Commit publishes it; a lease destroyed without
//   Commit frees the space.
// - Zero-copy get: Acquire returns a ReadLease that holds a pin until it is
//   destroyed; the bytes it shows cannot be evicted, removed or reused while
//   it lives. Leases must not outlive the tier.
// - Eviction: when a reservation would take used bytes above high_watermark
//   * capacity, or the allocator has no block, entries are evicted through
//   the policy until used bytes + the reservation <= low_watermark *
//   capacity (or the allocation succeeds). Pinned and in-flight entries are
//   skipped; if nothing else is left the call returns kResourceExhausted.
//   Each eviction and each TTL expiry is reported through NotifyEvicted,
//   called after the tier's lock is released.
// - Pins by owner. An entry is pinned (never evicted, removed, cleared or
//   reused) while any of three independent counts is non-zero:
//     user pins   Tier::Pin / Unpin (nest; Unpin of an entry without user
//                 pins is kFailedPrecondition);
//     lease pins  one per live ReadLease, released only by the lease;
//     holds       Commit(lease, /*held=*/true) until ReleaseHold (the
//                 engine's write-behind: on its way to a lower tier).
//   No owner can release another owner's pin: an Unpin can never end a
//   reader's lease, which is what keeps the bytes under a scatter in place.
// - TTL (ttl_ms > 0): an entry older than ttl_ms (from Commit) is a miss; it
//   is reclaimed when met (unless pinned) and swept before policy eviction.
//   Time comes from options.now (steady_clock by default), so tests can move
//   it without sleeping.
// - Last use: each committed entry records when it was committed or last
//   acquired (options.now), for the engine's clear(older_than) (LastUsed).
// - used_bytes counts slab capacities (what the memory really holds, in-flight
//   reservations included); entries counts committed entries. Both exact.
//
// Concurrency: every method is thread-safe. One mutex guards the map, the
// policy and the counters; it is held for O(1) work per call (plus the
// evictions a put triggers). Chunk bytes are copied outside the lock: Put
// copies between BeginPut and Commit, Get copies under a pin.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "cc/common/chunk_key.h"
#include "cc/common/status.h"
#include "cc/memory/memory_region.h"
#include "cc/memory/slab_allocator.h"
#include "cc/tiers/eviction/eviction_policy.h"
#include "cc/tiers/tier.h"

namespace kvtier {

struct CpuTierOptions {
  size_t capacity_bytes = 0;
  size_t chunk_bytes = 0;  // largest chunk; the slab full class
  double high_watermark = 0.90, low_watermark = 0.80;
  std::string eviction_policy = "s3fifo";
  uint64_t ttl_ms = 0;  // 0 = no TTL
  // The TTL's clock; empty: std::chrono::steady_clock::now. For tests that
  // move time instead of sleeping. Called under the tier's lock: it must be
  // cheap and must not call back into the tier.
  std::function<std::chrono::steady_clock::time_point()> now;
  int numa_node = -1;
  HugePages huge_pages = HugePages::kAuto;
  // Touch every page at creation: no page faults on the first puts, at the
  // price of committing capacity_bytes of RSS up front. Off by default so a
  // generous capacity costs only what is used.
  bool prefault = false;
};

class CpuTier final : public Tier {
 public:
  // kInvalidArgument naming the offending option; kResourceExhausted if the
  // memory cannot be mapped.
  static StatusOr<std::unique_ptr<CpuTier>> Create(const CpuTierOptions& options);
  ~CpuTier() override;

  class WriteLease {
   public:
    WriteLease(WriteLease&& o) noexcept { *this = std::move(o); }
    WriteLease& operator=(WriteLease&& o) noexcept;
    ~WriteLease() { Abort(); }
    std::span<std::byte> data() const { return data_; }
    const ChunkMeta& meta() const { return meta_; }

   private:
    friend class CpuTier;
    WriteLease(CpuTier* t, const ChunkMeta& m, std::span<std::byte> d) : tier_(t), meta_(m), data_(d) {}
    void Abort();
    CpuTier* tier_ = nullptr;
    ChunkMeta meta_;
    std::span<std::byte> data_;
  };

  class ReadLease {
   public:
    ReadLease(ReadLease&& o) noexcept { *this = std::move(o); }
    ReadLease& operator=(ReadLease&& o) noexcept;
    ~ReadLease() { Release(); }
    std::span<const std::byte> data() const { return data_; }
    const ChunkMeta& meta() const { return meta_; }

   private:
    friend class CpuTier;
    ReadLease(CpuTier* t, const ChunkMeta& m, std::span<const std::byte> d) : tier_(t), meta_(m), data_(d) {}
    void Release();
    CpuTier* tier_ = nullptr;
    ChunkMeta meta_;
    std::span<const std::byte> data_;
  };

  // kOk, kAlreadyExists (committed or in flight), kInvalidArgument (bytes 0
  // or > chunk_bytes, null key), kResourceExhausted. Never kNotFound.
  StatusOr<WriteLease> BeginPut(const ChunkMeta& meta, size_t bytes);
  // kOk, or kInvalidArgument for an empty (moved-from/committed) lease or one
  // from another tier.
  // held: the entry becomes visible already holding one hold (released with
  // ReleaseHold, never by Unpin), so it cannot be evicted between Commit and
  // the moment its holder is done with it.
  Status Commit(WriteLease&& lease, bool held = false);
  // Releases one hold taken by Commit(..., true). kNotFound (absent),
  // kFailedPrecondition (no hold).
  Status ReleaseHold(const ChunkKey& key);
  // kOk, kNotFound (absent, fingerprint mismatch, expired),
  // kFailedPrecondition (in flight). Never kInvalidArgument.
  StatusOr<ReadLease> Acquire(const ChunkKey& key, uint64_t fingerprint);
  // Acquire for the engine's own copies out of the tier (the remote tier's
  // uploads): the same lease, not counted as a get, so the tier's hit
  // statistics count only reads that serve a request.
  StatusOr<ReadLease> AcquireUncounted(const ChunkKey& key, uint64_t fingerprint);

  // The meta of a committed, unexpired entry; kNotFound otherwise. Counts
  // no get (it reads no chunk bytes).
  StatusOr<ChunkMeta> GetMeta(const ChunkKey& key) const;

  // When a committed, unexpired entry was committed or last acquired;
  // nullopt otherwise. Counts nothing.
  std::optional<std::chrono::steady_clock::time_point> LastUsed(const ChunkKey& key) const;
  // Keys of every committed entry (expired ones too: they still hold slab
  // memory until met). A snapshot taken under the lock, O(entries); for
  // the engine's verify, not a hot path.
  std::vector<ChunkKey> Keys() const;

  std::span<std::byte> memory() const { return {region_->data(), region_->size()}; }
  const CpuTierOptions& options() const { return options_; }
  bool huge_pages() const { return region_->huge_pages(); }

 private:
  using Clock = std::chrono::steady_clock;
  struct Entry {
    ChunkMeta meta;
    SlabAllocation alloc;
    size_t bytes = 0;
    // Pins by owner (see the contract); evictable only when all are zero.
    uint32_t user_pins = 0;
    uint32_t lease_pins = 0;
    uint32_t holds = 0;
    bool committed = false;
    bool pinned() const { return user_pins != 0 || lease_pins != 0 || holds != 0; }
    Clock::time_point expires;  // meaningful when ttl_ms > 0 and committed
    Clock::time_point last_used;  // Commit or the last Acquire
  };
  using Map = std::unordered_map<ChunkKey, Entry, ChunkKeyHash>;

  explicit CpuTier(const CpuTierOptions& o) : Tier(TierKind::kCpu, "cpu"), options_(o) {}

  // Commit without counting (Put counts through Tier).
  Status CommitUncounted(WriteLease&& lease, bool held);
  Status PutImpl(const ChunkMeta& meta, std::span<const std::byte> data) override;
  Status GetImpl(const ChunkKey& key, uint64_t fingerprint, std::span<std::byte> dst) override;
  StatusOr<size_t> SizeOfImpl(const ChunkKey& key) const override;
  Status RemoveImpl(const ChunkKey& key) override;
  Status PinImpl(const ChunkKey& key) override;
  Status UnpinImpl(const ChunkKey& key) override;
  void ClearImpl() override;
  void FillStatsImpl(TierStats* s) const override;

  Clock::time_point Now() const { return options_.now ? options_.now() : Clock::now(); }
  // All *Locked helpers run under mu_.
  bool Expired(const Entry& e, Clock::time_point now) const {
    return options_.ttl_ms != 0 && e.committed && now >= e.expires;
  }
  // Drops a committed entry that left by policy and records its key for
  // NotifyEvicted.
  // expired: it left by TTL (counted apart from capacity evictions).
  void DropLocked(Map::iterator it, std::vector<ChunkKey>* evicted, bool expired);
  bool EvictOneLocked(std::vector<ChunkKey>* evicted);
  void SweepExpiredLocked(Clock::time_point now, std::vector<ChunkKey>* evicted);
  void Notify(const std::vector<ChunkKey>& evicted) const;
  void AbortPut(const ChunkMeta& meta, std::byte* ptr);
  void ReleaseReadPin(const ChunkKey& key);

  const CpuTierOptions options_;
  size_t high_bytes_ = 0, low_bytes_ = 0;
  std::unique_ptr<MemoryRegion> region_;
  std::unique_ptr<SlabAllocator> allocator_;

  mutable std::mutex mu_;
  Map map_;
  std::unique_ptr<EvictionPolicy> policy_;
  size_t used_bytes_ = 0;
  size_t entries_ = 0;  // committed
  uint64_t evictions_ = 0, evictions_expired_ = 0, evicted_bytes_ = 0;
};

}  // namespace kvtier
