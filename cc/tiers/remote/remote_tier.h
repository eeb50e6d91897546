// RemoteTier: chunks shared by every instance through Redis / Valkey (one
// node or a Redis Cluster), the fourth tier after GPU, CPU and disk.
//
// What it does
//   Upload: Enqueue(meta) queues a chunk the CPU tier has just committed;
//   a thread of the tier's own takes batches off the queue, reads each
//   chunk's bytes through the ReadFn (a CPU-tier lease, taken only now, so
//   the queue holds no memory), encodes the record (remote_record.h) and
//   sends the batch pipelined as SET NX [EX ttl]: the first instance to
//   upload a chunk wins and nobody overwrites it. A full queue drops the
//   chunk (counted, never waits); a chunk gone from the CPU tier by the time
//   its turn comes is skipped (counted).
//   Lookup: ContainsPrefix asks EXISTS for a run of chunks in one pipelined
//   round trip (per node in a cluster) and answers how many leading chunks
//   the remote holds.
//   Fetch: GETRANGE of each chunk (bounded: header + the largest chunk + 1
//   byte, so a huge foreign value is never read whole, and a value longer
//   than any valid one fails its length check), in one pipelined round trip,
//   then CheckRemoteRecord; each valid chunk goes to the sink as its reply
//   arrives (node by node in a cluster, so not in prefix order), and the
//   first missing, corrupt or other-layout chunk ends the prefix that Fetch
//   returns. Wrong KV is never handed out: corrupt values are counted and
//   are misses.
//
// Failure model
//   Every foreground round trip has a deadline of options.timeout from its
//   start: past it, it is a miss (kUnavailable inside, counted as a
//   timeout), never a wait. ContainsPrefix is one round trip; Fetch takes
//   one per ~16 MiB of values, so a slow but working remote still delivers
//   a long prefix while a stalled one costs one timeout. The client fails fast while
//   a dead node waits for its reconnect attempt (exponential backoff with
//   jitter, see RedisClient), so a dead remote costs a branch, not a round
//   trip; once it is back, the next call reconnects and uploads resume. The
//   remote being down at start is not an error: Create never connects.
//   Foreground calls and uploads use separate connections, so a 4 MiB
//   upload never delays a lookup.
//
// Thread safety: every public method may be called from any thread. The
// destructor stops the upload thread after the batch in flight (queued
// uploads are dropped: a cache, not a journal).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>

#include "cc/common/status.h"
#include "cc/tiers/latency_histogram.h"
#include "cc/tiers/remote/redis_client.h"
#include "cc/tiers/tier.h"

namespace kvtier::remote {

struct RemoteTierOptions {
  // redis://[user:pass@]host:port[/db], rediss://..., redis+cluster://h:p[,h:p]
  std::string url;
  std::chrono::seconds ttl{0};  // 0: no expiry
  std::chrono::milliseconds timeout{200};
  bool write = true;        // false: read-only (never uploads)
  size_t queue = 256;       // uploads waiting, at most
  size_t upload_batch = 8;  // chunks per pipelined SET NX batch
  std::string username;     // override the URL's (never logged)
  std::string password;
  // Keys: RemoteKey(namespace_digest, chunk key) (remote_record.h).
  uint64_t namespace_digest = 0;
  // The largest chunk: what Fetch reads at most per chunk.
  size_t max_payload_bytes = 0;
  // TLS (rediss://): see RedisClientOptions.
  std::string tls_ca_file;
  bool tls_verify_peer = true;
};

// The client options a remote tier (or another reader of it, such as the
// vLLM scheduler's CatalogueView) uses for its lookups and fetches: the
// timeout as connect and command budget, credentials, TLS.
RedisClientOptions ForegroundClientOptions(const RemoteTierOptions& options);

struct RemoteTierStats {
  uint64_t lookups = 0, lookup_chunks = 0, lookup_hit_chunks = 0;
  uint64_t fetches = 0, fetch_hits = 0, fetch_misses = 0, bytes_in = 0;
  uint64_t corrupt = 0;            // values that failed a check (never served)
  uint64_t layout_mismatches = 0;  // valid values from another KV layout (misses)
  uint64_t uploads = 0, upload_present = 0, bytes_out = 0;
  uint64_t upload_dropped = 0;   // queue full
  uint64_t upload_skipped = 0;   // gone from the CPU tier before its turn
  uint64_t upload_failed = 0;    // the remote refused or was unreachable
  uint64_t upload_queue_depth = 0;
  uint64_t errors = 0;     // foreground calls that failed (down, refused, ...)
  uint64_t timeouts = 0;   // of which: deadline exceeded
  uint64_t lookup_latency_us_total = 0, fetch_latency_us_total = 0, upload_latency_us_total = 0;
  bool connected = false;  // the last call reached the remote
};

class RemoteTier {
 public:
  // Hands the bytes of a committed chunk to `use` while they are pinned;
  // false when the chunk is no longer held.
  using ReadFn = std::function<bool(const ChunkMeta& meta, const std::function<void(std::span<const std::byte>)>& use)>;
  // Receives each valid fetched chunk (index into the chunks asked for; in
  // reply order, not prefix order); an error makes that chunk a miss (e.g.
  // no room in the CPU tier).
  using SinkFn = std::function<Status(size_t index, std::span<const std::byte> payload)>;

  // kInvalidArgument for a bad URL or options. Never connects.
  static StatusOr<std::unique_ptr<RemoteTier>> Create(const RemoteTierOptions& options, ReadFn read);
  ~RemoteTier();
  RemoteTier(const RemoteTier&) = delete;
  RemoteTier& operator=(const RemoteTier&) = delete;

  // Sets the largest chunk once the layout is known (before any Fetch).
  void SetMaxPayloadBytes(size_t bytes) { max_payload_.store(bytes, std::memory_order_release); }

  // Queues an upload; false (counted) when the queue is full or the tier is
  // read-only.
  bool Enqueue(const ChunkMeta& meta);
  // Waits until every queued upload has been attempted (tests, shutdown).
  void Flush();

  // Leading chunks of `chunks` the remote holds (0 on any error).
  size_t ContainsPrefix(std::span<const ChunkMeta> chunks);
  // Fetches leading chunks (see the file comment); returns how many went
  // to the sink. layout_id: the caller's layout.
  size_t Fetch(std::span<const ChunkMeta> chunks, uint64_t layout_id, const SinkFn& sink);

  RemoteTierStats Stats() const;
  // Latency of each Fetch call (all its round trips), in microseconds.
  LatencyHistogram::Snapshot FetchLatency() const { return fetch_hist_.Get(); }
  const std::string& redacted_url() const { return redacted_url_; }

 private:
  RemoteTier(const RemoteTierOptions& options, ReadFn read);
  void UploadLoop();
  void CountError(const Status& s);

  const RemoteTierOptions options_;
  const ReadFn read_;
  std::string redacted_url_;
  std::atomic<size_t> max_payload_{0};
  std::unique_ptr<RedisClient> fg_;  // lookups and fetches
  std::unique_ptr<RedisClient> bg_;  // uploads

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable idle_cv_;
  std::deque<ChunkMeta> queue_;  // guarded by mu_
  size_t in_flight_ = 0;         // guarded by mu_
  bool stop_ = false;            // guarded by mu_
  std::thread uploader_;

  mutable std::atomic<uint64_t> lookups_{0}, lookup_chunks_{0}, lookup_hit_chunks_{0}, fetches_{0}, fetch_hits_{0},
      fetch_misses_{0}, bytes_in_{0}, corrupt_{0}, layout_mismatches_{0}, uploads_{0}, upload_present_{0},
      bytes_out_{0}, upload_dropped_{0}, upload_skipped_{0}, upload_failed_{0}, errors_{0}, timeouts_{0},
      lookup_us_{0}, fetch_us_{0}, upload_us_{0};
  std::atomic<bool> connected_{false};
  LatencyHistogram fetch_hist_;
};

}  // namespace kvtier::remote
