#include "cc/engine/engine.h"

#include "cc/tiers/remote/remote_record.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "cc/common/thread_guard.h"

namespace kvtier {
namespace {

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

uint64_t NowUs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

size_t TokensCovered(const std::vector<ChunkHash>& chunks, size_t n) {
  return n == 0 ? 0 : chunks[n - 1].begin + chunks[n - 1].num_tokens;
}

ChunkMeta MetaOf(const ChunkHash& c, uint64_t layout_id) {
  ChunkMeta m;
  m.key = c.key;
  m.fingerprint = c.fingerprint;
  m.layout_id = layout_id;
  m.num_tokens = c.num_tokens;
  return m;
}

// Disk errors worth retrying: the same write can succeed later (a full disk
// reclaims, an I/O hiccup passes). Anything else (a chunk too large for a
// segment, a bug) fails the same way every time.
bool IsTransientDiskError(const Status& s) {
  return s.code() == StatusCode::kIoError || s.code() == StatusCode::kResourceExhausted ||
         s.code() == StatusCode::kUnavailable;
}

// Per-thread scratch for the hot lookup path: no allocation per call once warm.
thread_local std::vector<ChunkHash> tl_chunks;
thread_local std::vector<ChunkKey> tl_keys;
thread_local std::vector<uint64_t> tl_fps;

}  // namespace

// ---------------------------------------------------------------------------
// StoreHandle

bool StoreHandle::done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pending_ == 0;
}

Status StoreHandle::Wait(int64_t timeout_ms) const {
  std::unique_lock<std::mutex> lock(mu_);
  auto ready = [this] { return pending_ == 0; };
  if (timeout_ms < 0) {
    cv_.wait(lock, ready);
  } else if (!cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), ready)) {
    return Unavailable("store still in progress after " + std::to_string(timeout_ms) + " ms");
  }
  return first_error_;
}

void StoreHandle::ChunkDone(const Status& s, bool stored) {
  if (stored) stored_.fetch_add(1, std::memory_order_release);  // pairs with chunks_stored() acquire
  bool last = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!s.ok() && first_error_.ok()) first_error_ = s;
    last = --pending_ == 0;
  }
  if (last) cv_.notify_all();
}

// ---------------------------------------------------------------------------
// Engine: construction

StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  if (options.copy_threads == 0 || options.copy_threads > 256) {
    return InvalidArgument("copy_threads must be in [1, 256], got " + std::to_string(options.copy_threads));
  }
  if (options.store_queue == 0) return InvalidArgument("store_queue must be > 0");
  if (!options.disk.path.empty() && options.write_behind && options.write_behind_queue == 0) {
    return InvalidArgument("write_behind_queue must be > 0 when write_behind is on");
  }
  KVT_ASSIGN_OR_RETURN(ChunkHasher hasher,
                       ChunkHasher::Create(options.hash_namespace, options.chunk_tokens, options.partial));
  std::unique_ptr<Engine> engine(new Engine(options, std::move(hasher)));
  KVT_RETURN_IF_ERROR(engine->Init());
  return engine;
}

Engine::Engine(const EngineOptions& options, ChunkHasher hasher) : options_(options), hasher_(std::move(hasher)) {}

Status Engine::Init() {
  size_t capacity = options_.index_capacity;
  if (capacity == 0) {
    // Chunks are rarely smaller than a quarter of the largest chunk; without a
    // known chunk size assume 256 KiB chunks.
    const uint64_t est = options_.cpu.chunk_bytes ? std::max<uint64_t>(options_.cpu.chunk_bytes / 4, 4096) : 256 << 10;
    const uint64_t bytes = options_.cpu.capacity_bytes + (options_.disk.path.empty() ? 0 : options_.disk.capacity_bytes);
    capacity = static_cast<size_t>(std::clamp<uint64_t>(bytes / est, 1u << 16, 1u << 26));
  }
  if (options_.catalogue_shm_name.empty()) {
    KVT_ASSIGN_OR_RETURN(index_, ChunkIndex::Create(capacity));
  } else {
    auto shared = ChunkIndex::CreateShared(options_.catalogue_shm_name, capacity);
    if (!shared.ok()) return shared.status().Annotate("shared catalogue");
    index_ = std::move(shared).value();
  }

  if (options_.cpu.chunk_bytes != 0) KVT_RETURN_IF_ERROR(SetChunkBytes(options_.cpu.chunk_bytes));

  if (!options_.disk.path.empty()) {
    // A known chunk size sizes auto segments to hold it, and makes an
    // explicit segment size that cannot hold it an error here, at start.
    DiskTierOptions disk_opts = options_.disk;
    disk_opts.max_chunk_bytes = std::max(disk_opts.max_chunk_bytes, options_.cpu.chunk_bytes);
    if (!disk_opts.now) disk_opts.now = options_.now;  // chunks' last use (ClearChunks older_than)
    auto disk = DiskTier::Open(disk_opts);
    if (!disk.ok()) return disk.status().Annotate("disk tier at " + options_.disk.path);
    disk_ = std::move(disk).value();
    // SetChunkBytes ran above, before the disk existed to check against.
    if (cpu_chunk_bytes_ != 0) KVT_RETURN_IF_ERROR(disk_->EnsureChunkFits(cpu_chunk_bytes_));
    // Refill the catalogue with what survived the restart.
    disk_->ForEachChunk([this](const ChunkMeta& m, size_t bytes) {
      Status s = index_->Insert(m.key, m.fingerprint, m.num_tokens, static_cast<uint32_t>(bytes));
      if (!s.ok()) return;  // catalogue full: the chunk stays on disk, unreachable until space frees
      (void)index_->UpdateTiers(m.key, kTierBitDisk, 0);
      (void)index_->Publish(m.key);
    });
    disk_->SetEvictionListener([this](const ChunkKey& k) { OnTierEvicted(kTierBitDisk, k); });
    if (options_.write_behind) {
      KVT_RETURN_IF_ERROR(StartThread(&wb_thread_, [this] { WriteBehindLoop(); }).Annotate("write-behind"));
    }
  }
  KVT_ASSIGN_OR_RETURN(copy_pool_, ThreadPool::Create(options_.copy_threads, options_.store_queue, "kvt-copy"));
  if (!options_.remote.url.empty()) {
    remote::RemoteTierOptions ro = options_.remote;
    ro.namespace_digest = remote::NamespaceDigest(options_.hash_namespace, options_.chunk_tokens);
    ro.max_payload_bytes = cpu_chunk_bytes_;
    // The uploader reads a chunk from the CPU tier when its turn comes; one
    // that is gone by then is skipped (the queue holds keys, not bytes).
    auto read = [this](const ChunkMeta& m, const std::function<void(std::span<const std::byte>)>& use) {
      CpuTier* t = cpu();
      if (t == nullptr) return false;
      auto lease = t->AcquireUncounted(m.key, m.fingerprint);
      if (!lease.ok() || lease->meta().layout_id != m.layout_id) return false;
      use(lease->data());
      return true;
    };
    auto tier = remote::RemoteTier::Create(ro, std::move(read));
    if (!tier.ok()) return tier.status().Annotate("remote tier");
    remote_ = std::move(tier).value();
  }
  return Status();
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(pins_mu_);
    pin_stop_ = true;
  }
  pin_cv_.notify_all();
  if (pin_thread_.joinable()) pin_thread_.join();
  // Order matters: finish copies (they enqueue write-behind and uploads),
  // stop the uploader, drain write-behind, then tear the tiers down.
  if (copy_pool_) copy_pool_->Shutdown();
  remote_.reset();
  {
    std::lock_guard<std::mutex> lock(wb_mu_);
    wb_stop_ = true;
  }
  wb_cv_.notify_all();
  if (wb_thread_.joinable()) wb_thread_.join();
}

Status Engine::SetChunkBytes(size_t max_chunk_bytes) {
  if (max_chunk_bytes == 0) return InvalidArgument("chunk bytes must be > 0");
  std::lock_guard<std::mutex> lock(cpu_init_mu_);
  if (cpu_) {
    if (cpu_chunk_bytes_ == max_chunk_bytes) return Status();
    return FailedPrecondition("the CPU tier was created for chunks of " + std::to_string(cpu_chunk_bytes_) +
                              " bytes; cannot switch to " + std::to_string(max_chunk_bytes));
  }
  // Chunks the disk cannot hold would stay CPU-only for good: refuse the size
  // now, with the disk's message (both sizes, disk_segment_size), instead.
  if (disk_) KVT_RETURN_IF_ERROR(disk_->EnsureChunkFits(max_chunk_bytes));
  CpuTierOptions cpu_opts = options_.cpu;
  cpu_opts.chunk_bytes = max_chunk_bytes;
  if (!cpu_opts.now) cpu_opts.now = options_.now;  // one clock for TTLs and last use
  auto tier = CpuTier::Create(cpu_opts);
  if (!tier.ok()) return tier.status().Annotate("CPU tier");
  cpu_ = std::move(tier).value();
  cpu_chunk_bytes_ = max_chunk_bytes;
  cpu_->SetEvictionListener([this](const ChunkKey& k) { OnTierEvicted(kTierBitCpu, k); });
  if (remote_) remote_->SetMaxPayloadBytes(max_chunk_bytes);
  cpu_ready_.store(true, std::memory_order_release);  // pairs with the acquire in cpu()
  return Status();
}

void Engine::OnTierEvicted(uint32_t tier_bit, const ChunkKey& key) {
  auto mask = index_->UpdateTiers(key, 0, tier_bit);
  if (mask.ok() && *mask == 0 && index_->BeginEvict(key).ok()) (void)index_->Remove(key);
}

void Engine::Reconcile(const ChunkKey& key) {
  uint32_t mask = 0;
  if (cpu() && cpu()->Contains(key)) mask |= kTierBitCpu;
  if (disk_ && disk_->Contains(key)) mask |= kTierBitDisk;
  auto m = index_->UpdateTiers(key, mask, (kTierBitCpu | kTierBitDisk) & ~mask);
  if (m.ok() && *m == 0 && index_->BeginEvict(key).ok()) (void)index_->Remove(key);
}

// ---------------------------------------------------------------------------
// Lookup

size_t Engine::HashAndCachedPrefix(std::span<const int32_t> tokens, const KeyExtras* extras,
                                   std::vector<ChunkHash>* chunks) const {
  hasher_.Hash(tokens, chunks, extras);
  tl_keys.resize(chunks->size());
  tl_fps.resize(chunks->size());
  for (size_t i = 0; i < chunks->size(); ++i) {
    tl_keys[i] = (*chunks)[i].key;
    tl_fps[i] = (*chunks)[i].fingerprint;
  }
  return index_->LookupPrefix(tl_keys, tl_fps);
}

size_t Engine::Lookup(std::span<const int32_t> tokens, const KeyExtras* extras) {
  lookups_.fetch_add(1, std::memory_order_relaxed);
  lookup_query_tokens_.fetch_add(tokens.size(), std::memory_order_relaxed);
  if (!ValidateKeyExtras(extras).ok()) return 0;  // nothing was stored under invalid extras
  const size_t hit = TokensCovered(tl_chunks, HashAndCachedPrefix(tokens, extras, &tl_chunks));
  lookup_hit_tokens_.fetch_add(hit, std::memory_order_relaxed);
  return hit;
}

// ---------------------------------------------------------------------------
// Store

StatusOr<std::shared_ptr<StoreHandle>> Engine::Store(std::span<const int32_t> tokens, size_t skip_tokens,
                                                     uint64_t layout_id, const ChunkBytesFn& chunk_bytes,
                                                     FillFn fill, const KeyExtras* extras) {
  CpuTier* tier = cpu();
  if (tier == nullptr) return FailedPrecondition("Store before the chunk size is known (SetChunkBytes)");
  KVT_RETURN_IF_ERROR(ValidateKeyExtras(extras));
  store_requests_.fetch_add(1, std::memory_order_relaxed);
  std::vector<ChunkHash> chunks;
  hasher_.Hash(tokens, &chunks, extras);

  auto handle = std::make_shared<StoreHandle>();
  auto shared_fill = std::make_shared<FillFn>(std::move(fill));
  std::vector<std::pair<ChunkHash, size_t>> todo;
  for (const ChunkHash& c : chunks) {
    if (c.begin < skip_tokens) continue;  // the caller's KV for these tokens is not valid
    const size_t bytes = chunk_bytes(c.num_tokens);
    if (bytes == 0 || bytes > cpu_chunk_bytes_) {
      return InvalidArgument("chunk of " + std::to_string(c.num_tokens) + " tokens needs " + std::to_string(bytes) +
                             " bytes; the CPU tier holds at most " + std::to_string(cpu_chunk_bytes_));
    }
    todo.emplace_back(c, bytes);
  }
  {
    std::lock_guard<std::mutex> lock(handle->mu_);
    handle->pending_ = todo.size();
  }
  handle->total_ = todo.size();
  for (auto& [c, bytes] : todo) {
    Status ins = index_->Insert(c.key, c.fingerprint, c.num_tokens, static_cast<uint32_t>(bytes));
    if (ins.code() == StatusCode::kAlreadyExists) {
      chunks_skipped_present_.fetch_add(1, std::memory_order_relaxed);
      handle->ChunkDone(Status(), false);
      continue;
    }
    if (!ins.ok()) {
      store_errors_.fetch_add(1, std::memory_order_relaxed);
      handle->ChunkDone(ins.Annotate("catalogue"), false);
      continue;
    }
    const uint64_t start = NowUs();
    {
      std::lock_guard<std::mutex> lock(copy_mu_);
      ++copies_pending_;
    }
    Status sub = copy_pool_->Submit([this, c = c, bytes = bytes, layout_id, shared_fill, handle, start] {
      const uint64_t begun = NowUs();
      StoreOneGuarded(c, layout_id, bytes, *shared_fill, handle);
      store_cpu_hist_.Record(NowUs() - begun);
      store_latency_us_.fetch_add(NowUs() - start, std::memory_order_relaxed);
      CopyFinished();
    });
    if (!sub.ok()) {
      CopyFinished();
      (void)index_->Remove(c.key);
      store_errors_.fetch_add(1, std::memory_order_relaxed);
      handle->ChunkDone(sub, false);
    }
  }
  return handle;
}

StatusOr<std::shared_ptr<StoreHandle>> Engine::StoreBuffers(std::span<const int32_t> tokens, uint64_t layout_id,
                                                            std::vector<std::span<const std::byte>> chunks,
                                                            const KeyExtras* extras) {
  KVT_RETURN_IF_ERROR(ValidateKeyExtras(extras));
  std::vector<ChunkHash> hashes;
  hasher_.Hash(tokens, &hashes, extras);
  if (hashes.size() != chunks.size()) {
    return InvalidArgument("tokens make " + std::to_string(hashes.size()) + " chunks but " +
                           std::to_string(chunks.size()) + " buffers were given");
  }
  std::vector<size_t> sizes(chunks.size());
  for (size_t i = 0; i < chunks.size(); ++i) sizes[i] = chunks[i].size();
  const uint32_t ct = hasher_.chunk_tokens();
  auto index_of = [ct](const ChunkHash& c) { return static_cast<size_t>(c.begin / ct); };
  // Buffer sizes are per chunk, so the size function answers for the chunk
  // being asked about; all full chunks must agree.
  for (size_t i = 0; i + 1 < chunks.size(); ++i) {
    if (hashes[i].num_tokens == ct && sizes[i] != sizes[0]) {
      return InvalidArgument("full chunk " + std::to_string(i) + " has " + std::to_string(sizes[i]) +
                             " bytes, chunk 0 has " + std::to_string(sizes[0]));
    }
  }
  auto size_fn = [sizes, ct](uint32_t n) { return n == ct || sizes.size() == 1 ? sizes.front() : sizes.back(); };
  auto fill = [chunks = std::move(chunks), index_of](const ChunkHash& c, std::span<std::byte> dst) -> Status {
    const auto& src = chunks[index_of(c)];
    if (src.size() != dst.size()) return Internal("chunk buffer size changed");
    std::memcpy(dst.data(), src.data(), dst.size());
    return Status();
  };
  return Store(tokens, 0, layout_id, size_fn, std::move(fill), extras);
}

void Engine::CountInternalError(const Status& s) {
  internal_errors_.fetch_add(1, std::memory_order_relaxed);
  (void)LogOnce(&internal_error_logged_, s);
}

void Engine::StoreOneGuarded(const ChunkHash& chunk, uint64_t layout_id, size_t bytes, const FillFn& fill,
                             const std::shared_ptr<StoreHandle>& handle) {
  bool reported = false;
  try {
    StoreOne(chunk, layout_id, bytes, fill, handle, &reported);
  } catch (...) {
    // The thread boundary of a copy task. Unwinding has aborted any write
    // lease; what is left is the catalogue entry and the caller's handle.
    const Status s = StatusFromCurrentException("storing the chunk at token " + std::to_string(chunk.begin));
    CountInternalError(s);
    if (!reported) {
      auto e = index_->Find(chunk.key);
      if (e && e->state == EntryState::kWriting) {
        (void)index_->Remove(chunk.key);
      } else {
        Reconcile(chunk.key);
      }
      store_errors_.fetch_add(1, std::memory_order_relaxed);
      handle->ChunkDone(s, false);
    }
  }
}

void Engine::StoreOne(const ChunkHash& chunk, uint64_t layout_id, size_t bytes, const FillFn& fill,
                      const std::shared_ptr<StoreHandle>& handle, bool* reported) {
  CpuTier* tier = cpu();
  const ChunkMeta meta = MetaOf(chunk, layout_id);
  auto done = [&](const Status& s, bool stored) {
    *reported = true;
    handle->ChunkDone(s, stored);
  };
  auto fail = [&](const Status& s) {
    (void)index_->Remove(chunk.key);
    store_errors_.fetch_add(1, std::memory_order_relaxed);
    done(s, false);
  };
  auto lease = tier->BeginPut(meta, bytes);
  // Back-pressure: a CPU tier full of chunks pinned for write-behind frees
  // up as the disk catches up, so wait for it (bounded) instead of failing.
  for (int waits = 0; !lease.ok() && lease.status().code() == StatusCode::kResourceExhausted &&
                      WaitForWriteBehindProgress() && waits < 100;
       ++waits) {
    lease = tier->BeginPut(meta, bytes);
  }
  if (!lease.ok()) {
    if (lease.status().code() == StatusCode::kAlreadyExists) {
      // Still in the CPU tier from before (the catalogue had lost it, e.g.
      // after Clear raced a store): adopt it.
      (void)index_->UpdateTiers(chunk.key, kTierBitCpu, 0);
      (void)index_->Publish(chunk.key);
      done(Status(), false);
      return;
    }
    return fail(lease.status().Annotate("CPU tier"));
  }
  // The caller's code (a binding, a CUDA gather): the one place here that
  // is expected to throw, if anything does.
  Status f;
  try {
    f = fill(chunk, lease->data());
  } catch (...) {
    f = StatusFromCurrentException("FillFn");
    CountInternalError(f);
  }
  if (!f.ok()) return fail(f.Annotate("filling chunk at token " + std::to_string(chunk.begin)));
  // Set the tier bit before the chunk becomes visible so a concurrent
  // eviction's clear cannot be overwritten by a late set.
  (void)index_->UpdateTiers(chunk.key, kTierBitCpu, 0);
  // A chunk bound for the disk commits already held: it must not be
  // evicted before write-behind (or write-through, below) has filed it (I2, I3).
  const bool to_disk = disk_ != nullptr;
  const std::span<const std::byte> data = lease->data();  // fixed in place while held
  Status c = tier->Commit(std::move(lease).value(), /*held=*/to_disk);
  if (!c.ok()) return fail(c.Annotate("CPU tier commit"));
  (void)index_->Publish(chunk.key);
  // An eviction between Commit and Publish could not remove a kWriting
  // entry; repair I1 here.
  auto e = index_->Find(chunk.key);
  if (e && e->tier_mask == 0 && index_->BeginEvict(chunk.key).ok()) (void)index_->Remove(chunk.key);
  chunks_stored_.fetch_add(1, std::memory_order_relaxed);
  tokens_stored_.fetch_add(chunk.num_tokens, std::memory_order_relaxed);
  bytes_stored_.fetch_add(bytes, std::memory_order_relaxed);
  if (to_disk && !options_.write_behind) {
    // Write-through: the handle completes once the disk has the chunk, or
    // with the disk's error (the chunk then stays CPU-only).
    return done(WriteThrough(meta, data), true);
  }
  if (remote_) remote_->Enqueue(meta);
  EnqueueWriteBehind(meta);
  done(Status(), true);
}

Status Engine::WriteThrough(const ChunkMeta& meta, std::span<const std::byte> data) {
  Status s;
  try {
    const uint64_t begun = NowUs();
    std::vector<Status> results = disk_->PutBatch(std::span<const ChunkMeta>(&meta, 1),
                                                  std::span<const std::span<const std::byte>>(&data, 1));
    store_disk_hist_.Record(NowUs() - begun);
    if (options_.test_disk_write_results) options_.test_disk_write_results(results);
    s = results.at(0);
  } catch (...) {
    s = StatusFromCurrentException("write-through");
    CountInternalError(s);
  }
  if (s.ok() || s.code() == StatusCode::kAlreadyExists) {
    (void)index_->UpdateTiers(meta.key, kTierBitDisk, 0);
    wb_written_.fetch_add(1, std::memory_order_relaxed);
    s = Status::Ok();
  } else {
    if (!IsTransientDiskError(s)) LogPermanentDiskFailure(s, data.size());
    wb_failed_.fetch_add(1, std::memory_order_relaxed);
    NoteDiskFailure();
    s = s.Annotate("write-through to the disk tier (the chunk stays in the CPU tier)");
  }
  (void)cpu()->ReleaseHold(meta.key);  // filed or not: evictable like any other chunk now
  return s;
}

void Engine::CopyFinished() {
  bool idle = false;
  {
    std::lock_guard<std::mutex> lock(copy_mu_);
    idle = --copies_pending_ == 0;
  }
  if (idle) copy_idle_cv_.notify_all();
}

// ---------------------------------------------------------------------------
// Retrieve

namespace {

Status LayoutMismatch(const ChunkHash& chunk, uint64_t stored, uint64_t wanted) {
  return InvalidArgument("chunk at token " + std::to_string(chunk.begin) + " was stored from KV layout " +
                         std::to_string(stored) + ", the destination layout is " + std::to_string(wanted));
}

}  // namespace

StatusOr<CpuTier::ReadLease> Engine::PromoteFromDisk(const ChunkHash& chunk, std::optional<uint64_t> layout_id,
                                                     bool* stale_layout) {
  CpuTier* tier = cpu();
  if (disk_ == nullptr || tier == nullptr) return NotFound("no disk tier");
  auto meta = disk_->GetMeta(chunk.key);
  if (!meta.ok()) return meta.status();
  // Checked before the read: a stale chunk is not worth a disk read or CPU space.
  if (layout_id && meta->layout_id != *layout_id) {
    *stale_layout = true;
    return LayoutMismatch(chunk, meta->layout_id, *layout_id);
  }
  auto size = disk_->SizeOf(chunk.key);
  if (!size.ok()) return size.status();
  auto lease = tier->BeginPut(*meta, *size);
  if (!lease.ok()) {
    // Another thread promoted it first: read it from CPU.
    if (lease.status().code() == StatusCode::kAlreadyExists) return tier->Acquire(chunk.key, chunk.fingerprint);
    return lease.status();
  }
  Status g = disk_->Get(chunk.key, chunk.fingerprint, lease->data());
  if (!g.ok()) return g;
  (void)index_->UpdateTiers(chunk.key, kTierBitCpu, 0);
  KVT_RETURN_IF_ERROR(tier->Commit(std::move(lease).value()));
  return tier->Acquire(chunk.key, chunk.fingerprint);
}

StatusOr<CpuTier::ReadLease> Engine::AcquireInCpu(const ChunkHash& chunk) {
  CpuTier* tier = cpu();
  if (tier == nullptr) return FailedPrecondition("the CPU tier does not exist yet (SetChunkBytes)");
  auto lease = tier->AcquireUncounted(chunk.key, chunk.fingerprint);
  if (lease.ok() || lease.status().code() != StatusCode::kNotFound || disk_ == nullptr) return lease;
  bool stale = false;
  return PromoteFromDisk(chunk, std::nullopt, &stale);
}

StatusOr<CpuTier::ReadLease> Engine::LoadOne(const ChunkHash& chunk, const IndexEntry& entry, uint64_t layout_id,
                                             bool* from_disk, bool* stale_layout) {
  CpuTier* tier = cpu();
  if (tier == nullptr) return FailedPrecondition("retrieve before the chunk size is known (SetChunkBytes)");
  *from_disk = false;
  auto lease = tier->Acquire(chunk.key, chunk.fingerprint);
  if (!lease.ok() && lease.status().code() == StatusCode::kNotFound) {
    if (entry.tier_mask & kTierBitCpu) (void)index_->UpdateTiers(chunk.key, 0, kTierBitCpu);  // stale bit
    lease = PromoteFromDisk(chunk, layout_id, stale_layout);
    *from_disk = lease.ok();
  }
  if (!lease.ok()) return lease.status();
  if (lease->meta().layout_id != layout_id) {
    *stale_layout = true;
    return LayoutMismatch(chunk, lease->meta().layout_id, layout_id);
  }
  return lease;
}

size_t Engine::DropStaleLayout(const ChunkHash& chunk, uint64_t layout_id) {
  size_t dropped = 0;
  if (CpuTier* tier = cpu()) {
    auto meta = tier->GetMeta(chunk.key);
    if (meta.ok() && meta->layout_id != layout_id && tier->Remove(chunk.key).ok()) {
      ++dropped;
      cpu_evict_layout_.fetch_add(1, std::memory_order_relaxed);
    }
  }
  if (disk_ != nullptr) {
    auto meta = disk_->GetMeta(chunk.key);
    if (meta.ok() && meta->layout_id != layout_id && disk_->Remove(chunk.key).ok()) {
      ++dropped;
      disk_evict_layout_.fetch_add(1, std::memory_order_relaxed);
    }
  }
  if (dropped != 0) Reconcile(chunk.key);
  return dropped;
}

StatusOr<size_t> Engine::RetrieveLoop(std::span<const int32_t> tokens, size_t skip_tokens, uint64_t layout_id,
                                      const KeyExtras* extras, const LeaseSink& sink) {
  KVT_RETURN_IF_ERROR(ValidateKeyExtras(extras));
  const uint64_t start = NowUs();
  retrieve_requests_.fetch_add(1, std::memory_order_relaxed);
  std::vector<ChunkHash> chunks;
  hasher_.Hash(tokens, &chunks, extras);
  size_t valid = std::min(skip_tokens, tokens.size());
  for (const ChunkHash& c : chunks) {
    const size_t end = c.begin + c.num_tokens;
    if (end <= skip_tokens) continue;
    auto entry = index_->Find(c.key);
    if (!entry || entry->state != EntryState::kReady || entry->fingerprint != c.fingerprint) {
      retrieve_misses_.fetch_add(1, std::memory_order_relaxed);
      break;
    }
    bool from_disk = false, stale_layout = false;
    const uint64_t load_start = NowUs();
    auto lease = LoadOne(c, *entry, layout_id, &from_disk, &stale_layout);
    if (stale_layout) {
      // Stored from another layout: a miss, and the stale copies go, here and
      // for the rest of this request's chunks, so that Lookup stops promising
      // them and the caller's next Store files its own KV (one retrieve
      // repairs the whole prompt, not one chunk per request).
      load_errors_.fetch_add(1, std::memory_order_relaxed);
      size_t dropped_chunks = 0;
      for (size_t j = static_cast<size_t>(&c - chunks.data()); j < chunks.size(); ++j) {
        if (DropStaleLayout(chunks[j], layout_id) != 0) ++dropped_chunks;
      }
      layout_mismatches_.fetch_add(dropped_chunks, std::memory_order_relaxed);
      break;
    }
    Status s = lease.ok() ? sink(c, std::move(lease).value()) : lease.status();
    if (!s.ok()) {
      // No room to promote (the CPU tier is full of pinned chunks, e.g. a
      // long prefix leased at once), or another thread promoting the same
      // chunk right now (its copy is in flight), is a miss: the chunk itself
      // is fine, and the catalogue is right about it.
      const bool busy = s.code() == StatusCode::kResourceExhausted || s.code() == StatusCode::kFailedPrecondition;
      const bool miss = busy || s.code() == StatusCode::kNotFound;
      (miss ? retrieve_misses_ : load_errors_).fetch_add(1, std::memory_order_relaxed);
      // A tier may have dropped the chunk (gone, or failed its checksum):
      // make the catalogue say what the tiers hold, so Lookup stops
      // promising it and the next store can file it again (I1).
      if (s.code() != StatusCode::kInvalidArgument && !busy) Reconcile(c.key);
      break;
    }
    (from_disk ? chunks_loaded_disk_ : chunks_loaded_cpu_).fetch_add(1, std::memory_order_relaxed);
    (from_disk ? load_disk_hist_ : load_cpu_hist_).Record(NowUs() - load_start);
    chunks_loaded_.fetch_add(1, std::memory_order_relaxed);
    const size_t new_tokens = end - std::max<size_t>(c.begin, skip_tokens);
    tokens_loaded_.fetch_add(new_tokens, std::memory_order_relaxed);
    bytes_loaded_.fetch_add(entry->size_bytes, std::memory_order_relaxed);
    valid = end;
  }
  retrieve_latency_us_.fetch_add(NowUs() - start, std::memory_order_relaxed);
  return valid;
}

StatusOr<size_t> Engine::Retrieve(std::span<const int32_t> tokens, size_t skip_tokens, uint64_t layout_id,
                                  const ConsumeFn& consume, const KeyExtras* extras) {
  // Each lease is released as soon as its chunk is consumed.
  return RetrieveLoop(tokens, skip_tokens, layout_id, extras,
                      [&](const ChunkHash& c, CpuTier::ReadLease&& lease) { return consume(c, lease.data()); });
}

StatusOr<Engine::PrefixLeases> Engine::AcquirePrefix(std::span<const int32_t> tokens, size_t skip_tokens,
                                                     uint64_t layout_id, const KeyExtras* extras) {
  PrefixLeases out;
  auto valid = RetrieveLoop(tokens, skip_tokens, layout_id, extras, [&](const ChunkHash& c, CpuTier::ReadLease&& lease) {
    out.chunks.push_back(c);
    out.leases.push_back(std::move(lease));
    return Status::Ok();
  });
  if (!valid.ok()) return valid.status();
  out.valid_tokens = *valid;
  return out;
}

size_t Engine::Prefetch(std::span<const int32_t> tokens, const KeyExtras* extras) {
  if (disk_ == nullptr || cpu() == nullptr || !ValidateKeyExtras(extras).ok()) return 0;
  std::vector<ChunkHash> chunks;
  hasher_.Hash(tokens, &chunks, extras);
  size_t queued = 0;
  for (const ChunkHash& c : chunks) {
    auto entry = index_->Find(c.key);
    if (!entry || entry->state != EntryState::kReady) break;
    if (cpu()->Contains(c.key)) continue;
    if (!(entry->tier_mask & kTierBitDisk)) break;
    Status s = copy_pool_->Submit([this, c] {
      bool stale = false;
      (void)PromoteFromDisk(c, std::nullopt, &stale);
    });
    if (!s.ok()) break;
    ++queued;
  }
  return queued;
}

// ---------------------------------------------------------------------------
// Pin / Flush / Clear

size_t Engine::Pin(std::span<const int32_t> tokens, const KeyExtras* extras) {
  if (!ValidateKeyExtras(extras).ok()) return 0;
  std::vector<ChunkHash> chunks;
  hasher_.Hash(tokens, &chunks, extras);
  std::lock_guard<std::mutex> lock(pins_mu_);
  return PinLocked(chunks, nullptr);
}

size_t Engine::PinLocked(const std::vector<ChunkHash>& chunks, std::vector<ChunkKey>* pinned) {
  size_t n = 0;
  for (const ChunkHash& c : chunks) {
    if (!index_->Pin(c.key).ok()) break;
    UserPins& taken = user_pins_[c.key];
    if (cpu() && cpu()->Pin(c.key).ok()) ++taken.cpu;
    if (disk_ && disk_->Pin(c.key).ok()) ++taken.disk;
    if (taken.cpu == 0 && taken.disk == 0) user_pins_.erase(c.key);
    if (pinned != nullptr) pinned->push_back(c.key);
    ++n;
  }
  return n;
}

size_t Engine::Unpin(std::span<const int32_t> tokens, const KeyExtras* extras) {
  if (!ValidateKeyExtras(extras).ok()) return 0;
  std::vector<ChunkHash> chunks;
  hasher_.Hash(tokens, &chunks, extras);
  size_t unpinned = 0;
  std::lock_guard<std::mutex> lock(pins_mu_);
  for (const ChunkHash& c : chunks) {
    if (!UnpinKeyLocked(c.key)) break;
    ++unpinned;
  }
  return unpinned;
}

bool Engine::UnpinKeyLocked(const ChunkKey& key) {
  if (!index_->Unpin(key).ok()) return false;
  auto it = user_pins_.find(key);
  if (it == user_pins_.end()) return true;  // this pin found the chunk in no tier: nothing to release
  UserPins& taken = it->second;
  if (taken.cpu > 0) {
    --taken.cpu;
    (void)cpu()->Unpin(key);
  }
  if (taken.disk > 0) {
    --taken.disk;
    (void)disk_->Unpin(key);
  }
  if (taken.cpu == 0 && taken.disk == 0) user_pins_.erase(it);
  return true;
}

void Engine::Flush() {
  // Copy tasks first: they feed write-behind.
  {
    std::unique_lock<std::mutex> lock(copy_mu_);
    copy_idle_cv_.wait(lock, [this] { return copies_pending_ == 0; });
  }
  std::unique_lock<std::mutex> lock(wb_mu_);
  wb_idle_cv_.wait(lock, [this] { return wb_queue_.empty() && wb_in_flight_ == 0; });
}

size_t Engine::Clear() {
  auto n = ClearChunks(ClearFilter{});
  return n.ok() ? *n : 0;  // the default filter is valid
}

// ---------------------------------------------------------------------------
// Write-behind

bool Engine::WaitForWriteBehindProgress() {
  if (disk_ == nullptr || !options_.write_behind) return false;
  std::unique_lock<std::mutex> lock(wb_mu_);
  if (wb_queue_.empty() && wb_in_flight_ == 0) return false;  // nothing pinned by us to wait for
  const uint64_t seen = wb_batches_done_;
  wb_idle_cv_.wait_for(lock, std::chrono::milliseconds(50), [&] { return wb_batches_done_ != seen; });
  return true;
}

void Engine::EnqueueWriteBehind(const ChunkMeta& meta) {
  if (disk_ == nullptr || !options_.write_behind) return;
  CpuTier* tier = cpu();
  // The chunk was committed held; the hold passes to the queue and keeps it
  // in CPU until it is safely on disk (I2, I3).
  {
    std::lock_guard<std::mutex> lock(wb_mu_);
    if (wb_queue_.size() < options_.write_behind_queue) {
      wb_queue_.push_back(WbItem{meta, 0, 0});
      wb_cv_.notify_one();
      return;
    }
  }
  (void)tier->ReleaseHold(meta.key);
  wb_dropped_.fetch_add(1, std::memory_order_relaxed);
  last_wb_drop_ns_.store(NowNs(), std::memory_order_relaxed);
}

void Engine::LogPermanentDiskFailure(const Status& s, size_t chunk_bytes) {
  // At most one line a minute: the same misconfiguration fails every chunk.
  const int64_t now = NowMs();
  int64_t last = last_disk_failure_log_ms_.load(std::memory_order_relaxed);
  if (last != 0 && now - last < 60'000) return;
  if (!last_disk_failure_log_ms_.compare_exchange_strong(last, now, std::memory_order_relaxed)) return;
  std::fprintf(stderr,
               "kvtier: a chunk of %zu bytes cannot be written to the disk tier (it stores chunks of at most %llu "
               "bytes: segments of %llu bytes): %s; it stays in the CPU tier only and is not retried (logged at "
               "most once a minute)\n",
               chunk_bytes, static_cast<unsigned long long>(disk_->max_payload_bytes()),
               static_cast<unsigned long long>(disk_->segment_bytes()), s.ToString().c_str());
}

void Engine::WriteBehindLoop() {
  constexpr size_t kBatch = 16;
  std::vector<WbItem> batch;
  std::vector<WbItem> retry;
  batch.reserve(kBatch);
  for (;;) {
    batch.clear();
    {
      std::unique_lock<std::mutex> lock(wb_mu_);
      for (;;) {
        if (wb_queue_.empty()) {
          if (wb_stop_) return;
          wb_idle_cv_.notify_all();
          wb_cv_.wait(lock);
          continue;
        }
        // Take ready items from the front; a backing-off item waits its turn.
        const int64_t now = NowMs();
        while (!wb_queue_.empty() && batch.size() < kBatch && wb_queue_.front().not_before_ms <= now) {
          batch.push_back(wb_queue_.front());
          batch.back().settled = false;
          wb_queue_.pop_front();
        }
        if (!batch.empty()) break;
        if (wb_stop_) {
          // Shutting down: give up on items still backing off.
          for (const WbItem& it : wb_queue_) (void)cpu()->ReleaseHold(it.meta.key);
          wb_queue_.clear();
          return;
        }
        wb_cv_.wait_for(lock, std::chrono::milliseconds(wb_queue_.front().not_before_ms - now));
      }
      wb_in_flight_ += batch.size();
    }

    retry.clear();
    try {
      WriteBehindBatch(batch, &retry);
    } catch (...) {
      // The write-behind thread's boundary: the rest of the batch is given
      // up (evictable again; the catalogue says what the tiers hold, which
      // may include a disk copy written before the throw) and the thread
      // goes on.
      CountInternalError(StatusFromCurrentException("write-behind"));
      for (WbItem& it : batch) {
        if (it.settled) continue;
        (void)cpu()->ReleaseHold(it.meta.key);
        Reconcile(it.meta.key);
        wb_failed_.fetch_add(1, std::memory_order_relaxed);
      }
    }
    {
      std::lock_guard<std::mutex> lock(wb_mu_);
      for (WbItem& it : retry) wb_queue_.push_back(it);
      wb_in_flight_ -= batch.size();
      ++wb_batches_done_;
    }
    wb_idle_cv_.notify_all();
  }
}

void Engine::WriteBehindBatch(std::vector<WbItem>& batch, std::vector<WbItem>* retry) {
  CpuTier* tier = cpu();
  std::vector<CpuTier::ReadLease> leases;
  std::vector<ChunkMeta> metas;
  std::vector<std::span<const std::byte>> datas;
  std::vector<size_t> which;
  leases.reserve(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    auto lease = tier->Acquire(batch[i].meta.key, batch[i].meta.fingerprint);
    if (!lease.ok()) {  // expired meanwhile: nothing to file
      (void)tier->ReleaseHold(batch[i].meta.key);
      batch[i].settled = true;
      continue;
    }
    metas.push_back(batch[i].meta);
    datas.push_back(lease->data());
    leases.push_back(std::move(lease).value());
    which.push_back(i);
  }
  const uint64_t begun = NowUs();
  std::vector<Status> results = disk_->PutBatch(metas, datas);
  store_disk_hist_.Record(NowUs() - begun);
  if (options_.test_disk_write_results) options_.test_disk_write_results(results);
  leases.clear();
  for (size_t j = 0; j < which.size(); ++j) {
    WbItem& it = batch[which[j]];
    const Status& s = results[j];
    if (s.ok() || s.code() == StatusCode::kAlreadyExists) {
      (void)index_->UpdateTiers(it.meta.key, kTierBitDisk, 0);
      (void)tier->ReleaseHold(it.meta.key);
      wb_written_.fetch_add(1, std::memory_order_relaxed);
    } else if (IsTransientDiskError(s) && ++it.attempts < options_.write_behind_retries) {
      it.not_before_ms = NowMs() + (static_cast<int64_t>(options_.write_behind_backoff_ms) << (it.attempts - 1));
      wb_retries_.fetch_add(1, std::memory_order_relaxed);
      retry->push_back(it);  // stays held in CPU while it waits
    } else {
      // Out of retries, or an error that retrying cannot fix: give up now
      // rather than keep the chunk held through five backoffs.
      if (!IsTransientDiskError(s)) LogPermanentDiskFailure(s, datas[j].size());
      (void)tier->ReleaseHold(it.meta.key);  // stays CPU-only; evictable again
      wb_failed_.fetch_add(1, std::memory_order_relaxed);
      NoteDiskFailure();
    }
    it.settled = true;
  }
}

// ---------------------------------------------------------------------------
// Stats

EngineStats Engine::Stats() const {
  EngineStats s;
  auto ld = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  s.lookups = ld(lookups_);
  s.lookup_hit_tokens = ld(lookup_hit_tokens_);
  s.lookup_query_tokens = ld(lookup_query_tokens_);
  s.store_requests = ld(store_requests_);
  s.chunks_stored = ld(chunks_stored_);
  s.chunks_skipped_present = ld(chunks_skipped_present_);
  s.store_errors = ld(store_errors_);
  s.tokens_stored = ld(tokens_stored_);
  s.bytes_stored = ld(bytes_stored_);
  s.retrieve_requests = ld(retrieve_requests_);
  s.chunks_loaded = ld(chunks_loaded_);
  s.tokens_loaded = ld(tokens_loaded_);
  s.bytes_loaded = ld(bytes_loaded_);
  s.chunks_loaded_cpu = ld(chunks_loaded_cpu_);
  s.chunks_loaded_disk = ld(chunks_loaded_disk_);
  s.retrieve_misses = ld(retrieve_misses_);
  s.load_errors = ld(load_errors_);
  s.layout_mismatches = ld(layout_mismatches_);
  s.write_behind_written = ld(wb_written_);
  s.write_behind_retries = ld(wb_retries_);
  s.write_behind_failed = ld(wb_failed_);
  s.write_behind_dropped = ld(wb_dropped_);
  s.store_latency_us_total = ld(store_latency_us_);
  s.retrieve_latency_us_total = ld(retrieve_latency_us_);
  // Copy tasks catch their own; the pool counts what other tasks (prefetch) threw.
  s.internal_errors = ld(internal_errors_) + (copy_pool_ ? copy_pool_->task_exceptions() : 0);
  {
    std::lock_guard<std::mutex> lock(wb_mu_);
    s.write_behind_queue_depth = wb_queue_.size() + wb_in_flight_;
  }
  s.catalogue_entries = index_->size();
  if (CpuTier* t = cpu()) {
    s.has_cpu = true;
    s.cpu = t->Stats();
  }
  if (disk_) {
    s.has_disk = true;
    s.disk = disk_->Stats();
  }
  s.chunks_fetched_remote = ld(chunks_fetched_remote_);
  if (remote_) {
    s.has_remote = true;
    s.remote = remote_->Stats();
    s.load_remote_us = remote_->FetchLatency();
  }
  // Operations additions.
  s.catalogue_capacity = index_->capacity();
  s.cpu_evictions.capacity = s.cpu.evictions - s.cpu.evictions_expired;
  s.cpu_evictions.expired = s.cpu.evictions_expired;
  s.cpu_evictions.clear = ld(cpu_evict_clear_);
  s.cpu_evictions.layout_mismatch = ld(cpu_evict_layout_);
  if (disk_) {
    s.disk_evictions.capacity = s.disk.evictions;
    s.disk_evictions.corrupt = disk_->batch_counters().checksum_failures;
  }
  s.disk_evictions.clear = ld(disk_evict_clear_);
  s.disk_evictions.layout_mismatch = ld(disk_evict_layout_);
  s.load_cpu_us = load_cpu_hist_.Get();
  s.load_disk_us = load_disk_hist_.Get();
  s.store_cpu_us = store_cpu_hist_.Get();
  s.store_disk_us = store_disk_hist_.Get();
  s.pins_expired = ld(pins_expired_);
  s.moves_started = ld(moves_started_);
  s.moves_chunks_moved = ld(moves_moved_);
  s.moves_chunks_failed = ld(moves_failed_);
  s.copies_pending = copy_pool_ ? copy_pool_->queue_depth() : 0;
  s.pins_with_ttl = ld(timed_pin_chunks_);
  return s;
}

// ---------------------------------------------------------------------------
// Remote tier

namespace {
// Chunks asked of the remote at once past the local prefix: bounds one
// lookup's round trip and one fetch's memory (the largest chunk each).
constexpr size_t kRemoteWindowChunks = 256;
}  // namespace

size_t Engine::LookupRemote(std::span<const int32_t> tokens, const KeyExtras* extras) {
  if (!ValidateKeyExtras(extras).ok()) return 0;
  std::vector<ChunkHash> chunks;
  size_t n = HashAndCachedPrefix(tokens, extras, &chunks);
  if (remote_ != nullptr && n < chunks.size()) {
    std::vector<ChunkMeta> rest;
    for (size_t i = n; i < chunks.size() && rest.size() < kRemoteWindowChunks; ++i) rest.push_back(MetaOf(chunks[i], 0));
    n += remote_->ContainsPrefix(rest);
  }
  return TokensCovered(chunks, n);
}

size_t Engine::FetchRemote(std::span<const int32_t> tokens, uint64_t layout_id, const KeyExtras* extras) {
  if (!ValidateKeyExtras(extras).ok()) return 0;
  std::vector<ChunkHash> chunks;
  const size_t local = HashAndCachedPrefix(tokens, extras, &chunks);
  CpuTier* tier = cpu();
  if (remote_ == nullptr || tier == nullptr || local == chunks.size()) return TokensCovered(chunks, local);
  std::vector<ChunkMeta> rest;
  for (size_t i = local; i < chunks.size() && rest.size() < kRemoteWindowChunks; ++i) {
    rest.push_back(MetaOf(chunks[i], layout_id));
  }
  // Each valid chunk is filed like a store of it (BeginImport /
  // CommitImport). A chunk someone else is writing right now ends the
  // prefix (its bytes are not ours).
  const size_t fetched = remote_->Fetch(rest, layout_id, [&](size_t i, std::span<const std::byte> payload) -> Status {
    auto slot = BeginImport(rest[i], payload.size());
    if (slot.status().code() == StatusCode::kAlreadyExists) return Status::Ok();
    KVT_RETURN_IF_ERROR(slot.status());
    std::memcpy(slot->data().data(), payload.data(), payload.size());
    KVT_RETURN_IF_ERROR(CommitImport(std::move(slot).value()));
    chunks_fetched_remote_.fetch_add(1, std::memory_order_relaxed);
    return Status::Ok();
  });
  return TokensCovered(chunks, local + fetched);
}

Engine::ImportSlot& Engine::ImportSlot::operator=(ImportSlot&& o) noexcept {
  if (this != &o) {
    Withdraw();
    engine_ = std::exchange(o.engine_, nullptr);
    key_ = o.key_;
    lease_ = std::move(o.lease_);
  }
  return *this;
}

void Engine::ImportSlot::Withdraw() {
  if (engine_ == nullptr) return;
  // The reservation goes before the catalogue forgets the key, so no new
  // writer of the key meets our half-filled slab.
  { CpuTier::WriteLease drop(std::move(lease_)); }
  (void)engine_->index_->Remove(key_);
  engine_ = nullptr;
}

StatusOr<Engine::ImportSlot> Engine::BeginImport(const ChunkMeta& m, size_t bytes) {
  CpuTier* tier = cpu();
  if (tier == nullptr) return FailedPrecondition("BeginImport before SetChunkBytes");
  if (bytes == 0 || bytes > cpu_chunk_bytes_) {
    return InvalidArgument("imported chunk of " + std::to_string(bytes) + " bytes; the CPU tier holds 1.." +
                           std::to_string(cpu_chunk_bytes_));
  }
  Status ins = index_->Insert(m.key, m.fingerprint, m.num_tokens, static_cast<uint32_t>(bytes));
  if (ins.code() == StatusCode::kAlreadyExists) {
    auto e = index_->Find(m.key);
    return e && e->state == EntryState::kReady ? AlreadyExists("chunk cached already")
                                               : Unavailable("chunk being written");
  }
  KVT_RETURN_IF_ERROR(ins);
  auto lease = tier->BeginPut(m, bytes);
  if (!lease.ok()) {
    (void)index_->Remove(m.key);
    return lease.status();
  }
  return ImportSlot(this, std::move(lease).value());
}

Status Engine::CommitImport(ImportSlot&& slot) {
  if (slot.engine_ != this) return InvalidArgument("CommitImport of an empty slot or another engine's");
  const ChunkMeta m = slot.meta();
  (void)index_->UpdateTiers(m.key, kTierBitCpu, 0);
  // Held for write-behind, which takes the hold over (write-through mode
  // leaves imported chunks CPU-only: nothing here waits for a disk).
  const bool to_disk = disk_ != nullptr && options_.write_behind;
  Status c = cpu()->Commit(std::move(slot.lease_), /*held=*/to_disk);
  if (!c.ok()) return c;  // slot withdraws the catalogue entry
  slot.engine_ = nullptr;
  (void)index_->Publish(m.key);
  auto e = index_->Find(m.key);
  if (e && e->tier_mask == 0 && index_->BeginEvict(m.key).ok()) (void)index_->Remove(m.key);
  EnqueueWriteBehind(m);
  return Status::Ok();
}

void Engine::FlushRemote() {
  if (remote_) remote_->Flush();
}

}  // namespace kvtier
