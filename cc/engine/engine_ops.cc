// Engine: the operations API (clear by filter, TTL pins, move, lookup by
// tier, verify, health). Contracts in engine.h; kept apart from engine.cc's
// data path. Nothing here runs on a load or store path.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "cc/common/thread_guard.h"
#include "cc/engine/engine.h"

namespace kvtier {
namespace {

using Clock = std::chrono::steady_clock;

uint64_t NowUs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(Clock::now().time_since_epoch()).count());
}

// What Health calls "recently".
constexpr std::chrono::nanoseconds kHealthWindow = std::chrono::seconds(60);

// The TTL thread re-reads the engine's clock at least this often (a clock
// injected by a test does not move with wall time).
constexpr std::chrono::milliseconds kPinTtlPoll{1000};

}  // namespace

// ---------------------------------------------------------------------------
// MoveTask

bool MoveTask::done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return r_.done;
}

bool MoveTask::Wait(int64_t timeout_ms) const {
  std::unique_lock<std::mutex> lock(mu_);
  auto ready = [this] { return r_.done; };
  if (timeout_ms < 0) {
    cv_.wait(lock, ready);
    return true;
  }
  return cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), ready);
}

MoveTask::Result MoveTask::result() const {
  std::lock_guard<std::mutex> lock(mu_);
  return r_;
}

void MoveTask::Finish() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    r_.done = true;
  }
  cv_.notify_all();
}

const char* HealthStatusName(HealthStatus s) {
  switch (s) {
    case HealthStatus::kOk:
      return "ok";
    case HealthStatus::kDegraded:
      return "degraded";
    case HealthStatus::kDown:
      return "down";
  }
  return "unknown";
}

// ---------------------------------------------------------------------------
// Clear

StatusOr<size_t> Engine::ClearChunks(const ClearFilter& f) {
  if (f.tiers == 0 || (f.tiers & ~(kTierBitCpu | kTierBitDisk)) != 0) {
    return InvalidArgument("clear: tiers must be a non-empty subset of cpu and disk");
  }
  if (f.older_than && f.older_than->count() < 0) return InvalidArgument("clear: older_than must be >= 0");
  if (f.by_tokens) KVT_RETURN_IF_ERROR(ValidateKeyExtras(f.extras));
  Flush();  // queued stores and write-behind first: their chunks are held until then
  CpuTier* const c = (f.tiers & kTierBitCpu) ? cpu() : nullptr;
  DiskTier* const d = (f.tiers & kTierBitDisk) ? disk_.get() : nullptr;

  std::vector<ChunkKey> keys;
  if (f.by_tokens) {
    std::vector<ChunkHash> chunks;
    const size_t n = HashAndCachedPrefix(f.tokens, f.extras, &chunks);
    for (size_t i = 0; i < n; ++i) keys.push_back(chunks[i].key);
  } else {
    index_->ForEach([&](const IndexEntry& e) { keys.push_back(e.key); });
  }

  if (!f.by_tokens && !f.older_than) {
    // Everything unpinned of the chosen tiers: the tiers' bulk Clear (one
    // header rewrite per disk segment, not one per chunk). Tier::Clear does
    // not report evictions: compare what the catalogued keys had before.
    std::vector<uint8_t> had(keys.size());
    for (size_t i = 0; i < keys.size(); ++i) {
      had[i] = static_cast<uint8_t>((c && c->Contains(keys[i]) ? 1 : 0) | (d && d->Contains(keys[i]) ? 2 : 0));
    }
    if (c) c->Clear();
    if (d) d->Clear();
    size_t dropped = 0;
    for (size_t i = 0; i < keys.size(); ++i) {
      const bool lost_cpu = (had[i] & 1) && !c->Contains(keys[i]);
      const bool lost_disk = (had[i] & 2) && !d->Contains(keys[i]);
      if (lost_cpu) cpu_evict_clear_.fetch_add(1, std::memory_order_relaxed);
      if (lost_disk) disk_evict_clear_.fetch_add(1, std::memory_order_relaxed);
      if (lost_cpu || lost_disk) ++dropped;
      Reconcile(keys[i]);
    }
    return dropped;
  }

  const Clock::time_point now = Now();
  size_t dropped = 0;
  for (const ChunkKey& k : keys) {
    auto entry = index_->Find(k);
    if (!entry || entry->state != EntryState::kReady || entry->pins > 0) continue;
    if (f.older_than) {
      // The chunk's last use is its most recent copy's, whichever tiers go.
      std::optional<Clock::time_point> last;
      auto newer = [&](std::optional<Clock::time_point> t) {
        if (t && (!last || *t > *last)) last = t;
      };
      if (cpu()) newer(cpu()->LastUsed(k));
      if (disk_) newer(disk_->LastUsed(k));
      if (!last || now - *last <= *f.older_than) continue;
    }
    bool lost = false;
    if (c && c->Remove(k).ok()) {  // pinned, leased or held: kFailedPrecondition, stays
      cpu_evict_clear_.fetch_add(1, std::memory_order_relaxed);
      lost = true;
    }
    if (d && d->Remove(k).ok()) {
      disk_evict_clear_.fetch_add(1, std::memory_order_relaxed);
      lost = true;
    }
    if (lost) {
      Reconcile(k);
      ++dropped;
    }
  }
  return dropped;
}

// ---------------------------------------------------------------------------
// TTL pins

StatusOr<size_t> Engine::PinWithTtl(std::span<const int32_t> tokens, const KeyExtras* extras,
                                    std::chrono::nanoseconds ttl) {
  if (ttl.count() <= 0) return InvalidArgument("pin: ttl must be > 0");
  KVT_RETURN_IF_ERROR(ValidateKeyExtras(extras));
  std::vector<ChunkHash> chunks;
  hasher_.Hash(tokens, &chunks, extras);
  std::vector<ChunkKey> pinned;
  std::lock_guard<std::mutex> lock(pins_mu_);
  if (!pin_thread_.joinable()) {
    KVT_RETURN_IF_ERROR(StartThread(&pin_thread_, [this] { PinTtlLoop(); }).Annotate("pin TTL thread"));
  }
  const size_t n = PinLocked(chunks, &pinned);
  if (n != 0) {
    timed_pin_chunks_.fetch_add(n, std::memory_order_relaxed);
    timed_pins_.emplace(Now() + ttl, std::move(pinned));
    pin_cv_.notify_all();
  }
  return n;
}

size_t Engine::ExpirePins(std::chrono::nanoseconds ahead) {
  std::lock_guard<std::mutex> lock(pins_mu_);
  const Clock::time_point cutoff = Now() + ahead;
  size_t released = 0;
  while (!timed_pins_.empty() && timed_pins_.begin()->first <= cutoff) {
    auto node = timed_pins_.extract(timed_pins_.begin());
    timed_pin_chunks_.fetch_sub(node.mapped().size(), std::memory_order_relaxed);
    for (const ChunkKey& k : node.mapped()) {
      if (UnpinKeyLocked(k)) ++released;
    }
  }
  pins_expired_.fetch_add(released, std::memory_order_relaxed);
  return released;
}

void Engine::PinTtlLoop() {
  std::unique_lock<std::mutex> lock(pins_mu_);
  while (!pin_stop_) {
    if (timed_pins_.empty()) {
      pin_cv_.wait(lock);
      continue;
    }
    const auto wait = timed_pins_.begin()->first - Now();
    if (wait.count() > 0) {
      pin_cv_.wait_for(lock, std::min<std::chrono::nanoseconds>(wait, kPinTtlPoll));
      continue;
    }
    lock.unlock();
    try {
      (void)ExpirePins();
    } catch (...) {  // the thread's boundary (bad_alloc): counted, the thread goes on
      CountInternalError(StatusFromCurrentException("pin TTL"));
    }
    lock.lock();
  }
}

// ---------------------------------------------------------------------------
// Move

StatusOr<std::shared_ptr<MoveTask>> Engine::Move(std::span<const int32_t> tokens, uint32_t tier,
                                                 const KeyExtras* extras) {
  if (tier != kTierBitCpu && tier != kTierBitDisk) return InvalidArgument("move: the tier must be cpu or disk");
  KVT_RETURN_IF_ERROR(ValidateKeyExtras(extras));
  if (cpu() == nullptr) return FailedPrecondition("move before the chunk size is known (SetChunkBytes)");
  if (tier == kTierBitDisk && disk_ == nullptr) return FailedPrecondition("move to disk: no disk tier");
  std::vector<ChunkHash> chunks;
  chunks.resize(HashAndCachedPrefix(tokens, extras, &chunks));
  auto task = std::make_shared<MoveTask>();
  task->r_.tier = tier;
  task->r_.chunks = chunks.size();
  moves_started_.fetch_add(1, std::memory_order_relaxed);
  // One task for the whole prefix: a move is an operator's request, and one
  // copy thread at a time leaves the others to stores.
  Status sub = copy_pool_->Submit([this, chunks = std::move(chunks), tier, task] {
    MoveTask::Result r;
    r.chunks = chunks.size();
    try {
      for (const ChunkHash& c : chunks) MoveOne(c, tier, &r);
    } catch (...) {  // the copy thread's boundary
      const Status s = StatusFromCurrentException("move");
      CountInternalError(s);
      if (r.error.empty()) r.error = s.ToString();
      r.failed = r.chunks - r.moved - r.already;
    }
    moves_moved_.fetch_add(r.moved, std::memory_order_relaxed);
    moves_failed_.fetch_add(r.failed, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(task->mu_);
      task->r_.moved = r.moved;
      task->r_.already = r.already;
      task->r_.failed = r.failed;
      task->r_.error = r.error;
    }
    task->Finish();
  });
  if (!sub.ok()) {
    {
      std::lock_guard<std::mutex> lock(task->mu_);
      task->r_.failed = task->r_.chunks;
      task->r_.error = sub.Annotate("move not started").ToString();
    }
    task->Finish();
  }
  return task;
}

void Engine::MoveOne(const ChunkHash& chunk, uint32_t tier, MoveTask::Result* r) {
  auto fail = [&](const Status& s) {
    ++r->failed;
    if (r->error.empty()) r->error = "chunk at token " + std::to_string(chunk.begin) + ": " + s.ToString();
  };
  CpuTier* const c = cpu();
  if (tier == kTierBitCpu) {
    if (c->Contains(chunk.key)) {
      ++r->already;
      return;
    }
    bool stale = false;
    auto lease = PromoteFromDisk(chunk, std::nullopt, &stale);
    if (!lease.ok()) {
      if (lease.status().code() == StatusCode::kNotFound) Reconcile(chunk.key);  // in no tier any more
      return fail(lease.status().Annotate("promoting to the CPU tier"));
    }
    ++r->moved;
    return;
  }
  const bool on_disk = disk_->Contains(chunk.key);
  if (on_disk && !c->Contains(chunk.key)) {
    ++r->already;
    return;
  }
  if (!on_disk) {
    auto lease = c->AcquireUncounted(chunk.key, chunk.fingerprint);
    if (!lease.ok()) {
      Reconcile(chunk.key);
      return fail(lease.status().Annotate("reading from the CPU tier"));
    }
    const ChunkMeta meta = lease->meta();
    const std::span<const std::byte> data = lease->data();
    const uint64_t begun = NowUs();
    std::vector<Status> results = disk_->PutBatch(std::span<const ChunkMeta>(&meta, 1),
                                                  std::span<const std::span<const std::byte>>(&data, 1));
    store_disk_hist_.Record(NowUs() - begun);
    const Status& s = results.at(0);
    if (!s.ok() && s.code() != StatusCode::kAlreadyExists) {
      if (s.code() != StatusCode::kFailedPrecondition) NoteDiskFailure();  // not "being written by write-behind"
      return fail(s.Annotate("writing to the disk tier"));
    }
    (void)index_->UpdateTiers(chunk.key, kTierBitDisk, 0);
  }
  // The CPU copy goes once nobody holds it. A hold for write-behind ends
  // when its batch is filed: wait for batches (bounded, ~1 s), not for a
  // user pin or a reader's lease, which are not ours to end.
  Status rm = c->Remove(chunk.key);
  for (int i = 0; i < 20 && rm.code() == StatusCode::kFailedPrecondition && WaitForWriteBehindProgress(); ++i) {
    rm = c->Remove(chunk.key);
  }
  Reconcile(chunk.key);
  if (!rm.ok() && rm.code() != StatusCode::kNotFound) return fail(rm.Annotate("dropping the CPU copy"));
  ++r->moved;
}

// ---------------------------------------------------------------------------
// Lookup by tier

StatusOr<TierLookup> Engine::LookupTiers(std::span<const int32_t> tokens, const KeyExtras* extras) const {
  KVT_RETURN_IF_ERROR(ValidateKeyExtras(extras));
  std::vector<ChunkHash> chunks;
  const size_t n = HashAndCachedPrefix(tokens, extras, &chunks);
  TierLookup out;
  out.chunk_tokens = hasher_.chunk_tokens();
  out.tokens = n == 0 ? 0 : chunks[n - 1].begin + chunks[n - 1].num_tokens;
  for (size_t i = 0; i < n; ++i) {
    TierLookup::Chunk ch;
    ch.index = i;
    if (cpu() && cpu()->Contains(chunks[i].key)) ch.tiers |= kTierBitCpu;
    if (disk_ && disk_->Contains(chunks[i].key)) ch.tiers |= kTierBitDisk;
    auto e = index_->Find(chunks[i].key);
    ch.pinned = e && e->pins > 0;
    if (ch.tiers & kTierBitCpu) ++out.cpu_chunks;
    if (ch.tiers & kTierBitDisk) ++out.disk_chunks;
    out.chunks.push_back(ch);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Verify

VerifyReport Engine::Verify(bool deep) {
  VerifyReport v;
  CpuTier* const c = cpu();
  DiskTier* const d = disk_.get();
  // The CPU tier's keys before and after the catalogue walk (snapshots under
  // its lock; expired copies count while they hold memory, see engine.h).
  auto cpu_keys = [c] {
    std::unordered_set<ChunkKey, ChunkKeyHash> keys;
    if (c) {
      for (const ChunkKey& k : c->Keys()) keys.insert(k);
    }
    return keys;
  };
  const auto in_cpu = cpu_keys();
  std::unordered_set<ChunkKey, ChunkKeyHash> in_disk;
  if (d) d->ForEachChunk([&](const ChunkMeta& m, size_t) { in_disk.insert(m.key); });
  std::vector<IndexEntry> entries;
  index_->ForEach([&](const IndexEntry& e) { entries.push_back(e); });
  const auto in_cpu_after = cpu_keys();

  // A discrepancy counts only if it survives a second look at the tier and
  // at the live catalogue entry: an eviction clears the bit just after the
  // tier drops the copy, a promotion sets it just before the copy lands, a
  // store inserts the entry before any tier has the chunk.
  auto still_claimed = [&](const ChunkKey& k, uint32_t bit) {
    auto now = index_->Find(k);
    return now && now->state == EntryState::kReady && (now->tier_mask & bit) != 0;
  };
  std::unordered_set<ChunkKey, ChunkKeyHash> catalogued;
  for (const IndexEntry& e : entries) {
    ++v.entries;
    catalogued.insert(e.key);
    if (e.state != EntryState::kReady) continue;  // being written or evicted: in flight, not checked
    ++v.checked;
    bool sound = true;
    if ((e.tier_mask & kTierBitCpu) && !in_cpu.count(e.key) && !in_cpu_after.count(e.key) &&
        still_claimed(e.key, kTierBitCpu)) {
      ++v.missing_cpu;
      sound = false;
    }
    if ((e.tier_mask & kTierBitDisk) && !in_disk.count(e.key) && !(d && d->Contains(e.key)) &&
        still_claimed(e.key, kTierBitDisk)) {
      ++v.missing_disk;
      sound = false;
    }
    if (deep && d && (e.tier_mask & kTierBitDisk) && d->VerifyRecord(e.key).code() == StatusCode::kDataLoss) {
      ++v.corrupt;
      sound = false;
    }
    if (sound) ++v.ok;
  }
  // Held before the walk, still held after it, and in the catalogue at no
  // time: an orphan (a chunk removed meanwhile leaves the tier first).
  auto uncatalogued = [&](const ChunkKey& k) { return !catalogued.count(k) && !index_->Find(k).has_value(); };
  for (const ChunkKey& k : in_cpu) {
    if (in_cpu_after.count(k) && uncatalogued(k)) ++v.orphans_cpu;
  }
  for (const ChunkKey& k : in_disk) {
    if (uncatalogued(k) && d->Contains(k)) ++v.orphans_disk;
  }
  return v;
}

// ---------------------------------------------------------------------------
// Health

HealthReport Engine::Health() {
  HealthReport h;
  const int64_t now = NowNs();
  auto recent = [&](int64_t t) { return t != 0 && now - t < kHealthWindow.count(); };
  auto degrade = [](TierHealth* t, HealthStatus s, std::string why) {
    t->status = std::max(t->status, s);
    t->reasons.push_back(std::move(why));
  };
  const EngineStats st = Stats();

  h.cpu.enabled = cpu() != nullptr;

  if (disk_) {
    h.disk.enabled = true;
    Status w = disk_->CheckWritable();
    if (!w.ok()) degrade(&h.disk, HealthStatus::kDegraded, std::string(w.message()));
    if (recent(last_disk_failure_ns_.load(std::memory_order_relaxed))) {
      degrade(&h.disk, HealthStatus::kDegraded,
              "disk writes failed for good in the last 60 s (" + std::to_string(st.write_behind_failed) +
                  " chunks left CPU-only in all)");
    }
    if (recent(last_wb_drop_ns_.load(std::memory_order_relaxed))) {
      degrade(&h.disk, HealthStatus::kDegraded,
              "the write-behind queue was full in the last 60 s (" + std::to_string(st.write_behind_dropped) +
                  " chunks not written to disk in all)");
    }
  }

  if (remote_) {
    h.remote.enabled = true;
    const remote::RemoteTierStats& r = st.remote;
    const bool called = r.lookups + r.fetches + r.uploads + r.upload_failed + r.errors != 0;
    if (called && !r.connected) {
      degrade(&h.remote, HealthStatus::kDown, "the last call did not reach the remote (" +
                                                   std::to_string(r.errors) + " failed calls in all)");
    }
    int64_t last_timeout = 0;
    {
      std::lock_guard<std::mutex> lock(health_mu_);
      if (r.timeouts > health_remote_timeouts_) health_remote_timeout_ns_ = now;
      health_remote_timeouts_ = r.timeouts;
      last_timeout = health_remote_timeout_ns_;
    }
    if (recent(last_timeout)) {
      degrade(&h.remote, HealthStatus::kDegraded,
              "remote calls timed out in the last 60 s (" + std::to_string(r.timeouts) + " in all)");
    }
  }

  const std::pair<const char*, const TierHealth*> parts[] = {{"cpu", &h.cpu}, {"disk", &h.disk}, {"remote", &h.remote}};
  for (const auto& [name, t] : parts) {
    // The local tiers still serve when the remote is down: the engine is degraded.
    const HealthStatus s = t == &h.remote ? std::min(t->status, HealthStatus::kDegraded) : t->status;
    h.status = std::max(h.status, s);
    for (const std::string& why : t->reasons) h.reasons.push_back(std::string(name) + ": " + why);
  }

  h.write_behind_depth = st.write_behind_queue_depth;
  h.write_behind_capacity = disk_ && options_.write_behind ? options_.write_behind_queue : 0;
  h.remote_upload_depth = st.remote.upload_queue_depth;
  h.remote_upload_capacity = remote_ ? options_.remote.queue : 0;
  h.store_copies_pending = st.copies_pending;
  h.store_queue_capacity = options_.store_queue;
  return h;
}

}  // namespace kvtier
