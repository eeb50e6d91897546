// CatalogueView: a read-only view of several engines' catalogues, each in
// shared memory, answering "how many tokens of this prompt are cached on
// every one of them" without a round trip to their processes.
//
// Why: under `vllm serve` the scheduler (engine-core process) decides how
// many tokens a request gets from the cache, but the KV lives in the worker
// processes, one engine per tensor/pipeline rank, each holding its own
// shard of every chunk. A prefix is usable only when every rank holds it.
// Each worker engine publishes its catalogue as a POSIX shm object
// (EngineOptions::catalogue_shm_name, ChunkIndex::CreateShared); this view
// maps them PROT_READ (ChunkIndex::OpenReadOnly) and hashes the prompt once
// per rank, with that rank's namespace, since rank is part of every key.
//
// Contract
// - Lookup(tokens) = min over ranks of the rank's cached prefix in tokens,
//   computed exactly as Engine::Lookup does on that rank (same hasher, same
//   LookupPrefix with fingerprints). A rank whose catalogue is not open
//   (not created yet, or gone) counts 0.
// - The answer is a hint, never a promise: it may be stale by the time a
//   worker loads (eviction, a restart). Workers re-check every chunk on
//   retrieve (fingerprint, layout, checksum), so a stale answer costs a
//   miss or a load error that vLLM recomputes, never wrong KV.
// - Worker restarts: a restarted worker creates a new shm object under the
//   same name; the old mapping then shows a frozen, unlinked catalogue.
//   The view notices by the object's inode (checked at most every
//   recheck_ms per rank, one stat(2)) and remaps; a name that cannot be
//   opened is retried on the same schedule.
// - Remote tier (options.remote.url set): LookupWithRemote continues past
//   the local prefix in the shared remote store, asking EXISTS for every
//   rank's key of the following chunks (up to 256) in one pipelined round
//   trip, bounded by options.remote.timeout; a chunk counts when every rank's
//   copy is there. The same hint rule: workers fetch and check each chunk,
//   so a stale answer is a miss. A remote that is down or slow adds nothing.
// - Thread safety: Lookup may be called from any thread; rank mappings are
//   swapped under a mutex held only for the pointer exchange and the stat.
//   ChunkIndex reads themselves take no lock (see chunk_index.h).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cc/common/status.h"
#include "cc/hash/chunk_hash.h"
#include "cc/index/chunk_index.h"
#include "cc/tiers/remote/redis_client.h"
#include "cc/tiers/remote/remote_tier.h"

namespace kvtier {

// "/kvtier-<32 hex>-r<rank>of<world>": one name per (deployment, rank).
// deployment is any string that names the deployment (the same in every
// process of it, different between deployments that may run at once on one
// machine); it is hashed, so its length and characters do not matter.
std::string CatalogueShmName(std::string_view deployment, uint32_t rank, uint32_t world_size);
inline constexpr char kCatalogueShmPrefix[] = "/kvtier-";

// Unlinks the catalogues (names from CatalogueShmName) of this uid whose
// owner is gone: what workers killed before they could clean up left in
// /dev/shm (vLLM's shutdown kills its workers). Live owners' objects stay.
// Returns how many were unlinked.
StatusOr<size_t> ReclaimStaleCatalogues();

struct RankCatalogue {
  std::string shm_name;  // the rank engine's EngineOptions::catalogue_shm_name
  HashNamespace ns;      // the rank engine's hash namespace
};

struct CatalogueViewOptions {
  std::vector<RankCatalogue> ranks;  // at least one
  uint32_t chunk_tokens = 256;
  PartialChunkPolicy partial = PartialChunkPolicy::kKeep;
  int64_t recheck_ms = 1000;  // how often a rank's shm object is re-stat'ed
  // url empty: no remote. Only url, timeout, credentials and TLS are used.
  remote::RemoteTierOptions remote;
};

class CatalogueView {
 public:
  // kInvalidArgument for no ranks, a bad shm name or a bad namespace/chunk
  // size (as ChunkHasher::Create). Ranks need not exist yet.
  static StatusOr<std::unique_ptr<CatalogueView>> Create(const CatalogueViewOptions& options);

  size_t num_ranks() const { return ranks_.size(); }
  // Tokens cached as a prefix on every rank (see the contract). Invalid
  // extras count 0, as in Engine::Lookup.
  size_t Lookup(std::span<const int32_t> tokens, const KeyExtras* extras = nullptr);
  // Lookup, then the remote past it (see the contract): the tokens cached
  // as a prefix on every rank locally or in the remote; *local_tokens (if
  // given) gets the local part. Without a remote, Lookup.
  size_t LookupWithRemote(std::span<const int32_t> tokens, const KeyExtras* extras = nullptr,
                          size_t* local_tokens = nullptr);
  bool has_remote() const { return remote_ != nullptr; }
  // The same for one rank; 0 for an unknown rank.
  size_t LookupRank(size_t rank, std::span<const int32_t> tokens, const KeyExtras* extras = nullptr);
  // Ranks whose catalogue is mapped now.
  size_t ranks_open();

 private:
  struct Rank {
    RankCatalogue spec;
    ChunkHasher hasher;
    std::shared_ptr<const ChunkIndex> index;  // null: not open
    uint64_t dev = 0, ino = 0;                 // identity of the mapped object
    int64_t next_check_ms = 0;
  };
  explicit CatalogueView(int64_t recheck_ms) : recheck_ms_(recheck_ms) {}
  // The rank's current mapping, reopened if due and needed.
  std::shared_ptr<const ChunkIndex> IndexOf(Rank& r);
  size_t LookupIn(const Rank& r, const ChunkIndex& index, std::span<const int32_t> tokens,
                  const KeyExtras* extras) const;

  const int64_t recheck_ms_;
  std::mutex mu_;  // guards every Rank's index / dev / ino / next_check_ms
  std::vector<Rank> ranks_;
  std::unique_ptr<remote::RedisClient> remote_;  // thread-safe itself
  std::vector<uint64_t> remote_digests_;          // per rank: NamespaceDigest
  uint32_t chunk_tokens_ = 0;
};

}  // namespace kvtier
