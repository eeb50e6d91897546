// PeerTransport: instance-to-instance KV transfer over UCX (ucp). A
// producer (prefill) serves the chunks of its CPU tier; a consumer (decode)
// pulls the chunks of a prompt it lacks straight into its own CPU tier.
// UCX picks the wire (RDMA verbs where the NIC has them, shared memory or
// TCP otherwise; UCX_TLS chooses, this code never does).
//
// Data path: the producer's CPU tier region is registered once
// (ucp_mem_map) and its rkey packed once. The consumer sends a PULL naming
// chunk keys (cc/transport/wire.h); the producer read-leases each chunk it
// holds (CpuTier::AcquireUncounted: not evicted, removed or reused while
// leased) and replies with addresses, sizes, CRC32Cs and the rkey; the
// consumer reserves slab slots (Engine::BeginImport), RMA-gets each chunk
// straight into its slot (no staging copy on either side), checks size,
// key, fingerprint, layout and CRC32C, commits what passed
// (Engine::CommitImport: catalogue, CPU tier, write-behind to disk as for
// any store) and sends RELEASE. Chunks the producer holds on disk only are
// not staged: they are misses (the producer has just computed what a
// consumer asks for, so it is in CPU unless evicted).
//
// Contract
// - Pull never fails and never hands out unchecked bytes: a refused
//   connection, a dead or slow producer, a garbage or truncated reply, a
//   chunk that fails a check all end the prefix there (a miss), counted in
//   Stats. Every wait is bounded by timeout_ms from the start of a window;
//   on a timeout the endpoint is force-closed and reconnected by the next
//   Pull. A get still in flight at that point keeps its slab slot reserved
//   until UCX completes it (so no late write lands in reused memory).
// - A producer's leases end on RELEASE, when the peer's endpoint fails, or
//   2 * timeout_ms after the PULL arrived, whichever is first.
// - Hold pins the CPU-resident prefix of a prompt for a peer: until `seconds`
//   pass, or a PULL with release_hold takes it (one hold per found chunk).
// - Faults: TransportHooks let a test rewrite or drop the PULL a consumer
//   sends and damage what a get delivered; ParseFault builds them from
//   "drop", "delay:MS", "corrupt", "truncate". Empty hooks in production.
//
// Threads: one progress thread per transport polls the worker (no event
// fd: see Init), serves PULLs, expires leases and holds and closes
// endpoints; a pulling thread drives the worker itself while it waits. One mutex serializes every call into the UCX worker (the
// worker is created UCS_THREAD_MODE_SERIALIZED). Every public method is
// thread-safe. The Engine must outlive the transport.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "cc/common/chunk_key.h"
#include "cc/common/status.h"
#include "cc/engine/engine.h"
#include "cc/transport/ucx_api.h"

namespace kvtier::transport {

struct TransportHooks {
  // Consumer, before a PULL is sent (outside every lock): may rewrite the
  // encoded message, sleep, or return false to drop it (never sent: the
  // pull times out).
  std::function<bool(std::vector<std::byte>* pull)> before_send_pull;
  // Consumer: how many of chunk i's `size` bytes to read (truncation).
  std::function<size_t(size_t i, size_t size)> get_bytes;
  // Consumer, after chunk i's get landed and before it is checked.
  std::function<void(size_t i, std::span<std::byte> data)> after_get;
};

// "" or "none": no hooks. "drop": PULLs are never sent. "delay:MS": each
// PULL waits MS ms first. "corrupt": one byte of every chunk flipped after
// its get. "truncate": only the first half of every chunk is read.
// kInvalidArgument otherwise.
StatusOr<TransportHooks> ParseFault(std::string_view spec);

struct TransportOptions {
  // Serve on host:port when listen_host is non-empty (a producer); port 0
  // binds an ephemeral port (see address()). A consumer needs no listener.
  std::string listen_host;
  int listen_port = 0;
  uint32_t timeout_ms = 5000;
  TransportHooks hooks;
};

struct TransportStats {
  uint64_t pulls = 0;          // Pull calls
  uint64_t chunks_pulled = 0;  // chunks checked and filed locally
  uint64_t bytes_pulled = 0;
  uint64_t chunks_served = 0;  // chunks a producer leased to a peer
  uint64_t bytes_served = 0;
  uint64_t misses = 0;    // Pull calls that ended before the end of the prompt
  uint64_t corrupt = 0;   // chunks whose bytes failed the CRC32C
  uint64_t timeouts = 0;  // windows that ran out of time
  uint64_t errors = 0;    // refused / failed endpoints, undecodable or inconsistent messages
  uint64_t connected_peers = 0;  // live endpoints, both directions
  uint64_t holds = 0;            // chunk holds live now
  uint64_t holds_expired = 0;    // holds that ran out of time unclaimed
  // Pulls that ended with gets still in flight: their chunks' slots stay
  // reserved ("being written": a pull of them now is a miss) until UCX
  // completes the gets and the progress thread reaps them.
  uint64_t orphaned_pulls = 0;
};

class PeerTransport {
 public:
  // kFailedPrecondition when UCX cannot be loaded (UcxApi::Load's message);
  // kInvalidArgument for a bad listen address or timeout; kUnavailable when
  // UCX cannot listen there.
  static StatusOr<std::unique_ptr<PeerTransport>> Create(Engine* engine, const TransportOptions& options);
  ~PeerTransport();
  PeerTransport(const PeerTransport&) = delete;
  PeerTransport& operator=(const PeerTransport&) = delete;

  // "host:port" peers can reach this producer at ("" when not serving). A
  // wildcard listen host is reported as this machine's first non-loopback
  // IPv4 address.
  const std::string& address() const { return address_; }

  // Pulls the chunks of tokens past the local cached prefix from the
  // producer at address ("host:port"); returns the tokens cached locally as
  // a prefix afterwards (like Engine::FetchRemote). release_hold: the
  // producer drops one Hold per chunk it found.
  size_t Pull(std::string_view address, std::span<const int32_t> tokens, uint64_t layout_id,
              const KeyExtras* extras = nullptr, bool release_hold = true);

  // Holds the cached prefix of tokens in the CPU tier for a peer for
  // `seconds`, promoting chunks that are on disk only (the caller waits for
  // those reads); returns the chunks held. Any layout.
  size_t Hold(std::span<const int32_t> tokens, const KeyExtras* extras, double seconds);

  TransportStats Stats() const;
  // Tests: replaces the hooks (a pull in flight keeps the ones it started with).
  void SetHooks(TransportHooks hooks);

 private:
  struct Peer;
  struct PullState;
  struct GetOp;
  struct ServedLease {
    ucp_ep_h ep;
    std::vector<CpuTier::ReadLease> leases;
    int64_t expires_ms;
  };
  struct Held {
    CpuTier::ReadLease lease;
    int64_t expires_ms;
  };
  struct Incoming {
    ucp_ep_h ep;
    std::vector<std::byte> msg;
  };

  PeerTransport(const UcxApi* ucx, Engine* engine, const TransportOptions& options);
  Status Init();
  void ProgressLoop();
  // All *Locked run under mu_.
  unsigned ProgressLocked();
  void SweepLocked(int64_t now_ms);
  Status EnsureRegisteredLocked(CpuTier* tier);
  std::shared_ptr<Peer> PeerLocked(const std::string& address, Status* error);
  void DropPeerLocked(std::shared_ptr<Peer> peer);  // by value: it may erase the map entry passed in
  void CloseEpLocked(ucp_ep_h ep);
  // Sends msg as active message id on ep; the buffer lives until UCX is done.
  Status SendLocked(ucp_ep_h ep, unsigned id, std::vector<std::byte> msg, bool want_reply);
  void HandlePull(ucp_ep_h ep, std::span<const std::byte> msg);
  // Pulls chunks[begin, end) in one PULL; returns how many leading ones are
  // now cached locally.
  size_t PullWindow(const std::string& address, const std::vector<ChunkHash>& chunks, size_t begin, size_t end,
                    uint64_t layout_id, bool release_hold, const TransportHooks& hooks);
  // Drives the worker until done() (checked under mu_) or deadline_ms.
  bool WaitLocked(std::unique_lock<std::mutex>& lock, const std::function<bool()>& done, int64_t deadline_ms);
  // The engine's CPU tier once it exists (SetChunkBytes may come late).
  CpuTier* Tier();

  static ucs_status_t OnAmPull(void* arg, const void* header, size_t header_length, void* data, size_t length,
                               const ucp_am_recv_param_t* param);
  static ucs_status_t OnAmReply(void* arg, const void* header, size_t header_length, void* data, size_t length,
                                const ucp_am_recv_param_t* param);
  static ucs_status_t OnAmRelease(void* arg, const void* header, size_t header_length, void* data, size_t length,
                                  const ucp_am_recv_param_t* param);
  static void OnConnRequest(ucp_conn_request_h request, void* arg);
  static void OnServerEpError(void* arg, ucp_ep_h ep, ucs_status_t status);
  static void OnClientEpError(void* arg, ucp_ep_h ep, ucs_status_t status);

  const UcxApi* const ucx_;
  Engine* const engine_;
  const TransportOptions options_;
  std::string address_;
  std::atomic<CpuTier*> tier_{nullptr};

  mutable std::mutex mu_;  // serializes the worker; guards everything below
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_listener_h listener_ = nullptr;
  ucp_mem_h memh_ = nullptr;
  std::vector<std::byte> rkey_;  // packed once with memh_
  uint64_t region_base_ = 0, region_size_ = 0;
  TransportHooks hooks_;
  std::unordered_map<std::string, std::shared_ptr<Peer>> peers_;  // consumer endpoints, by address
  std::vector<std::shared_ptr<Peer>> retired_peers_;              // failed; kept for their callbacks' arg
  std::unordered_set<ucp_ep_h> server_eps_;
  std::vector<ucp_ep_h> to_close_;
  std::vector<void*> closing_;  // ucp_ep_close_nbx requests in flight
  std::unordered_map<uint64_t, PullState*> waiting_;  // request id -> a pull awaiting its REPLY
  std::deque<Incoming> incoming_;                    // PULLs for the progress thread
  std::unordered_map<uint64_t, ServedLease> leases_;  // by lease id
  std::unordered_multimap<ChunkKey, Held, ChunkKeyHash> holds_;
  std::vector<std::shared_ptr<PullState>> orphans_;  // timed out with gets in flight
  uint64_t next_request_id_ = 1, next_lease_id_ = 1;

  std::atomic<bool> stop_{false};
  std::thread progress_;

  // Counters (relaxed: statistics only).
  std::atomic<uint64_t> pulls_{0}, chunks_pulled_{0}, bytes_pulled_{0}, chunks_served_{0}, bytes_served_{0},
      misses_{0}, corrupt_{0}, timeouts_{0}, errors_{0}, holds_expired_{0};
};

}  // namespace kvtier::transport
