#include "cc/engine/catalogue_view.h"

#include "cc/tiers/remote/remote_record.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

namespace kvtier {
namespace {

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// POSIX shm objects live in /dev/shm on Linux (glibc's shm_open); stat-ing
// the path tells whether the name still names the object we mapped.
bool StatShm(const std::string& shm_name, uint64_t* dev, uint64_t* ino) {
  struct stat st;
  if (::stat(("/dev/shm" + shm_name).c_str(), &st) != 0) return false;
  *dev = static_cast<uint64_t>(st.st_dev);
  *ino = static_cast<uint64_t>(st.st_ino);
  return true;
}

}  // namespace

std::string CatalogueShmName(std::string_view deployment, uint32_t rank, uint32_t world_size) {
  const ChunkKey k = IdentityKey(deployment);
  char buf[96];
  std::snprintf(buf, sizeof(buf), "%s%016llx%016llx-r%uof%u", kCatalogueShmPrefix, static_cast<unsigned long long>(k.hi),
                static_cast<unsigned long long>(k.lo), rank, world_size);
  return buf;
}

StatusOr<size_t> ReclaimStaleCatalogues() { return ChunkIndex::ReclaimStale(kCatalogueShmPrefix); }

StatusOr<std::unique_ptr<CatalogueView>> CatalogueView::Create(const CatalogueViewOptions& options) {
  if (options.ranks.empty()) return InvalidArgument("CatalogueView needs at least one rank");
  if (options.recheck_ms < 0) return InvalidArgument("recheck_ms must be >= 0");
  std::unique_ptr<CatalogueView> view(new CatalogueView(options.recheck_ms));
  view->ranks_.reserve(options.ranks.size());
  for (size_t i = 0; i < options.ranks.size(); ++i) {
    const RankCatalogue& spec = options.ranks[i];
    const std::string& name = spec.shm_name;
    if (name.size() < 2 || name.size() > 255 || name[0] != '/' || name.find('/', 1) != std::string::npos) {
      return InvalidArgument("rank " + std::to_string(i) + ": shm name must be \"/name\", got \"" + name + "\"");
    }
    auto hasher = ChunkHasher::Create(spec.ns, options.chunk_tokens, options.partial);
    if (!hasher.ok()) return hasher.status().Annotate("rank " + std::to_string(i));
    view->ranks_.push_back(Rank{spec, std::move(hasher).value(), nullptr, 0, 0, 0});
    view->remote_digests_.push_back(remote::NamespaceDigest(spec.ns, options.chunk_tokens));
  }
  view->chunk_tokens_ = options.chunk_tokens;
  if (!options.remote.url.empty()) {
    const remote::RemoteTierOptions& ro = options.remote;
    if (ro.timeout.count() <= 0) return InvalidArgument("remote timeout must be > 0 ms");
    auto client = remote::RedisClient::Create(ro.url, remote::ForegroundClientOptions(ro));
    if (!client.ok()) return client.status().Annotate("remote");
    view->remote_ = std::move(client).value();
  }
  return view;
}

size_t CatalogueView::LookupWithRemote(std::span<const int32_t> tokens, const KeyExtras* extras,
                                       size_t* local_tokens) {
  const size_t local = Lookup(tokens, extras);
  if (local_tokens != nullptr) *local_tokens = local;
  if (remote_ == nullptr || local >= tokens.size() || !ValidateKeyExtras(extras).ok()) return local;
  // Chunks past the local prefix (which ends on a chunk boundary unless it
  // covers the whole prompt), the same window on every rank.
  constexpr size_t kWindow = 256;
  const size_t first = local / chunk_tokens_;
  std::vector<std::vector<ChunkHash>> per_rank(ranks_.size());
  std::vector<std::string> keys;
  size_t window = 0;
  for (size_t r = 0; r < ranks_.size(); ++r) {
    ranks_[r].hasher.Hash(tokens, &per_rank[r], extras);
    if (first >= per_rank[r].size()) return local;
    window = std::min(kWindow, per_rank[r].size() - first);
  }
  for (size_t j = 0; j < window; ++j) {
    for (size_t r = 0; r < ranks_.size(); ++r) keys.push_back(remote::RemoteKey(remote_digests_[r], per_rank[r][first + j].key));
  }
  std::vector<std::string_view> views(keys.begin(), keys.end());
  std::vector<remote::KeyResult> results;
  // A failed call still fills one result per key (kError for those it
  // could not ask): they are simply not hits.
  (void)remote_->ExistsMany(views, &results);
  if (results.size() != views.size()) return local;
  size_t n = 0;  // chunks past `first` held by every rank
  for (; n < window; ++n) {
    bool all = true;
    for (size_t r = 0; r < ranks_.size() && all; ++r) all = results[n * ranks_.size() + r] == remote::KeyResult::kHit;
    if (!all) break;
  }
  if (n == 0) return local;
  const ChunkHash& last = per_rank[0][first + n - 1];
  return last.begin + last.num_tokens;
}

std::shared_ptr<const ChunkIndex> CatalogueView::IndexOf(Rank& r) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now = NowMs();
  if (now < r.next_check_ms) return r.index;
  r.next_check_ms = now + recheck_ms_;
  uint64_t dev = 0, ino = 0;
  if (!StatShm(r.spec.shm_name, &dev, &ino)) {
    r.index.reset();  // gone (the owner exited): its frozen contents would only mislead
    return nullptr;
  }
  if (r.index != nullptr && dev == r.dev && ino == r.ino) return r.index;
  auto opened = ChunkIndex::OpenReadOnly(r.spec.shm_name);
  if (!opened.ok()) {
    r.index.reset();
    return nullptr;
  }
  r.index = std::shared_ptr<const ChunkIndex>(std::move(opened).value());
  r.dev = dev;
  r.ino = ino;
  return r.index;
}

size_t CatalogueView::LookupIn(const Rank& r, const ChunkIndex& index, std::span<const int32_t> tokens,
                               const KeyExtras* extras) const {
  thread_local std::vector<ChunkHash> chunks;
  thread_local std::vector<ChunkKey> keys;
  thread_local std::vector<uint64_t> fps;
  r.hasher.Hash(tokens, &chunks, extras);
  keys.resize(chunks.size());
  fps.resize(chunks.size());
  for (size_t i = 0; i < chunks.size(); ++i) {
    keys[i] = chunks[i].key;
    fps[i] = chunks[i].fingerprint;
  }
  const size_t n = index.LookupPrefix(keys, fps);
  return n == 0 ? 0 : chunks[n - 1].begin + chunks[n - 1].num_tokens;
}

size_t CatalogueView::LookupRank(size_t rank, std::span<const int32_t> tokens, const KeyExtras* extras) {
  if (rank >= ranks_.size() || !ValidateKeyExtras(extras).ok()) return 0;
  Rank& r = ranks_[rank];
  std::shared_ptr<const ChunkIndex> index = IndexOf(r);
  return index ? LookupIn(r, *index, tokens, extras) : 0;
}

size_t CatalogueView::Lookup(std::span<const int32_t> tokens, const KeyExtras* extras) {
  if (!ValidateKeyExtras(extras).ok()) return 0;
  size_t best = tokens.size();
  for (Rank& r : ranks_) {
    std::shared_ptr<const ChunkIndex> index = IndexOf(r);
    if (index == nullptr) return 0;
    best = std::min(best, LookupIn(r, *index, tokens, extras));
    if (best == 0) return 0;
  }
  return best;
}

size_t CatalogueView::ranks_open() {
  size_t n = 0;
  for (Rank& r : ranks_) n += IndexOf(r) != nullptr;
  return n;
}

}  // namespace kvtier
