// Engine: the kvtier facade. Lookup / store / retrieve / pin / clear / stats
// over the chunk index (the catalogue) and the tiers (CPU DRAM, local disk,
// and a shared remote store: Redis / Valkey).
// Usable from C++ with no Python (see cc/engine/example_embed.cc).
//
// Data model
// - A prompt's tokens are cut into chunks of chunk_tokens and hashed into a
//   chain of ChunkKeys (cc/hash). A chunk's bytes are whatever the caller's
//   data path produces for it (for vLLM: the layer-major KV buffer of
//   cc/datapath); the engine treats them as opaque bytes plus a layout_id.
// - The catalogue (ChunkIndex) maps key -> state and a tier mask. It is the
//   only structure Lookup reads, so it can live in shared memory and be read
//   by another process.
//
// Store path (asynchronous, never blocks the caller on I/O)
//   Store() hashes the tokens on the calling thread, then for every chunk not
//   yet catalogued a copy task: index Insert (kWriting) -> CpuTier BeginPut ->
//   fill(dst) writes straight into slab memory -> Commit -> catalogue tier
//   bit + Publish (kReady) -> write-behind to disk. A chunk already present
//   or being written by someone else is skipped (counted, not an error).
//
// Write-behind (CPU -> disk)
//   A committed chunk is held in the CPU tier and queued (bounded); a
//   writer thread files batches to the disk tier and releases them. A disk
//   write that failed transiently (kIoError, kResourceExhausted,
//   kUnavailable) keeps the data in CPU and is retried with exponential
//   backoff (max write_behind_retries attempts) before the chunk is left
//   CPU-only; any other error (e.g. a chunk too large for a disk segment)
//   cannot succeed on retry and leaves it CPU-only at once, with one stderr
//   line (at most one a minute) naming the chunk and segment sizes.
//   A full queue leaves the chunk CPU-only and counts write_behind_dropped.
//   When the CPU tier is full of chunks pinned for write-behind, a store
//   waits for the writer (back-pressure, bounded) instead of failing.
//
// Remote tier (optional; cc/tiers/remote/remote_tier.h)
//   The catalogue lists local chunks only; the remote is asked explicitly.
//   Every chunk committed to the CPU tier by a store is also queued for
//   upload (bounded; a full queue drops it, counted). LookupRemote and
//   FetchRemote look past the local prefix; a fetched chunk is checked (key,
//   fingerprint, layout, checksums) and then stored in the CPU tier like a
//   promoted one, so Retrieve serves it from there.
//
// Retrieve path (synchronous on the caller's thread)
//   For chunks in prefix order: CPU hit -> ReadLease (pins) -> consume(src);
//   CPU miss, disk hit -> promote: BeginPut in CPU, disk read straight into
//   it, Commit, then consume. The first miss, fingerprint/checksum failure or
//   layout mismatch ends the prefix: wrong KV is never handed out. A chunk
//   another thread is promoting at that moment, or that finds no room in a
//   CPU tier full of pinned chunks, is a miss too (not a load error).
//   Lookup is a snapshot of the catalogue: a retrieve may deliver less than
//   it promised when chunks leave meanwhile, and even at rest (a TTL-expired
//   CPU copy stays catalogued until something meets it; a retrieve's own
//   promotions may evict a CPU-only chunk further along the prefix). A
//   retrieve that stops short at a chunk no tier holds any more removes it
//   from the catalogue.
//   A chunk stored from another KV layout (the layout_id is not part of the
//   key: e.g. a restart with another attention backend) is stale: it is a
//   miss, and it and the rest of the request's chunks stored from another
//   layout are removed from every tier and the catalogue (unless pinned), so
//   Lookup stops promising them and the next Store files the new layout's
//   KV. Counted in layout_mismatches (and load_errors, once per retrieve).
//
// Invariants
//   I1 A key is kReady in the catalogue only while at least one tier holds a
//      committed copy (tier listeners clear bits; an empty mask removes it).
//   I2 Chunks pinned by a user, leased by a reader or held for write-behind
//      are never evicted. Each owner releases only its own pins (CpuTier
//      keeps user pins, lease pins and holds apart), and Engine::Unpin
//      releases exactly the tier pins its Pin took: a pin taken while a
//      chunk was disk-only pinned nothing in CPU, and its Unpin releases
//      nothing there, so no unpin can end a reader's lease.
//   I3 Loss happens only by eviction policy, never by an I/O fault.
//
// Thread boundaries: nothing thrown on the engine's threads (a FillFn that
// throws, std::bad_alloc) reaches std::terminate. A copy task turns it into
// kInternal in the store's handle and drops the chunk; the write-behind
// thread gives up on its batch (the chunks stay CPU-only) and goes on. Each
// is counted in internal_errors and the first one logged to stderr.
//
// Thread safety: every public method may be called from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cc/common/status.h"
#include "cc/common/thread_pool.h"
#include "cc/hash/chunk_hash.h"
#include "cc/index/chunk_index.h"
#include "cc/tiers/cpu/cpu_tier.h"
#include "cc/tiers/disk/disk_tier.h"
#include "cc/tiers/latency_histogram.h"
#include "cc/tiers/remote/remote_tier.h"

namespace kvtier {

inline constexpr uint32_t kTierBitCpu = 1u << 0;
inline constexpr uint32_t kTierBitDisk = 1u << 1;

struct EngineOptions {
  // Hashing
  HashNamespace hash_namespace;
  uint32_t chunk_tokens = 256;
  PartialChunkPolicy partial = PartialChunkPolicy::kKeep;

  // Catalogue: 0 -> derived from the tier capacities.
  size_t index_capacity = 0;
  // Non-empty: the catalogue lives in this POSIX shm object ("/name", mode
  // 0600, see ChunkIndex::CreateShared), so another process (the vLLM
  // scheduler, through CatalogueView) can read it without a round trip.
  std::string catalogue_shm_name;

  // CPU tier. chunk_bytes is the largest chunk (the slab's full class);
  // 0 defers creating the CPU tier until SetChunkBytes() (the KV layout is
  // often only known once the inference engine registers its caches).
  CpuTierOptions cpu;

  // Disk tier; disabled when disk.path is empty. Init raises
  // disk.max_chunk_bytes to cpu.chunk_bytes, so auto segments hold a chunk.
  DiskTierOptions disk;
  // Remote tier (Redis / Valkey); disabled when remote.url is empty. Init
  // sets remote.namespace_digest from hash_namespace and chunk_tokens and
  // max_payload_bytes from the chunk size.
  remote::RemoteTierOptions remote;
  // true: stores return once chunks are in the CPU tier and a background
  // thread files them to disk. false (write-through): a store's handle
  // completes only once its chunks are on disk too (or with the disk's
  // error; the chunk then stays CPU-only). Only matters with a disk tier.
  bool write_behind = true;
  size_t write_behind_queue = 1024;
  uint32_t write_behind_retries = 5;
  uint32_t write_behind_backoff_ms = 20;  // doubles per retry

  // Store copy tasks.
  size_t copy_threads = 2;
  size_t store_queue = 4096;

  // Tests only: called with the disk tier's results of every write of
  // chunks to disk (write-behind batch or write-through), on the thread that
  // wrote them, before they are acted on. It may change them (fault
  // injection) or throw (to test the thread boundary).
  std::function<void(std::span<Status> results)> test_disk_write_results;

  // The operations API's clock (pin TTLs, Clear's older_than, chunks' last
  // use in the tiers, Health's "recently"); empty: steady_clock::now. Tests
  // move it instead of sleeping. Also the CPU tier's TTL clock unless
  // cpu.now is set. Must be cheap and must not call into the engine.
  std::function<std::chrono::steady_clock::time_point()> now;
};

// Evictions of one tier by reason (EngineStats). capacity: the tier's
// policy made room; clear: Clear / ClearChunks; expired: TTL; layout_mismatch:
// stored from another KV layout (Retrieve drops it); corrupt: failed its
// checksum on a read (disk) and dropped.
struct EvictionsByReason {
  uint64_t capacity = 0, clear = 0, expired = 0, layout_mismatch = 0, corrupt = 0;
};

struct EngineStats {
  uint64_t lookups = 0, lookup_hit_tokens = 0, lookup_query_tokens = 0;
  uint64_t store_requests = 0, chunks_stored = 0, chunks_skipped_present = 0, store_errors = 0;
  uint64_t tokens_stored = 0, bytes_stored = 0;
  uint64_t retrieve_requests = 0, chunks_loaded = 0, tokens_loaded = 0, bytes_loaded = 0;
  uint64_t chunks_loaded_cpu = 0, chunks_loaded_disk = 0, retrieve_misses = 0;
  uint64_t load_errors = 0;  // checksum / fingerprint / layout failures on retrieve
  uint64_t layout_mismatches = 0;  // chunks dropped as stored from another KV layout
  uint64_t write_behind_written = 0, write_behind_retries = 0, write_behind_failed = 0,
           write_behind_dropped = 0, write_behind_queue_depth = 0;
  uint64_t catalogue_entries = 0;
  uint64_t internal_errors = 0;  // exceptions caught at the engine's thread boundaries (bugs)
  uint64_t store_latency_us_total = 0, retrieve_latency_us_total = 0;
  uint64_t chunks_fetched_remote = 0;  // brought from the remote tier into the CPU tier
  bool has_cpu = false, has_disk = false, has_remote = false;
  TierStats cpu, disk;
  remote::RemoteTierStats remote;

  // Operations additions.
  uint64_t catalogue_capacity = 0;  // the catalogue's fixed capacity (entries)
  EvictionsByReason cpu_evictions, disk_evictions;
  // Latency histograms (LatencyHistogram: fixed log buckets, NON-cumulative
  // counts, microseconds). load_cpu / load_disk: one chunk of a retrieve,
  // from asking the tier until the chunk was handed over (consumed, for
  // Retrieve); disk is a promotion (read, verify, into CPU). load_remote:
  // one FetchRemote's remote round trips. store_cpu: one chunk's copy task
  // (fill + commit). store_disk: one disk write call (a write-behind batch
  // of up to 16 chunks, a write-through chunk, or a Move's chunk).
  LatencyHistogram::Snapshot load_cpu_us, load_disk_us, load_remote_us, store_cpu_us, store_disk_us;
  uint64_t pins_with_ttl = 0;  // chunks pinned with a TTL, not yet released
  uint64_t pins_expired = 0;   // chunk pins released by their TTL
  uint64_t copies_pending = 0; // store copy tasks queued, not yet running
  uint64_t moves_started = 0, moves_chunks_moved = 0, moves_chunks_failed = 0;
};

// Progress and outcome of one Engine::Move (asynchronous; shared between the
// caller and the task).
class MoveTask {
 public:
  struct Result {
    uint32_t tier = 0;      // kTierBitCpu or kTierBitDisk
    size_t chunks = 0;      // chunks of the cached prefix when Move was called
    size_t moved = 0;       // now in the target tier (and, for disk, out of CPU)
    size_t already = 0;     // were there already
    size_t failed = 0;      // could not be moved (gone meanwhile, pinned, I/O error)
    std::string error;      // the first failure's message; empty if none
    bool done = false;
  };
  bool done() const;
  // Waits up to timeout_ms (<0: forever); true once done.
  bool Wait(int64_t timeout_ms = -1) const;
  Result result() const;

 private:
  friend class Engine;
  void Finish();
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  Result r_;  // guarded by mu_
};

// Engine::Health's verdict. kDown: the part cannot serve at all.
enum class HealthStatus : uint8_t { kOk, kDegraded, kDown };
const char* HealthStatusName(HealthStatus s);

struct TierHealth {
  bool enabled = false;  // the tier exists (configured; CPU: chunk size known)
  HealthStatus status = HealthStatus::kOk;
  std::vector<std::string> reasons;  // why it is not ok
};

struct HealthReport {
  HealthStatus status = HealthStatus::kOk;  // the worst part (a remote down: degraded)
  std::vector<std::string> reasons;         // every part's reasons, "tier: reason"
  TierHealth cpu, disk, remote;
  uint64_t write_behind_depth = 0, write_behind_capacity = 0;
  uint64_t remote_upload_depth = 0, remote_upload_capacity = 0;
  uint64_t store_copies_pending = 0, store_queue_capacity = 0;
};

// Engine::Verify's counts (the index-consistency SLI).
struct VerifyReport {
  uint64_t entries = 0;  // catalogue entries seen (any state)
  uint64_t checked = 0;  // of which ready, so checked against their tiers
  uint64_t ok = 0;       // checked, every claimed copy present (and, deep, sound)
  uint64_t missing_cpu = 0, missing_disk = 0;  // claimed, not held
  uint64_t orphans_cpu = 0, orphans_disk = 0;  // held, not catalogued
  uint64_t corrupt = 0;  // deep: disk records that failed their checks
  bool consistent() const {
    return missing_cpu == 0 && missing_disk == 0 && orphans_cpu == 0 && orphans_disk == 0 && corrupt == 0;
  }
};

// Engine::LookupTiers: where each chunk of a cached prefix is.
struct TierLookup {
  size_t tokens = 0;  // what Lookup would return
  uint32_t chunk_tokens = 0;
  struct Chunk {
    size_t index = 0;
    uint32_t tiers = 0;  // kTierBit* of the tiers holding a copy now
    bool pinned = false; // the catalogue holds a user pin on it
  };
  std::vector<Chunk> chunks;
  size_t cpu_chunks = 0, disk_chunks = 0;
};

// Completion of one asynchronous Store(). Shared between the caller and the
// copy tasks; the caller keeps the source buffers alive until done().
class StoreHandle {
 public:
  bool done() const;
  // Waits up to timeout_ms (<0: forever). kUnavailable on timeout; otherwise
  // the first error of any chunk, or OK.
  Status Wait(int64_t timeout_ms = -1) const;
  size_t chunks_total() const { return total_; }
  size_t chunks_stored() const { return stored_.load(std::memory_order_acquire); }

 private:
  friend class Engine;
  void ChunkDone(const Status& s, bool stored);

  size_t total_ = 0;
  std::atomic<size_t> stored_{0};
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  size_t pending_ = 0;  // guarded by mu_
  Status first_error_;  // guarded by mu_
};

class Engine {
 public:
  // Fills dst with the bytes of one chunk. Runs on a copy thread, and is
  // destroyed on one: it must not hold the last reference to this Engine
  // (an Engine cannot join its own threads).
  using FillFn = std::function<Status(const ChunkHash& chunk, std::span<std::byte> dst)>;
  // Consumes the bytes of one chunk (e.g. scatters them into paged KV).
  using ConsumeFn = std::function<Status(const ChunkHash& chunk, std::span<const std::byte> src)>;
  // Bytes of a chunk of n tokens for the caller's layout.
  using ChunkBytesFn = std::function<size_t(uint32_t num_tokens)>;

  // kInvalidArgument for bad options; kIoError / kFailedPrecondition when the
  // disk directory cannot be opened or is held by another process.
  static StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);
  ~Engine();

  uint32_t chunk_tokens() const { return hasher_.chunk_tokens(); }
  const ChunkHasher& hasher() const { return hasher_; }

  // Creates the CPU tier for chunks of at most max_chunk_bytes. Idempotent
  // for the same value; kFailedPrecondition for a different one;
  // kInvalidArgument (DiskTier::EnsureChunkFits) when the disk tier's
  // segments cannot hold such chunks.
  Status SetChunkBytes(size_t max_chunk_bytes);

  // Request identity beyond token ids (cc/hash "Key extras"): every method
  // that takes tokens takes an optional `extras` (nullptr: none), and chunks
  // stored under one identity are never served to another. Invalid extras
  // (ValidateKeyExtras) make Lookup, Prefetch, Pin and Unpin return 0 and the
  // other methods kInvalidArgument.

  // Tokens of `tokens` whose KV is cached, as a prefix: a multiple of
  // chunk_tokens, or tokens.size() when the partial tail is cached too.
  size_t Lookup(std::span<const int32_t> tokens, const KeyExtras* extras = nullptr);

  // Files the chunks of tokens that are not cached yet; chunks that end at
  // or before skip_tokens are not stored (the caller did not compute them).
  // Returns kFailedPrecondition before SetChunkBytes; kInvalidArgument for a
  // chunk larger than the CPU tier's chunk size.
  StatusOr<std::shared_ptr<StoreHandle>> Store(std::span<const int32_t> tokens, size_t skip_tokens,
                                               uint64_t layout_id, const ChunkBytesFn& chunk_bytes,
                                               FillFn fill, const KeyExtras* extras = nullptr);

  // Convenience for callers that hold finished chunk buffers: one span per
  // chunk, in order (the partial tail last). The spans must stay valid until
  // the handle is done.
  StatusOr<std::shared_ptr<StoreHandle>> StoreBuffers(std::span<const int32_t> tokens, uint64_t layout_id,
                                                      std::vector<std::span<const std::byte>> chunks,
                                                      const KeyExtras* extras = nullptr);

  // Loads the cached prefix beyond skip_tokens chunk by chunk through
  // consume. Returns the number of leading tokens whose KV is now valid at
  // the destination (>= skip_tokens unless nothing could be loaded and
  // skip_tokens is 0). Never returns data that failed a check.
  StatusOr<size_t> Retrieve(std::span<const int32_t> tokens, size_t skip_tokens, uint64_t layout_id,
                            const ConsumeFn& consume, const KeyExtras* extras = nullptr);

  // The cached prefix beyond skip_tokens, handed over as read leases instead
  // of through a callback: for data paths whose copies finish after the call
  // returns (a CUDA stream). While `leases` live, their chunks are pinned in
  // the CPU tier (never evicted, never overwritten); drop them only once the
  // copy out of them is complete. Same checks, counters and prefix rule as
  // Retrieve: chunks[i] is leases[i], in prefix order, and valid_tokens is
  // what Retrieve would return. Holding many leases holds CPU memory: a
  // prefix longer than the CPU tier can hold at once ends early (a shorter
  // valid_tokens), it never fails the call.
  struct PrefixLeases {
    size_t valid_tokens = 0;
    std::vector<ChunkHash> chunks;
    std::vector<CpuTier::ReadLease> leases;
  };
  StatusOr<PrefixLeases> AcquirePrefix(std::span<const int32_t> tokens, size_t skip_tokens, uint64_t layout_id,
                                       const KeyExtras* extras = nullptr);

  // Remote tier (no-ops without one). LookupRemote: tokens cached as a
  // prefix locally or, after the local prefix, in the remote (one pipelined
  // EXISTS round trip, bounded by the remote timeout). FetchRemote: brings
  // the chunks after the local prefix that the remote holds into the CPU
  // tier (and the catalogue; write-behind files them to disk), checked
  // before they count; returns the tokens now cached locally as a prefix.
  // A remote that is down, slow or holds garbage is a miss, never an error.
  // layout_id: the caller's KV layout (another layout's chunk is a miss).
  size_t LookupRemote(std::span<const int32_t> tokens, const KeyExtras* extras = nullptr);
  size_t FetchRemote(std::span<const int32_t> tokens, uint64_t layout_id, const KeyExtras* extras = nullptr);
  // Waits until every queued remote upload has been attempted.
  void FlushRemote();

  // Imports one chunk from a source outside the tiers (a peer instance,
  // cc/transport) the way FetchRemote files a remote one, but with no
  // staging copy: BeginImport catalogues the chunk as being written and
  // reserves `bytes` of CPU slab that the caller fills (e.g. by an RDMA
  // get); CommitImport publishes it (CPU tier, catalogue kReady,
  // write-behind). The caller checks the bytes before committing; a slot
  // dropped uncommitted withdraws the chunk. BeginImport: kAlreadyExists
  // when the chunk is ready already, kUnavailable while another writer has
  // it, kFailedPrecondition before SetChunkBytes, kInvalidArgument when
  // bytes is 0 or too large for the CPU tier, kResourceExhausted when the
  // CPU tier has no room.
  class ImportSlot {
   public:
    ImportSlot(ImportSlot&& o) noexcept
        : engine_(std::exchange(o.engine_, nullptr)), key_(o.key_), lease_(std::move(o.lease_)) {}
    ImportSlot& operator=(ImportSlot&& o) noexcept;
    ~ImportSlot() { Withdraw(); }
    std::span<std::byte> data() const { return lease_.data(); }
    const ChunkMeta& meta() const { return lease_.meta(); }

   private:
    friend class Engine;
    ImportSlot(Engine* e, CpuTier::WriteLease&& l) : engine_(e), key_(l.meta().key), lease_(std::move(l)) {}
    void Withdraw();
    Engine* engine_ = nullptr;  // null once committed or withdrawn
    ChunkKey key_;
    CpuTier::WriteLease lease_;
  };
  StatusOr<ImportSlot> BeginImport(const ChunkMeta& meta, size_t bytes);
  Status CommitImport(ImportSlot&& slot);

  // Promotes the cached prefix of tokens from disk to CPU in the background.
  // Returns the number of chunks queued.
  size_t Prefetch(std::span<const int32_t> tokens, const KeyExtras* extras = nullptr);

  // Pins the cached prefix: every tier holding a chunk when Pin runs keeps
  // it (a copy made later, by promotion or write-behind, is not pinned).
  // Pins nest. Returns chunks pinned. Unpin releases, per chunk, one pin and
  // exactly the tier pins one Pin took; returns chunks unpinned.
  size_t Pin(std::span<const int32_t> tokens, const KeyExtras* extras = nullptr);
  // Pin with a TTL: the pins this call took are released (exactly as one
  // Unpin of the same tokens would) once ttl has passed on the engine's
  // clock (EngineOptions::now). A background thread ("kvt-pin-ttl", started
  // by the first such pin) releases them; ExpirePins does it synchronously.
  // Pins are counts, not owners: an Unpin before the TTL releases one pin
  // like any other, and the TTL then releases another if one is left.
  // kInvalidArgument for ttl <= 0 or invalid extras (nothing pinned).
  StatusOr<size_t> PinWithTtl(std::span<const int32_t> tokens, const KeyExtras* extras,
                              std::chrono::nanoseconds ttl);
  // Releases every TTL pin due by now + ahead (ahead > 0: as if the clock
  // had moved on; for tests and tools). Returns chunk pins released.
  size_t ExpirePins(std::chrono::nanoseconds ahead = std::chrono::nanoseconds(0));
  size_t Unpin(std::span<const int32_t> tokens, const KeyExtras* extras = nullptr);

  // Blocks until every queued store and write-behind is finished.
  void Flush();
  // Drops every unpinned chunk from every tier and the catalogue; returns
  // the catalogued chunks that lost a copy.
  size_t Clear();

  // Clear, narrowed. tiers: which copies go (kTierBit*; a chunk leaves the
  // catalogue once no copy is left; the remote tier is never cleared).
  // tokens (with extras): only the cached prefix chunks of these tokens.
  // older_than: only chunks whose last use (the most recent commit or read
  // of any of its copies, as each tier records it: CpuTier::LastUsed,
  // DiskTier::LastUsed, where a chunk found at restart counts as written
  // when the disk tier opened) is more than that long ago on the engine's
  // clock. Chunks with a user pin (catalogue or tier), leased by a reader or
  // held for write-behind stay. Waits for queued stores first (Flush).
  // Returns chunks that lost at least one copy. kInvalidArgument (nothing
  // changed) for tiers 0 or unknown bits, a negative older_than or invalid
  // extras.
  struct ClearFilter {
    uint32_t tiers = kTierBitCpu | kTierBitDisk;
    bool by_tokens = false;
    std::span<const int32_t> tokens{};
    const KeyExtras* extras = nullptr;
    std::optional<std::chrono::nanoseconds> older_than{};
  };
  StatusOr<size_t> ClearChunks(const ClearFilter& filter);

  // Moves the cached prefix of tokens to a tier, in the background (one task
  // on the copy pool; the caller never waits). kTierBitCpu: promote each
  // chunk that is only on disk into the CPU tier (what Prefetch does, with
  // an outcome). kTierBitDisk: write each chunk that is only in CPU to disk,
  // then drop its CPU copy (a chunk pinned or leased in CPU, or held for a
  // write-behind that does not finish within ~1 s, keeps it: failed).
  // kInvalidArgument for another tier value or invalid extras;
  // kFailedPrecondition when the tier (or, for disk, the CPU tier) does not
  // exist.
  StatusOr<std::shared_ptr<MoveTask>> Move(std::span<const int32_t> tokens, uint32_t tier,
                                           const KeyExtras* extras = nullptr);

  // Where each chunk of the cached prefix is now. Not a lookup: counts in
  // no statistic. kInvalidArgument for invalid extras.
  StatusOr<TierLookup> LookupTiers(std::span<const int32_t> tokens, const KeyExtras* extras = nullptr) const;

  // The index-consistency check. Every ready catalogue entry is checked
  // against the tiers its mask names; tier contents with no catalogue entry
  // are orphans; deep also reads every catalogued disk record and checks it
  // (DiskTier::VerifyRecord: not counted, nothing dropped). Read-only and
  // safe while stores run: the catalogue is walked lock-free (weakly
  // consistent: entries that come or go during the walk may be missed, never
  // misread), each tier's keys are a snapshot taken under that tier's lock,
  // and every discrepancy is re-checked against the live catalogue and tier
  // before it is counted, so a chunk written, promoted or evicted during the
  // walk is not reported. An expired CPU copy still held counts as present
  // (the catalogue keeps it until something meets it; see Retrieve).
  VerifyReport Verify(bool deep = false);

  // ok / degraded / down per tier and overall, with reasons. Disk degraded:
  // DiskTier::CheckWritable fails (e.g. its directory was removed or
  // replaced, or is not writable for this user), or in the last 60 s (the
  // engine's clock) a disk write failed for good or write-behind dropped a
  // chunk for a full queue. Remote down: the last call did not reach it;
  // degraded: timeouts seen in the last 60 s. Does file system I/O (the disk
  // probe); not for a hot path.
  HealthReport Health();

  EngineStats Stats() const;

  std::chrono::steady_clock::time_point Now() const {
    return options_.now ? options_.now() : std::chrono::steady_clock::now();
  }

  // For the peer transport's Hold: a read lease on chunk in the CPU tier,
  // promoted from the disk tier first when only there (a producer whose
  // store found the chunk already filed, e.g. after a restart or a CPU
  // eviction, must still serve it). Not counted as a lookup or a hit.
  // kNotFound when no local tier has it; kFailedPrecondition before the
  // CPU tier exists.
  StatusOr<CpuTier::ReadLease> AcquireInCpu(const ChunkHash& chunk);

  // For tests and tools: direct access to the parts.
  ChunkIndex& index() { return *index_; }
  CpuTier* cpu_tier() { return cpu_.get(); }
  DiskTier* disk_tier() { return disk_.get(); }

 private:
  explicit Engine(const EngineOptions& options, ChunkHasher hasher);
  Status Init();
  // Hashes tokens into *chunks and returns how many leading chunks the
  // catalogue holds ready (Lookup's core, also the remote's starting point).
  size_t HashAndCachedPrefix(std::span<const int32_t> tokens, const KeyExtras* extras,
                             std::vector<ChunkHash>* chunks) const;
  void OnTierEvicted(uint32_t tier_bit, const ChunkKey& key);
  // Sets the key's tier mask from what the tiers hold; removes it when none.
  void Reconcile(const ChunkKey& key);
  // One copy task: StoreOne behind the thread boundary. Reports the chunk
  // to handle exactly once, whatever StoreOne throws.
  void StoreOneGuarded(const ChunkHash& chunk, uint64_t layout_id, size_t bytes, const FillFn& fill,
                       const std::shared_ptr<StoreHandle>& handle);
  // Sets *reported just before it reports the chunk to handle.
  void StoreOne(const ChunkHash& chunk, uint64_t layout_id, size_t bytes, const FillFn& fill,
                const std::shared_ptr<StoreHandle>& handle, bool* reported);
  // Files one held chunk to disk on the calling thread and releases the
  // hold; the disk's error, annotated, if it failed.
  Status WriteThrough(const ChunkMeta& meta, std::span<const std::byte> data);
  // One stderr line (at most one a minute) for a disk write that cannot succeed.
  void LogPermanentDiskFailure(const Status& s, size_t chunk_bytes);
  // Counts an exception caught at a thread boundary; logs the first.
  void CountInternalError(const Status& s);
  // A read lease on one chunk (CPU, else disk promote), layout checked:
  // another layout is kInvalidArgument with *stale_layout set.
  StatusOr<CpuTier::ReadLease> LoadOne(const ChunkHash& chunk, const IndexEntry& entry, uint64_t layout_id,
                                       bool* from_disk, bool* stale_layout);
  // Removes the copies of chunk stored from a layout other than layout_id
  // (pinned copies stay) and makes the catalogue say what remains. Returns
  // the number of copies removed.
  size_t DropStaleLayout(const ChunkHash& chunk, uint64_t layout_id);
  // Retrieve's loop: hands each chunk of the prefix to sink in order; a
  // failing sink ends the prefix like a failed load.
  using LeaseSink = std::function<Status(const ChunkHash& chunk, CpuTier::ReadLease&& lease)>;
  StatusOr<size_t> RetrieveLoop(std::span<const int32_t> tokens, size_t skip_tokens, uint64_t layout_id,
                                const KeyExtras* extras, const LeaseSink& sink);
  // layout_id: the caller's layout; a copy from another one is not read
  // (kInvalidArgument, *stale_layout set). nullopt: any layout (Prefetch).
  StatusOr<CpuTier::ReadLease> PromoteFromDisk(const ChunkHash& chunk, std::optional<uint64_t> layout_id,
                                               bool* stale_layout);
  void CopyFinished();
  // Waits (<= 50 ms) for a write-behind batch to finish; false when nothing
  // is queued, i.e. waiting cannot free CPU space.
  bool WaitForWriteBehindProgress();
  void EnqueueWriteBehind(const ChunkMeta& meta);
  void WriteBehindLoop();
  struct WbItem;
  // Files one batch; every item ends settled (hold released, or in *retry).
  void WriteBehindBatch(std::vector<WbItem>& batch, std::vector<WbItem>* retry);
  CpuTier* cpu() const { return cpu_ready_.load(std::memory_order_acquire) ? cpu_.get() : nullptr; }

  // Operations API helpers (engine_ops.cc).
  // Pin's loop (pins_mu_ held): pins the leading chunks it can; appends
  // their keys to *pinned when not null. Returns how many.
  size_t PinLocked(const std::vector<ChunkHash>& chunks, std::vector<ChunkKey>* pinned);
  // Releases one user pin of key, exactly the tier pins one Pin took. pins_mu_ held.
  bool UnpinKeyLocked(const ChunkKey& key);
  void PinTtlLoop();
  // One chunk of a Move; updates r (not under the task's lock).
  void MoveOne(const ChunkHash& chunk, uint32_t tier, MoveTask::Result* r);
  // Now() in nanoseconds since the steady clock's epoch (for atomics).
  int64_t NowNs() const { return std::chrono::duration_cast<std::chrono::nanoseconds>(Now().time_since_epoch()).count(); }
  void NoteDiskFailure() { last_disk_failure_ns_.store(NowNs(), std::memory_order_relaxed); }

  const EngineOptions options_;
  const ChunkHasher hasher_;
  std::unique_ptr<ChunkIndex> index_;
  std::mutex cpu_init_mu_;
  std::unique_ptr<CpuTier> cpu_;  // set once under cpu_init_mu_, then read-only
  std::atomic<bool> cpu_ready_{false};
  std::unique_ptr<DiskTier> disk_;
  std::unique_ptr<ThreadPool> copy_pool_;
  size_t cpu_chunk_bytes_ = 0;  // set with cpu_ under cpu_init_mu_

  // Tier pins taken by user Pins and not yet released, per key: Unpin
  // releases what Pin took, never another owner's pin (I2). pins_mu_ is
  // held across a whole Pin/Unpin; the tiers' locks nest inside it.
  struct UserPins {
    uint32_t cpu = 0;
    uint32_t disk = 0;
  };
  std::mutex pins_mu_;
  std::unordered_map<ChunkKey, UserPins, ChunkKeyHash> user_pins_;  // guarded by pins_mu_
  // TTL pins: deadline -> the chunk keys one PinWithTtl pinned.
  std::multimap<std::chrono::steady_clock::time_point, std::vector<ChunkKey>> timed_pins_;  // guarded by pins_mu_
  std::atomic<uint64_t> timed_pin_chunks_{0};  // written under pins_mu_; read by Stats
  std::condition_variable pin_cv_;
  bool pin_stop_ = false;  // guarded by pins_mu_
  std::thread pin_thread_;  // started by the first PinWithTtl

  // Copy tasks submitted and not finished (Flush waits for zero).
  std::mutex copy_mu_;
  std::condition_variable copy_idle_cv_;
  size_t copies_pending_ = 0;

  // Write-behind queue.
  struct WbItem {
    ChunkMeta meta;
    uint32_t attempts = 0;
    int64_t not_before_ms = 0;
    bool settled = false;  // within one batch: its hold released or queued for retry
  };
  mutable std::mutex wb_mu_;
  std::condition_variable wb_cv_;
  std::condition_variable wb_idle_cv_;
  std::deque<WbItem> wb_queue_;
  size_t wb_in_flight_ = 0;
  uint64_t wb_batches_done_ = 0;  // guarded by wb_mu_; back-pressure waits on it
  bool wb_stop_ = false;
  std::thread wb_thread_;

  // Counters (relaxed: statistics only).
  mutable std::atomic<uint64_t> lookups_{0}, lookup_hit_tokens_{0}, lookup_query_tokens_{0};
  std::atomic<uint64_t> store_requests_{0}, chunks_stored_{0}, chunks_skipped_present_{0}, store_errors_{0},
      tokens_stored_{0}, bytes_stored_{0};
  std::atomic<uint64_t> retrieve_requests_{0}, chunks_loaded_{0}, tokens_loaded_{0}, bytes_loaded_{0},
      chunks_loaded_cpu_{0}, chunks_loaded_disk_{0}, retrieve_misses_{0}, load_errors_{0}, layout_mismatches_{0};
  std::atomic<uint64_t> wb_written_{0}, wb_retries_{0}, wb_failed_{0}, wb_dropped_{0};
  std::atomic<uint64_t> store_latency_us_{0}, retrieve_latency_us_{0};
  std::atomic<uint64_t> internal_errors_{0};
  std::atomic<uint64_t> chunks_fetched_remote_{0};
  std::atomic<bool> internal_error_logged_{false};
  std::atomic<int64_t> last_disk_failure_log_ms_{0};  // LogPermanentDiskFailure's rate limit

  // Operations: histograms, evictions by reason, health timestamps (NowNs;
  // 0 = never). All lock-free.
  LatencyHistogram load_cpu_hist_, load_disk_hist_, store_cpu_hist_, store_disk_hist_;
  std::atomic<uint64_t> cpu_evict_clear_{0}, disk_evict_clear_{0}, cpu_evict_layout_{0}, disk_evict_layout_{0};
  std::atomic<uint64_t> pins_expired_{0}, moves_started_{0}, moves_moved_{0}, moves_failed_{0};
  std::atomic<int64_t> last_disk_failure_ns_{0}, last_wb_drop_ns_{0};
  // Health's view of the remote's timeouts: the count it last saw and when
  // it last saw it grow.
  std::mutex health_mu_;
  uint64_t health_remote_timeouts_ = 0;  // guarded by health_mu_
  int64_t health_remote_timeout_ns_ = 0;  // guarded by health_mu_

  // Last member: destroyed first, so its uploader (which reads the CPU tier)
  // stops before the tiers go.
  std::unique_ptr<remote::RemoteTier> remote_;
};

}  // namespace kvtier
