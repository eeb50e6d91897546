// Tier: one level of the storage hierarchy (CPU DRAM, local disk, remote).
//
// Layering: Engine -> Tier (this interface) -> device specifics. The engine
// keeps the catalogue (cc/index: key -> which tiers hold it); each tier keeps
// its own placement (where in its memory / file the bytes are) privately.
//
// Contract
// - A chunk is identified by ChunkKey and carries a 64-bit fingerprint (a
//   second, independent hash of the same tokens). Get() compares the stored
//   fingerprint with the caller's; a mismatch is reported as kNotFound (a hash
//   collision is a miss, never wrong data).
// - Put() copies the bytes in; the caller's buffer may be reused as soon as it
//   returns. Get() copies the bytes out into a buffer of exactly the stored
//   size. Tiers never hand out pointers into their storage through this
//   interface (zero-copy access is tier-specific, e.g. CpuTier::Acquire).
// - Thread safety: every method may be called concurrently from any thread.
// - Public methods are non-virtual: they validate arguments and count stats
//   once, then call the private *Impl hooks (CacheLib's device pattern).
// - Pinned entries (Pin count > 0) and entries being written are never
//   evicted. Eviction is the only way a tier loses a committed chunk; every
//   eviction is reported to the listener so the catalogue stays true.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>

#include "cc/common/chunk_key.h"
#include "cc/common/status.h"

namespace kvtier {

enum class TierKind : uint8_t { kCpu = 0, kDisk = 1, kRemote = 2 };
inline constexpr int kMaxTiers = 4;

// Describes one chunk as the engine files it.
struct ChunkMeta {
  ChunkKey key;
  uint64_t fingerprint = 0;  // second hash, checked on every Get
  uint64_t layout_id = 0;    // hash of the KV layout the bytes came from
  uint32_t num_tokens = 0;   // tokens in this chunk (partial last chunk < chunk size)
};

struct TierStats {
  uint64_t capacity_bytes = 0;
  uint64_t used_bytes = 0;
  uint64_t entries = 0;
  uint64_t puts = 0;
  uint64_t put_bytes = 0;
  uint64_t gets = 0;
  uint64_t get_hits = 0;
  uint64_t get_bytes = 0;
  uint64_t evictions = 0;
  uint64_t evictions_expired = 0;  // of evictions: TTL expiry (the rest left for capacity)
  uint64_t evicted_bytes = 0;
  uint64_t errors = 0;  // I/O errors, checksum failures, rejected puts
};

class Tier {
 public:
  // Called (from the evicting thread, without tier locks held) when a
  // committed chunk leaves the tier by policy (eviction, TTL expiry).
  using EvictionListener = std::function<void(const ChunkKey&)>;

  virtual ~Tier() = default;
  Tier(const Tier&) = delete;
  Tier& operator=(const Tier&) = delete;

  TierKind kind() const { return kind_; }
  std::string_view name() const { return name_; }

  // Returns kOk, kAlreadyExists (same key committed; data untouched),
  // kInvalidArgument (empty data / larger than the tier), kResourceExhausted
  // (no space even after eviction: everything left is pinned or in flight),
  // kIoError. Never kNotFound.
  Status Put(const ChunkMeta& meta, std::span<const std::byte> data);

  // Returns kOk, kNotFound (absent, or fingerprint mismatch, or expired),
  // kFailedPrecondition (the chunk is still being written),
  // kInvalidArgument (dst.size() != stored size), kDataLoss (the bytes
  // failed their checksum; the entry is dropped), kIoError.
  Status Get(const ChunkKey& key, uint64_t fingerprint, std::span<std::byte> dst);

  // Stored size in bytes, or kNotFound.
  StatusOr<size_t> SizeOf(const ChunkKey& key) const;
  bool Contains(const ChunkKey& key) const { return SizeOf(key).ok(); }

  // kOk or kNotFound. Removing a pinned chunk returns kFailedPrecondition.
  Status Remove(const ChunkKey& key);

  // Pin counts nest. kNotFound if absent.
  Status Pin(const ChunkKey& key);
  Status Unpin(const ChunkKey& key);

  // Drops every unpinned chunk (not reported as evictions).
  void Clear();

  TierStats Stats() const;

  void SetEvictionListener(EvictionListener l) { listener_ = std::move(l); }

 protected:
  Tier(TierKind kind, std::string name) : kind_(kind), name_(std::move(name)) {}
  void NotifyEvicted(const ChunkKey& key) const {
    if (listener_) listener_(key);
  }
  // Implementations count their own capacity/used/entries/evictions here.
  virtual void FillStatsImpl(TierStats* s) const = 0;
  // For transfers that bypass Put/Get (zero-copy leases, batched I/O), so
  // Stats() still counts every chunk that moved.
  void CountPut(uint64_t bytes) const {
    puts_.fetch_add(1, std::memory_order_relaxed);
    put_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  }
  void CountGet(bool hit, uint64_t bytes) const {
    gets_.fetch_add(1, std::memory_order_relaxed);
    if (hit) {
      get_hits_.fetch_add(1, std::memory_order_relaxed);
      get_bytes_.fetch_add(bytes, std::memory_order_relaxed);
    }
  }

 private:
  virtual Status PutImpl(const ChunkMeta& meta, std::span<const std::byte> data) = 0;
  virtual Status GetImpl(const ChunkKey& key, uint64_t fingerprint, std::span<std::byte> dst) = 0;
  virtual StatusOr<size_t> SizeOfImpl(const ChunkKey& key) const = 0;
  virtual Status RemoveImpl(const ChunkKey& key) = 0;
  virtual Status PinImpl(const ChunkKey& key) = 0;
  virtual Status UnpinImpl(const ChunkKey& key) = 0;
  virtual void ClearImpl() = 0;

  const TierKind kind_;
  const std::string name_;
  EvictionListener listener_;

  mutable std::atomic<uint64_t> puts_{0}, put_bytes_{0}, gets_{0}, get_hits_{0}, get_bytes_{0}, errors_{0};
};

}  // namespace kvtier
