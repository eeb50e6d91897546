#include "cc/tiers/eviction/lru_policy.h"

namespace kvtier {

void LruPolicy::OnInsert(const ChunkKey& key, size_t /*bytes*/) {
  if (map_.count(key) != 0) return;
  order_.push_front(key);
  map_.emplace(key, order_.begin());
}

void LruPolicy::OnAccess(const ChunkKey& key) {
  auto it = map_.find(key);
  if (it == map_.end()) return;
  order_.splice(order_.begin(), order_, it->second);
}

void LruPolicy::OnRemove(const ChunkKey& key) {
  auto it = map_.find(key);
  if (it == map_.end()) return;
  order_.erase(it->second);
  map_.erase(it);
}

std::optional<ChunkKey> LruPolicy::NextVictim(const Evictable& evictable) {
  for (auto it = order_.rbegin(); it != order_.rend(); ++it) {
    if (!evictable(*it)) continue;
    const ChunkKey victim = *it;
    map_.erase(victim);
    order_.erase(std::next(it).base());
    return victim;
  }
  return std::nullopt;
}

}  // namespace kvtier
