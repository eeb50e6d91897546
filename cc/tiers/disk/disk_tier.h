// DiskTier: the local NVMe tier. Chunks live in a few large preallocated
// segment files, appended log-structured through io_uring with O_DIRECT; an
// in-memory map (key -> segment, offset) is rebuilt from the self-describing
// records when the tier is opened again. The record format is documented in
// cc/tiers/disk/disk_format.h.
//
// Layering: Engine -> Tier -> DiskTier -> IoRing pool (io_uring) -> segment
// files. The engine owns write-behind, promotion and prefetch; this class only
// stores, finds and reclaims.
//
// Contract (in addition to cc/tiers/tier.h)
// - Privacy: the KV on disk can be turned back into the prompts it encodes.
//   Directories the tier creates are mode 0700, its files (segments, LOCK)
//   0600, whatever the umask (existing ones of ours are set to 0600 at
//   Open). Open refuses (kFailedPrecondition, naming the path and the
//   reason) a directory that is a symbolic link, is owned by another user
//   (root excepted), or is world-writable without the sticky bit. The
//   directory is opened once; every file in it is opened, listed and removed
//   relative to that descriptor with O_NOFOLLOW, so a symbolic link or a
//   file of another user planted under one of the tier's names is refused
//   (Open fails, or the Put that would create that segment does), never
//   read or written through.
// - Open() takes an exclusive flock on <path>/LOCK. A second DiskTier on the
//   same directory, in this or another process, gets kFailedPrecondition
//   naming the holder's pid. The lock dies with the process (kill -9 too).
// - Durability (DiskTierOptions::sync): in every mode a Put that returned kOk
//   has its bytes in the device (O_DIRECT write completed) and survives a
//   process crash (kill -9 included). What survives a power cut depends on
//   the mode:
//   kNone (the default, and the only behaviour before the option existed):
//     no fsync/fdatasync is ever issued. Recent chunks may be lost (the
//     device's volatile cache, and extents of preallocated segments not yet
//     marked written in the file system's journal); a removed chunk may
//     come back.
//   kBatch: every PutBatch (a single Put is a batch of one) issues one
//     fdatasync per segment file its records went to, after all its writes
//     completed and before any of its chunks is published (visible to Get)
//     or acknowledged (kOk). Remove and Clear sync each file they wrote
//     once before returning. An acknowledged chunk survives a power cut
//     where the device honours cache flushes.
//   kAlways: an fdatasync after every write the tier makes: each record of
//     a batch is written and synced before the next one is written (no
//     overlap inside a batch), and so is every header the tier rewrites
//     (segment header, sealing filler, Remove's and Clear's dead headers).
//   A failed fdatasync fails the records it covered (kIoError, not
//   published; their space is a hole). In every mode a chunk lost or torn
//   by a power cut is a miss (checksums), never bad data.
// - Atomic publish: a chunk is visible (Get, SizeOf, Pin, ForEachChunk,
//   rebuild) only after its whole record was written. While it is written,
//   Get returns kFailedPrecondition and a second Put of the key
//   kAlreadyExists.
// - Every Get verifies the record (header checksum, generation, key,
//   fingerprint, payload CRC32C). A record that fails is reported kDataLoss
//   and dropped from the map; its space returns when its segment is
//   reclaimed. Rebuild skips and counts records whose header fails.
// - Space is reclaimed a segment at a time, oldest generation first (FIFO).
//   A segment holding a pinned chunk or an unfinished write is skipped. Each
//   chunk dropped this way is reported through NotifyEvicted. Remove and
//   Clear persist (a removed chunk does not come back after a restart).
// - Disk full (the file system holds fewer segments than the capacity, or
//   others fill it): when a new segment file cannot be preallocated (ENOSPC)
//   the tier recycles its oldest reclaimable segment instead, so it keeps
//   working at the size the disk allows. When nothing is reclaimable (or a
//   write itself hits ENOSPC on a file system without fallocate), that Put
//   fails with kResourceExhausted naming ENOSPC and is counted as an error.
//   Every roll tries to create the missing files again, so the full capacity
//   (and, when nothing was reclaimable, writing) comes back once space does.
// - Threads: every method is thread-safe. One mutex guards the map and the
//   segment table; it is never held across I/O. Callers block for their own
//   I/O only (each call takes a private ring from a pool). Progress is
//   blocking, not lock-free. Rebuild runs rebuild_threads workers inside
//   Open(), each with a 1 MiB buffer.
// - Start-up reads record headers only (one 4 KiB read per record, plus the
//   segment that was open and any holes, read through); its time scales with
//   the number of records, not bytes. A record whose payload is damaged is
//   therefore found by its first Get (kDataLoss, then dropped), not at Open,
//   and RebuildStats::corrupt_records counts damaged headers only.
// - Buffers: a payload/destination span that is 4096-aligned in address is
//   transferred directly (its aligned part; the sub-block tail goes through a
//   bounce block); otherwise the whole record goes through an aligned bounce
//   buffer. Inside a region given to RegisterBuffers the direct part uses
//   io_uring fixed buffers.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "cc/common/chunk_key.h"
#include "cc/common/status.h"
#include "cc/tiers/tier.h"

namespace kvtier {

namespace disk {
class IoFaults;
class IoRing;
}

// When the disk tier calls fdatasync (see Durability in DiskTier's contract).
enum class DiskSync : uint8_t { kNone, kBatch, kAlways };

// "none", "batch" or "always" (the config key disk_sync); kInvalidArgument
// naming the allowed values otherwise.
StatusOr<DiskSync> ParseDiskSync(std::string_view name);
const char* DiskSyncName(DiskSync sync);

struct DiskTierOptions {
  std::string path;             // directory; created if missing
  uint64_t capacity_bytes = 0;  // total bytes of segment files
  // 0 -> auto:
  //  - the size of the segment files already in `path`, when they all agree,
  //    hold max_chunk_bytes and capacity holds 2 of them (a restart keeps its
  //    data whatever the chunk size it learns later);
  //  - else 64 MiB, or capacity/8 rounded down to 4096 when that is smaller
  //    (at least 64 KiB; more, up to 1 GiB, where the capacity would need
  //    more than 100000 segments), when one max_chunk_bytes chunk fits that;
  //  - else room for 8 records of max_chunk_bytes (fewer where capacity or
  //    the 1 GiB limit allows fewer, at least 1).
  // Otherwise a multiple of 4096, at most 1 GiB, that holds one
  // max_chunk_bytes chunk (segment_bytes - 8 KiB), and capacity must hold at
  // least 2 segments.
  uint64_t segment_bytes = 0;
  // The largest chunk the caller will Put (0: not known yet). Sizes auto
  // segments; Open fails (kInvalidArgument) when an explicit segment_bytes
  // cannot hold it or it exceeds 1 GiB - 8 KiB. See also EnsureChunkFits.
  size_t max_chunk_bytes = 0;
  uint32_t queue_depth = 64;    // io_uring SQ entries per ring
  uint32_t rebuild_threads = 2;
  bool use_gds = false;         // try cuFile; falls back to io_uring (logged once)
  DiskSync sync = DiskSync::kNone;  // fdatasync policy (config key disk_sync)
  // Tests only: asked before every I/O (disk/io_faults.h). Null in production.
  std::shared_ptr<disk::IoFaults> io_faults;
  // The clock of LastUsed; empty: std::chrono::steady_clock::now. Called
  // under the tier's lock: cheap, and never calling back into the tier.
  std::function<std::chrono::steady_clock::time_point()> now;
};

struct RebuildStats {
  uint64_t chunks = 0;           // records recovered into the map
  uint64_t bytes = 0;            // their payload bytes
  uint64_t corrupt_records = 0;  // record headers of a live segment that failed a check
  uint64_t segments = 0;         // segments with a live generation
  double seconds = 0;            // wall time of the rebuild
};

// Where a chunk's record sits (diagnostics, fault tests).
struct DiskLocation {
  std::string file;
  uint32_t segment = 0;
  uint64_t offset = 0;        // of the record header
  uint64_t record_bytes = 0;  // header block + padded payload
  uint64_t payload_bytes = 0;
};

class DiskTier final : public Tier {
 public:
  // kInvalidArgument (bad options), kFailedPrecondition (directory locked by
  // another DiskTier, or refused as not private: see Privacy above), kIoError (the file system, or no io_uring for this
  // process: the message says which).
  static StatusOr<std::unique_ptr<DiskTier>> Open(const DiskTierOptions& options);
  ~DiskTier() override;

  const RebuildStats& rebuild_stats() const { return rebuild_stats_; }
  uint64_t segment_bytes() const { return segment_bytes_; }
  // The largest chunk a Put accepts: segment_bytes() - 8 KiB of headers.
  uint64_t max_payload_bytes() const;

  // Whether chunks of up to max_chunk_bytes fit this tier's segments (for a
  // caller that learns its chunk size after Open). kOk if they do;
  // kInvalidArgument otherwise: max_chunk_bytes is 0, no segment could hold
  // it (> 1 GiB - 8 KiB), or this tier's segments, fixed at Open, are too
  // small; the message then names both sizes, the config key
  // (disk_segment_size) and the remedy. Never changes the tier.
  Status EnsureChunkFits(size_t max_chunk_bytes) const;
  uint32_t num_segments() const { return static_cast<uint32_t>(segs_.size()); }
  // True when use_gds was asked for and cuFile opened a driver.
  bool gds_available() const { return gds_available_; }

  // Calls fn for every committed chunk (under the tier's lock: fn must not
  // call back into this tier).
  void ForEachChunk(const std::function<void(const ChunkMeta&, size_t bytes)>& fn) const;

  // Batched I/O: one io_uring submission (queue depth permitting) for all
  // chunks. Element i of the result is what Put/Get would have returned for
  // element i. Mismatched span lengths -> every element kInvalidArgument.
  // These are not counted in Tier::Stats()'s puts/gets (Tier keeps those
  // private); errors are. See batch_counters().
  std::vector<Status> PutBatch(std::span<const ChunkMeta> metas,
                               std::span<const std::span<const std::byte>> datas);
  std::vector<Status> GetBatch(std::span<const ChunkKey> keys, std::span<const uint64_t> fingerprints,
                               std::span<const std::span<std::byte>> dsts);

  // Registers `region` (e.g. the CPU tier's slab region) as io_uring fixed
  // buffers on every ring; direct transfers inside it then skip per-I/O page
  // pinning. kInvalidArgument if empty or not 4096-aligned, kIoError if the
  // kernel refuses (RLIMIT_MEMLOCK). Replaces an earlier registration; the
  // region must outlive the tier or the next RegisterBuffers call.
  Status RegisterBuffers(std::span<std::byte> region);

  StatusOr<DiskLocation> LocationOf(const ChunkKey& key) const;

  // The metadata a committed chunk was stored with (layout id, tokens), so a
  // promotion to an upper tier files it unchanged. kNotFound if absent.
  StatusOr<ChunkMeta> GetMeta(const ChunkKey& key) const;

  // When the chunk was written or last read (Get/GetBatch); a chunk found
  // by the rebuild counts as written when the tier was opened. nullopt if
  // absent. Counts nothing.
  std::optional<std::chrono::steady_clock::time_point> LastUsed(const ChunkKey& key) const;

  // Reads the chunk's record and checks it like a Get (header, generation,
  // key, fingerprint, payload CRC32C), but changes nothing: not counted as
  // a get, and a record that fails (kDataLoss) stays in the map. kNotFound
  // if absent or still being written. For the engine's verify(deep).
  Status VerifyRecord(const ChunkKey& key);

  // Whether the tier can still create files in its directory: the path
  // must still name the directory opened at Open (a directory removed or
  // replaced, e.g. by a file, leaves the tier writing into an unlinked
  // directory where no new segment can be created), and a probe file must
  // be creatable and removable through it (EACCES for a non-root user on a
  // 0500 directory, EROFS, ENOSPC for a probe block, ...). kOk or
  // kIoError naming the path and the reason. Does file system I/O.
  Status CheckWritable() const;

  // What PutBatch/GetBatch did (Tier::Stats cannot count them, see above),
  // plus fault counters over all calls.
  struct BatchCounters {
    uint64_t batch_calls = 0, puts = 0, put_bytes = 0, gets = 0, get_hits = 0, get_bytes = 0;
    uint64_t enospc = 0;             // Puts that failed for lack of disk space (all calls)
    uint64_t checksum_failures = 0;  // Gets answered kDataLoss (all calls)
  };
  BatchCounters batch_counters() const;

 private:
  struct Entry {
    uint32_t seg = 0;
    uint64_t offset = 0;  // of the record header within the segment
    uint64_t gen = 0;     // segment generation the record was written in
    uint64_t payload_bytes = 0;
    uint64_t fingerprint = 0;
    uint64_t layout_id = 0;
    uint32_t num_tokens = 0;
    uint32_t payload_crc = 0;
    uint32_t pins = 0;
    bool writing = false;  // reserved, I/O not finished: invisible
    std::chrono::steady_clock::time_point last_used{};  // written or last read; {} = at Open
  };
  struct Segment {
    // kUncreated: no file. kFree: file, no live generation. kOpen: the one
    // being appended to. kSealed: full, reclaimable. kReclaiming: being
    // turned into kOpen or kFree by one thread.
    enum class State : uint8_t { kUncreated, kFree, kOpen, kSealed, kReclaiming };
    State state = State::kUncreated;
    int fd = -1;
    uint64_t gen = 0;
    uint64_t write_ptr = 0;
    std::vector<ChunkKey> keys;  // committed in this gen (stale ones skipped)
    uint32_t pins = 0;           // sum of pins of its live chunks
    uint32_t writers = 0;        // reserved slots whose write has not finished
    uint32_t readers = 0;        // Gets / header rewrites in flight
  };
  struct RingCtx;
  struct Slot {
    uint32_t seg;
    uint64_t offset;
    uint64_t gen;
  };

  // Takes ownership of dir_fd (the open directory).
  DiskTier(DiskTierOptions options, int dir_fd, uint64_t segment_bytes, uint32_t num_segments);

  Status PutImpl(const ChunkMeta& meta, std::span<const std::byte> data) override;
  Status GetImpl(const ChunkKey& key, uint64_t fingerprint, std::span<std::byte> dst) override;
  StatusOr<size_t> SizeOfImpl(const ChunkKey& key) const override;
  Status RemoveImpl(const ChunkKey& key) override;
  Status PinImpl(const ChunkKey& key) override;
  Status UnpinImpl(const ChunkKey& key) override;
  void ClearImpl() override;
  void FillStatsImpl(TierStats* s) const override;

  std::vector<Status> PutBatchImpl(std::span<const ChunkMeta> metas,
                                   std::span<const std::span<const std::byte>> datas);
  // verify_only: a failed record is reported but neither dropped nor
  // counted, and no last-use time moves (VerifyRecord).
  std::vector<Status> GetBatchImpl(std::span<const ChunkKey> keys, std::span<const uint64_t> fingerprints,
                                   std::span<const std::span<std::byte>> dsts, bool verify_only = false);
  std::chrono::steady_clock::time_point Now() const {
    return options_.now ? options_.now() : std::chrono::steady_clock::now();
  }
  Status LockDirectory();
  Status Rebuild();
  static std::string SegmentName(uint32_t idx);  // inside the directory
  std::string SegmentPath(uint32_t idx) const;   // for messages and LocationOf

  // Space management; all called with mu_ held through `l`.
  StatusOr<Slot> ReserveLocked(std::unique_lock<std::mutex>& l, uint64_t record_bytes);
  Status RollLocked(std::unique_lock<std::mutex>& l);
  // Drops every committed chunk of segment `idx` from the map; returns them.
  // `bytes` (if not null) grows by their payload bytes.
  std::vector<ChunkKey> DropSegmentLocked(uint32_t idx, uint64_t* bytes);
  void EraseEntryLocked(std::unordered_map<ChunkKey, Entry, ChunkKeyHash>::iterator it);

  Status CreateSegmentFile(uint32_t idx, int* fd);
  // retired_gen: for an empty header (gen 0), the generation the segment's
  // records carry (disk_format.h, "Generations").
  Status WriteSegmentHeader(int fd, uint32_t idx, uint64_t gen, uint64_t retired_gen = 0);

  StatusOr<std::unique_ptr<RingCtx>> AcquireRing();
  void ReleaseRing(std::unique_ptr<RingCtx> ctx);

  const DiskTierOptions options_;
  const uint64_t segment_bytes_;
  const int dir_fd_;  // the directory, O_DIRECTORY|O_NOFOLLOW; every file is opened through it
  int lock_fd_ = -1;
  bool gds_available_ = false;
  RebuildStats rebuild_stats_;
  std::chrono::steady_clock::time_point opened_at_;  // LastUsed of chunks the rebuild found

  mutable std::mutex mu_;
  std::condition_variable cv_;  // segment readers/writers drained, roll finished
  std::unordered_map<ChunkKey, Entry, ChunkKeyHash> map_;
  std::vector<Segment> segs_;
  int open_seg_ = -1;
  bool rolling_ = false;
  bool disk_full_logged_ = false;
  uint64_t next_gen_ = 1;
  uint64_t used_bytes_ = 0;
  uint64_t evictions_ = 0, evicted_bytes_ = 0, errors_ = 0, batch_errors_ = 0;
  BatchCounters counters_;

  std::mutex ring_mu_;
  std::vector<std::unique_ptr<RingCtx>> free_rings_;
  std::span<std::byte> registered_;
  uint64_t registered_version_ = 0;
};

}  // namespace kvtier
