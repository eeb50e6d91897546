// S3FifoPolicy: three static FIFO queues (Yang et al., SOSP'23), sized in
// bytes.
//
//   small (~10% of tracked bytes): every new key enters here. Most chunks of
//       a one-off scan (a long document read once) die here without touching
//       the hot set.
//   main: keys that were accessed again while in small, and keys that come
//       back while remembered by ghost. Eviction from main is FIFO with a
//       2-bit frequency: a key with freq > 0 is reinserted with freq - 1.
//   ghost: keys only (no bytes), the recent evictions from small, bounded by
//       the most keys ever tracked at once. A ghost hit on insert goes straight to
//       main.
//
// Contract: see eviction_policy.h. Unevictable keys met at a queue's tail are
// moved to that queue's head (a FIFO has no recency to preserve); a small key
// with freq > 0 is promoted to main even when unevictable. NextVictim is
// amortised O(1) and at worst O(4 * tracked keys).
#pragma once

#include <cstdint>
#include <deque>
#include <list>
#include <unordered_map>

#include "cc/tiers/eviction/eviction_policy.h"

namespace kvtier {

class S3FifoPolicy final : public EvictionPolicy {
 public:
  // small_ratio: share of tracked bytes the small queue may hold before it
  // is preferred for eviction.
  explicit S3FifoPolicy(double small_ratio = 0.10) : small_ratio_(small_ratio) {}

  std::string_view name() const override { return "s3fifo"; }
  void OnInsert(const ChunkKey& key, size_t bytes) override;
  void OnAccess(const ChunkKey& key) override;
  void OnRemove(const ChunkKey& key) override;
  std::optional<ChunkKey> NextVictim(const Evictable& evictable) override;
  size_t size() const override { return map_.size(); }

  // For tests: which queue holds a key (0 small, 1 main, -1 untracked) and
  // whether ghost remembers it.
  int QueueOf(const ChunkKey& key) const;
  bool InGhost(const ChunkKey& key) const { return ghost_.count(key) != 0; }

 private:
  static constexpr uint8_t kMaxFreq = 3;  // 2 bits
  struct Entry {
    std::list<ChunkKey>::iterator pos;
    size_t bytes = 0;
    uint8_t freq = 0;
    bool in_main = false;
  };
  void Erase(std::unordered_map<ChunkKey, Entry, ChunkKeyHash>::iterator it);
  void RememberGhost(const ChunkKey& key);

  const double small_ratio_;
  std::list<ChunkKey> small_, main_;  // front = newest
  size_t small_bytes_ = 0, main_bytes_ = 0;
  std::unordered_map<ChunkKey, Entry, ChunkKeyHash> map_;
  // Ghost FIFO; a key re-remembered gets a new sequence number so that its
  // older queue slot does not forget it early.
  std::deque<std::pair<ChunkKey, uint64_t>> ghost_fifo_;
  std::unordered_map<ChunkKey, uint64_t, ChunkKeyHash> ghost_;
  uint64_t ghost_seq_ = 0;
  size_t peak_size_ = 0;
};

}  // namespace kvtier
