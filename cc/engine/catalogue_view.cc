#include "cc/engine/catalogue_view.h"

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
  }
  return view;
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
