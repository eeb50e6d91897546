// LruPolicy: least recently used first. The baseline every other policy is
// measured against. Contract: see eviction_policy.h. Unevictable keys found
// at the cold end stay where they are (their recency is not faked), so a
// NextVictim call is O(number of unevictable keys colder than the victim).
#pragma once

#include <list>
#include <unordered_map>

#include "cc/tiers/eviction/eviction_policy.h"

namespace kvtier {

class LruPolicy final : public EvictionPolicy {
 public:
  std::string_view name() const override { return "lru"; }
  void OnInsert(const ChunkKey& key, size_t bytes) override;
  void OnAccess(const ChunkKey& key) override;
  void OnRemove(const ChunkKey& key) override;
  std::optional<ChunkKey> NextVictim(const Evictable& evictable) override;
  size_t size() const override { return map_.size(); }

 private:
  std::list<ChunkKey> order_;  // front = most recent
  std::unordered_map<ChunkKey, std::list<ChunkKey>::iterator, ChunkKeyHash> map_;
};

}  // namespace kvtier
