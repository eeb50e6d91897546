#include "cc/tiers/cpu/cpu_tier.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

namespace kvtier {
namespace {

std::string Num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

}  // namespace

StatusOr<std::unique_ptr<CpuTier>> CpuTier::Create(const CpuTierOptions& o) {
  if (o.capacity_bytes == 0) return InvalidArgument("CpuTier: capacity_bytes must be > 0");
  if (o.chunk_bytes == 0) return InvalidArgument("CpuTier: chunk_bytes must be > 0");
  if (o.chunk_bytes > o.capacity_bytes) {
    return InvalidArgument("CpuTier: chunk_bytes=" + std::to_string(o.chunk_bytes) + " exceeds capacity_bytes=" +
                           std::to_string(o.capacity_bytes));
  }
  if (!(o.high_watermark > 0.0 && o.high_watermark <= 1.0)) {
    return InvalidArgument("CpuTier: high_watermark must be in (0, 1], got " + Num(o.high_watermark));
  }
  if (!(o.low_watermark > 0.0 && o.low_watermark <= o.high_watermark)) {
    return InvalidArgument("CpuTier: low_watermark must be in (0, high_watermark=" + Num(o.high_watermark) +
                           "], got " + Num(o.low_watermark));
  }
  if (o.ttl_ms > uint64_t{365} * 24 * 3600 * 1000) {
    return InvalidArgument("CpuTier: ttl_ms=" + std::to_string(o.ttl_ms) + " is more than a year; use 0 for no TTL");
  }
  auto policy = MakeEvictionPolicy(o.eviction_policy);
  if (!policy.ok()) return policy.status().Annotate("CpuTier");

  auto tier = std::unique_ptr<CpuTier>(new CpuTier(o));
  tier->policy_ = std::move(policy).value();
  // A cache fills up anyway; faulting pages in now keeps page faults out of
  // the put path (and cudaHostRegister would pin them all regardless).
  auto region = MemoryRegion::Allocate(
      {.bytes = o.capacity_bytes, .numa_node = o.numa_node, .huge_pages = o.huge_pages, .prefault = o.prefault});
  if (!region.ok()) return region.status().Annotate("CpuTier");
  tier->region_ = std::move(region).value();
  // The region may be rounded up to a huge page; only capacity_bytes are used
  // so that the configured capacity is what the tier holds.
  SlabAllocatorOptions slab_options;
  slab_options.chunk_bytes = o.chunk_bytes;
  // Every size class in use holds at least one slab, so a small tier with
  // the allocator's default 4 MiB slabs could not hold a full chunk and a
  // partial one at once. Aim for >= 64 slabs (never below one chunk).
  const size_t chunk_class = (o.chunk_bytes + slab_options.alignment - 1) / slab_options.alignment *
                             slab_options.alignment;
  const size_t default_chunks_per_slab = ((size_t{4} << 20) + chunk_class - 1) / chunk_class;
  slab_options.slab_bytes =
      chunk_class * std::max<size_t>(1, std::min(default_chunks_per_slab, o.capacity_bytes / (64 * chunk_class)));
  auto alloc = SlabAllocator::Create(std::span<std::byte>(tier->region_->data(), o.capacity_bytes), slab_options);
  if (!alloc.ok()) return alloc.status().Annotate("CpuTier: chunk_bytes/capacity_bytes");
  tier->allocator_ = std::move(alloc).value();
  const auto total = static_cast<double>(tier->allocator_->GetStats().total_bytes);
  tier->high_bytes_ = static_cast<size_t>(std::floor(total * o.high_watermark));
  tier->low_bytes_ = static_cast<size_t>(std::floor(total * o.low_watermark));
  return tier;
}

CpuTier::~CpuTier() {
  for (auto& [key, e] : map_) allocator_->Free(e.alloc);
}

// ---- leases ----------------------------------------------------------------

CpuTier::WriteLease& CpuTier::WriteLease::operator=(WriteLease&& o) noexcept {
  if (this != &o) {
    Abort();
    tier_ = std::exchange(o.tier_, nullptr);
    meta_ = o.meta_;
    data_ = std::exchange(o.data_, {});
  }
  return *this;
}

void CpuTier::WriteLease::Abort() {
  if (tier_ != nullptr) std::exchange(tier_, nullptr)->AbortPut(meta_, data_.data());
}

CpuTier::ReadLease& CpuTier::ReadLease::operator=(ReadLease&& o) noexcept {
  if (this != &o) {
    Release();
    tier_ = std::exchange(o.tier_, nullptr);
    meta_ = o.meta_;
    data_ = std::exchange(o.data_, {});
  }
  return *this;
}

void CpuTier::ReadLease::Release() {
  if (tier_ != nullptr) std::exchange(tier_, nullptr)->ReleaseReadPin(meta_.key);
}

// ---- eviction ----------------------------------------------------------------

void CpuTier::DropLocked(Map::iterator it, std::vector<ChunkKey>* evicted, bool expired) {
  Entry& e = it->second;
  allocator_->Free(e.alloc);
  used_bytes_ -= e.alloc.capacity;
  --entries_;
  ++evictions_;
  if (expired) ++evictions_expired_;
  evicted_bytes_ += e.bytes;
  evicted->push_back(it->first);
  map_.erase(it);
}

bool CpuTier::EvictOneLocked(std::vector<ChunkKey>* evicted) {
  // Only committed entries are in the policy, so pins are all that can block.
  auto victim = policy_->NextVictim([this](const ChunkKey& k) {
    auto it = map_.find(k);
    return it != map_.end() && !it->second.pinned();
  });
  if (!victim) return false;
  DropLocked(map_.find(*victim), evicted, /*expired=*/false);
  return true;
}

void CpuTier::SweepExpiredLocked(Clock::time_point now, std::vector<ChunkKey>* evicted) {
  if (options_.ttl_ms == 0) return;
  for (auto it = map_.begin(); it != map_.end();) {
    auto next = std::next(it);
    if (!it->second.pinned() && Expired(it->second, now)) {
      policy_->OnRemove(it->first);
      DropLocked(it, evicted, /*expired=*/true);
    }
    it = next;
  }
}

void CpuTier::Notify(const std::vector<ChunkKey>& evicted) const {
  for (const ChunkKey& k : evicted) NotifyEvicted(k);
}

// ---- put ---------------------------------------------------------------------

StatusOr<CpuTier::WriteLease> CpuTier::BeginPut(const ChunkMeta& meta, size_t bytes) {
  if (meta.key.IsNull()) return InvalidArgument("CpuTier::BeginPut: null key");
  if (bytes == 0 || bytes > options_.chunk_bytes) {
    return InvalidArgument("CpuTier::BeginPut: bytes=" + std::to_string(bytes) + " must be in (0, chunk_bytes=" +
                           std::to_string(options_.chunk_bytes) + "]");
  }
  const size_t need = allocator_->CapacityFor(bytes);
  std::vector<ChunkKey> evicted;
  StatusOr<SlabAllocation> alloc = Internal("unset");
  {
    std::lock_guard<std::mutex> lock(mu_);
    const auto now = Now();
    auto it = map_.find(meta.key);
    if (it != map_.end()) {
      if (it->second.pinned() || !Expired(it->second, now)) {
        return AlreadyExists("CpuTier::BeginPut: key " + meta.key.ToHex() + " is present");
      }
      policy_->OnRemove(it->first);  // an expired copy gives way to the new one
      DropLocked(it, &evicted, /*expired=*/true);
    }
    if (used_bytes_ + need > high_bytes_) {
      SweepExpiredLocked(now, &evicted);
      while (used_bytes_ + need > low_bytes_ && EvictOneLocked(&evicted)) {
      }
    }
    for (;;) {
      alloc = allocator_->Allocate(bytes);
      if (alloc.ok() || alloc.status().code() != StatusCode::kResourceExhausted) break;
      // The class may lack a block although bytes are free elsewhere; each
      // eviction can return a whole slab to the pool.
      if (!EvictOneLocked(&evicted)) break;
    }
    if (alloc.ok()) {
      Entry e;
      e.meta = meta;
      e.alloc = *alloc;
      e.bytes = bytes;
      map_.emplace(meta.key, e);
      used_bytes_ += alloc->capacity;
    }
  }
  Notify(evicted);
  if (!alloc.ok()) {
    if (alloc.status().code() == StatusCode::kResourceExhausted) {
      return ResourceExhausted("CpuTier: no space for " + std::to_string(bytes) +
                               " bytes: everything left is pinned or in flight");
    }
    return alloc.status();
  }
  return WriteLease(this, meta, std::span<std::byte>(alloc->ptr, bytes));
}

Status CpuTier::CommitUncounted(WriteLease&& lease, bool held) {
  if (lease.tier_ != this) return InvalidArgument("CpuTier::Commit: lease is empty or from another tier");
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(lease.meta_.key);
    if (it == map_.end() || it->second.committed || it->second.alloc.ptr != lease.data_.data()) {
      return Internal("CpuTier::Commit: in-flight entry for " + lease.meta_.key.ToHex() + " vanished");
    }
    Entry& e = it->second;
    e.committed = true;
    if (held) ++e.holds;  // in the same critical section: never evictable in between
    e.last_used = Now();
    e.expires = e.last_used + std::chrono::milliseconds(options_.ttl_ms);
    ++entries_;
    policy_->OnInsert(e.meta.key, e.alloc.capacity);
  }
  lease.tier_ = nullptr;
  return Status::Ok();
}

void CpuTier::AbortPut(const ChunkMeta& meta, std::byte* ptr) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(meta.key);
  if (it == map_.end() || it->second.committed || it->second.alloc.ptr != ptr) return;
  allocator_->Free(it->second.alloc);
  used_bytes_ -= it->second.alloc.capacity;
  map_.erase(it);
}

Status CpuTier::Commit(WriteLease&& lease, bool held) {
  const uint64_t bytes = lease.data().size();
  Status s = CommitUncounted(std::move(lease), held);
  if (s.ok()) CountPut(bytes);
  return s;
}

Status CpuTier::ReleaseHold(const ChunkKey& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(key);
  if (it == map_.end() || !it->second.committed) return NotFound("CpuTier: " + key.ToHex() + " absent");
  if (it->second.holds == 0) return FailedPrecondition("CpuTier: " + key.ToHex() + " is not held");
  --it->second.holds;
  return Status::Ok();
}

StatusOr<CpuTier::ReadLease> CpuTier::Acquire(const ChunkKey& key, uint64_t fingerprint) {
  StatusOr<ReadLease> lease = AcquireUncounted(key, fingerprint);
  CountGet(lease.ok(), lease.ok() ? lease->data().size() : 0);
  return lease;
}

Status CpuTier::PutImpl(const ChunkMeta& meta, std::span<const std::byte> data) {
  KVT_ASSIGN_OR_RETURN(WriteLease lease, BeginPut(meta, data.size()));
  std::memcpy(lease.data().data(), data.data(), data.size());  // outside the lock
  return CommitUncounted(std::move(lease), false);
}

// ---- get ---------------------------------------------------------------------

StatusOr<CpuTier::ReadLease> CpuTier::AcquireUncounted(const ChunkKey& key, uint64_t fingerprint) {
  std::vector<ChunkKey> evicted;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(key);
    if (it == map_.end()) return NotFound("CpuTier: " + key.ToHex() + " absent");
    Entry& e = it->second;
    if (!e.committed) return FailedPrecondition("CpuTier: " + key.ToHex() + " is still being written");
    const Clock::time_point now = Now();
    if (Expired(e, now)) {
      if (!e.pinned()) {
        policy_->OnRemove(key);
        DropLocked(it, &evicted, /*expired=*/true);
      }
    } else if (e.meta.fingerprint != fingerprint) {
      return NotFound("CpuTier: " + key.ToHex() + " fingerprint mismatch");
    } else {
      ++e.lease_pins;
      e.last_used = now;
      policy_->OnAccess(key);
      return ReadLease(this, e.meta, std::span<const std::byte>(e.alloc.ptr, e.bytes));
    }
  }
  Notify(evicted);
  return NotFound("CpuTier: " + key.ToHex() + " expired");
}

void CpuTier::ReleaseReadPin(const ChunkKey& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(key);
  if (it != map_.end() && it->second.lease_pins > 0) --it->second.lease_pins;
}

Status CpuTier::GetImpl(const ChunkKey& key, uint64_t fingerprint, std::span<std::byte> dst) {
  KVT_ASSIGN_OR_RETURN(ReadLease lease, AcquireUncounted(key, fingerprint));
  if (dst.size() != lease.data().size()) {
    return InvalidArgument("CpuTier::Get: destination is " + std::to_string(dst.size()) + " bytes, chunk is " +
                           std::to_string(lease.data().size()));
  }
  std::memcpy(dst.data(), lease.data().data(), dst.size());  // under a pin, outside the lock
  return Status::Ok();
}

// ---- the rest of the Tier interface -------------------------------------------

StatusOr<size_t> CpuTier::SizeOfImpl(const ChunkKey& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(key);
  if (it == map_.end() || !it->second.committed || Expired(it->second, Now())) {
    return NotFound("CpuTier: " + key.ToHex() + " absent");
  }
  return it->second.bytes;
}

StatusOr<ChunkMeta> CpuTier::GetMeta(const ChunkKey& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(key);
  if (it == map_.end() || !it->second.committed || Expired(it->second, Now())) {
    return NotFound("CpuTier: " + key.ToHex() + " absent");
  }
  return it->second.meta;
}

std::optional<std::chrono::steady_clock::time_point> CpuTier::LastUsed(const ChunkKey& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(key);
  if (it == map_.end() || !it->second.committed || Expired(it->second, Now())) return std::nullopt;
  return it->second.last_used;
}

std::vector<ChunkKey> CpuTier::Keys() const {
  std::vector<ChunkKey> keys;
  std::lock_guard<std::mutex> lock(mu_);
  keys.reserve(entries_);
  for (const auto& [k, e] : map_) {
    if (e.committed) keys.push_back(k);
  }
  return keys;
}

Status CpuTier::RemoveImpl(const ChunkKey& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(key);
  if (it == map_.end() || !it->second.committed) return NotFound("CpuTier: " + key.ToHex() + " absent");
  if (it->second.pinned()) return FailedPrecondition("CpuTier: " + key.ToHex() + " is pinned");
  policy_->OnRemove(key);
  allocator_->Free(it->second.alloc);
  used_bytes_ -= it->second.alloc.capacity;
  --entries_;
  map_.erase(it);
  return Status::Ok();
}

Status CpuTier::PinImpl(const ChunkKey& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(key);
  if (it == map_.end() || !it->second.committed || Expired(it->second, Now())) {
    return NotFound("CpuTier: " + key.ToHex() + " absent");
  }
  ++it->second.user_pins;
  return Status::Ok();
}

Status CpuTier::UnpinImpl(const ChunkKey& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(key);
  if (it == map_.end() || !it->second.committed) return NotFound("CpuTier: " + key.ToHex() + " absent");
  // Only user pins: a lease or a hold is released by its owner alone.
  if (it->second.user_pins == 0) return FailedPrecondition("CpuTier: " + key.ToHex() + " is not pinned");
  --it->second.user_pins;
  return Status::Ok();
}

void CpuTier::ClearImpl() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = map_.begin(); it != map_.end();) {
    auto next = std::next(it);
    Entry& e = it->second;
    if (e.committed && !e.pinned()) {
      policy_->OnRemove(it->first);
      allocator_->Free(e.alloc);
      used_bytes_ -= e.alloc.capacity;
      --entries_;
      map_.erase(it);
    }
    it = next;
  }
}

void CpuTier::FillStatsImpl(TierStats* s) const {
  std::lock_guard<std::mutex> lock(mu_);
  s->capacity_bytes = options_.capacity_bytes;
  s->used_bytes = used_bytes_;
  s->entries = entries_;
  s->evictions = evictions_;
  s->evictions_expired = evictions_expired_;
  s->evicted_bytes = evicted_bytes_;
}

}  // namespace kvtier
