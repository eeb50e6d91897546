// EvictionPolicy: decides which committed chunk a tier drops next.
//
// Layering: a tier owns its placement (where the bytes are) and asks a policy
// only for ordering. The policy sees keys and sizes, never bytes.
//
// Contract
// - Not thread-safe: the owning tier serialises every call (CpuTier calls
//   them under its map mutex). Calls are O(1) amortised except NextVictim,
//   which walks past entries the tier says it cannot evict.
// - The policy tracks exactly the keys inserted and not yet removed or
//   returned as victims. OnInsert of a tracked key, and OnAccess/OnRemove of
//   an untracked one, are ignored (the tier's map is the source of truth).
// - NextVictim(evictable) returns a tracked key for which evictable(key) is
//   true and stops tracking it (the caller must drop the entry; it must not
//   also call OnRemove). Keys for which evictable is false (pinned, being
//   read) are kept, never lost; std::nullopt means no tracked key is
//   evictable right now. evictable must not call back into the policy.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string_view>

#include "cc/common/chunk_key.h"
#include "cc/common/status.h"

namespace kvtier {

class EvictionPolicy {
 public:
  using Evictable = std::function<bool(const ChunkKey&)>;

  virtual ~EvictionPolicy() = default;

  virtual std::string_view name() const = 0;
  virtual void OnInsert(const ChunkKey& key, size_t bytes) = 0;
  virtual void OnAccess(const ChunkKey& key) = 0;
  virtual void OnRemove(const ChunkKey& key) = 0;
  virtual std::optional<ChunkKey> NextVictim(const Evictable& evictable) = 0;
  virtual size_t size() const = 0;  // tracked keys
};

// "lru" or "s3fifo"; kInvalidArgument naming the allowed values otherwise.
StatusOr<std::unique_ptr<EvictionPolicy>> MakeEvictionPolicy(std::string_view name);

}  // namespace kvtier
