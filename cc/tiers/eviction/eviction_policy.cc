#include "cc/tiers/eviction/eviction_policy.h"

#include <string>

#include "cc/tiers/eviction/lru_policy.h"
#include "cc/tiers/eviction/s3fifo_policy.h"

namespace kvtier {

StatusOr<std::unique_ptr<EvictionPolicy>> MakeEvictionPolicy(std::string_view name) {
  if (name == "lru") return std::unique_ptr<EvictionPolicy>(std::make_unique<LruPolicy>());
  if (name == "s3fifo") return std::unique_ptr<EvictionPolicy>(std::make_unique<S3FifoPolicy>());
  return InvalidArgument("eviction_policy: unknown policy '" + std::string(name) +
                         "'; allowed values: lru, s3fifo");
}

}  // namespace kvtier
