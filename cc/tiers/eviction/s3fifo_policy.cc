#include "cc/tiers/eviction/s3fifo_policy.h"

#include <algorithm>

namespace kvtier {

int S3FifoPolicy::QueueOf(const ChunkKey& key) const {
  auto it = map_.find(key);
  if (it == map_.end()) return -1;
  return it->second.in_main ? 1 : 0;
}

void S3FifoPolicy::OnInsert(const ChunkKey& key, size_t bytes) {
  if (map_.count(key) != 0) return;
  Entry e;
  e.bytes = bytes;
  auto g = ghost_.find(key);
  if (g != ghost_.end()) {
    ghost_.erase(g);  // its FIFO slot is skipped when it reaches the front
    e.in_main = true;
    main_.push_front(key);
    e.pos = main_.begin();
    main_bytes_ += bytes;
  } else {
    small_.push_front(key);
    e.pos = small_.begin();
    small_bytes_ += bytes;
  }
  map_.emplace(key, e);
  peak_size_ = std::max(peak_size_, map_.size());
}

void S3FifoPolicy::OnAccess(const ChunkKey& key) {
  auto it = map_.find(key);
  if (it == map_.end()) return;
  it->second.freq = std::min<uint8_t>(it->second.freq + 1, kMaxFreq);
}

void S3FifoPolicy::Erase(std::unordered_map<ChunkKey, Entry, ChunkKeyHash>::iterator it) {
  Entry& e = it->second;
  if (e.in_main) {
    main_.erase(e.pos);
    main_bytes_ -= e.bytes;
  } else {
    small_.erase(e.pos);
    small_bytes_ -= e.bytes;
  }
  map_.erase(it);
}

void S3FifoPolicy::OnRemove(const ChunkKey& key) {
  auto it = map_.find(key);
  if (it != map_.end()) Erase(it);
}

void S3FifoPolicy::RememberGhost(const ChunkKey& key) {
  const uint64_t seq = ++ghost_seq_;
  ghost_[key] = seq;
  ghost_fifo_.emplace_back(key, seq);
  // Sized like the cache it shadows: the most keys ever tracked at once
  // (the policy is not told the capacity; the peak is its best estimate).
  const size_t limit = std::max<size_t>(peak_size_, 1);
  while (ghost_.size() > limit || ghost_fifo_.size() > 2 * limit + 16) {
    auto [k, s] = ghost_fifo_.front();
    ghost_fifo_.pop_front();
    auto g = ghost_.find(k);
    if (g != ghost_.end() && g->second == s) ghost_.erase(g);
  }
}

std::optional<ChunkKey> S3FifoPolicy::NextVictim(const Evictable& evictable) {
  // Unevictable keys skipped in this call, per queue: once a whole queue has
  // been skipped, only the other one can yield a victim.
  size_t small_skips = 0, main_skips = 0;
  size_t budget = 4 * map_.size() + 8;  // freq <= 3: each key rotates at most 4 times
  while (budget-- > 0) {
    const bool small_open = !small_.empty() && small_skips < small_.size();
    const bool main_open = !main_.empty() && main_skips < main_.size();
    if (!small_open && !main_open) return std::nullopt;
    const double total = static_cast<double>(small_bytes_ + main_bytes_);
    const bool from_small = small_open && (!main_open || static_cast<double>(small_bytes_) >= small_ratio_ * total);
    if (from_small) {
      const ChunkKey key = small_.back();
      auto it = map_.find(key);
      Entry& e = it->second;
      if (e.freq > 0) {
        // Reused while on probation: promote, starting main's count afresh.
        main_.splice(main_.begin(), small_, e.pos);
        small_bytes_ -= e.bytes;
        main_bytes_ += e.bytes;
        e.in_main = true;
        e.freq = 0;
        continue;
      }
      if (!evictable(key)) {
        small_.splice(small_.begin(), small_, e.pos);
        ++small_skips;
        continue;
      }
      Erase(it);
      RememberGhost(key);
      return key;
    }
    const ChunkKey key = main_.back();
    auto it = map_.find(key);
    Entry& e = it->second;
    if (e.freq > 0) {
      --e.freq;
      main_.splice(main_.begin(), main_, e.pos);
      continue;
    }
    if (!evictable(key)) {
      main_.splice(main_.begin(), main_, e.pos);
      ++main_skips;
      continue;
    }
    Erase(it);
    return key;
  }
  return std::nullopt;
}

}  // namespace kvtier
