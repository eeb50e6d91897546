#include "cc/tiers/tier.h"

namespace kvtier {

Status Tier::Put(const ChunkMeta& meta, std::span<const std::byte> data) {
  if (data.empty()) return InvalidArgument(std::string(name_) + ": Put of an empty chunk");
  if (meta.key.IsNull()) return InvalidArgument(std::string(name_) + ": Put with the null key");
  puts_.fetch_add(1, std::memory_order_relaxed);
  Status s = PutImpl(meta, data);
  if (s.ok()) {
    put_bytes_.fetch_add(data.size(), std::memory_order_relaxed);
  } else if (s.code() != StatusCode::kAlreadyExists) {
    errors_.fetch_add(1, std::memory_order_relaxed);
  }
  return s;
}

Status Tier::Get(const ChunkKey& key, uint64_t fingerprint, std::span<std::byte> dst) {
  gets_.fetch_add(1, std::memory_order_relaxed);
  Status s = GetImpl(key, fingerprint, dst);
  if (s.ok()) {
    get_hits_.fetch_add(1, std::memory_order_relaxed);
    get_bytes_.fetch_add(dst.size(), std::memory_order_relaxed);
  } else if (s.code() == StatusCode::kDataLoss || s.code() == StatusCode::kIoError) {
    errors_.fetch_add(1, std::memory_order_relaxed);
  }
  return s;
}

StatusOr<size_t> Tier::SizeOf(const ChunkKey& key) const { return SizeOfImpl(key); }
Status Tier::Remove(const ChunkKey& key) { return RemoveImpl(key); }
Status Tier::Pin(const ChunkKey& key) { return PinImpl(key); }
Status Tier::Unpin(const ChunkKey& key) { return UnpinImpl(key); }
void Tier::Clear() { ClearImpl(); }

TierStats Tier::Stats() const {
  TierStats s;
  FillStatsImpl(&s);
  s.puts = puts_.load(std::memory_order_relaxed);
  s.put_bytes = put_bytes_.load(std::memory_order_relaxed);
  s.gets = gets_.load(std::memory_order_relaxed);
  s.get_hits = get_hits_.load(std::memory_order_relaxed);
  s.get_bytes = get_bytes_.load(std::memory_order_relaxed);
  s.errors += errors_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace kvtier
