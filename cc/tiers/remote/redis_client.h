// RedisClient: batched GET / SET NX / EXISTS / DEL against one Redis or
// Valkey node or a Redis Cluster, over hiredis (built from source, TLS
// included; see README.md). The remote tier's only way to the network.
//
// Contract
// - Threading: thread-safe. One mutex guards the client, so calls from
//   several threads serialize (a 4 MiB upload delays a lookup made on the
//   same client): give latency-sensitive callers their own client. Clients
//   share nothing; each owns its connections (one per node).
// - Never blocks past a deadline. Every call takes an absolute deadline
//   (Clock::time_point{} = now + options.command_timeout); connecting, the
//   TLS handshake, AUTH, writing and reading all stop at it. A call that runs
//   out of time fails with kUnavailable ("deadline exceeded ..."), and the
//   connection it was using is closed (its replies are now out of step).
// - Never blocks on a dead server. A connection that breaks (reset, EOF,
//   timeout, protocol error) is closed and its node enters exponential
//   backoff with jitter (ReconnectBackoff). Until the next attempt is due, a
//   call that needs that node fails at once with kUnavailable and does not
//   touch the network; the first call after it is due reconnects (lazily:
//   there is no background thread). ReconnectDue() / NextReconnectAttempt()
//   let a caller skip the remote instead of calling.
// - Batches are pipelined: all commands for one node are written, then all
//   replies read; in a cluster the keys are grouped by owning node (CRC16
//   hash slots, {hash tags} honoured), all nodes are written before any is
//   read. Results come back per key, in the order of the input.
// - Cluster: the slot map comes from CLUSTER SLOTS (asked of any reachable
//   known node or seed) at the first call, after a MOVED, and after a
//   connection to a node is lost (at most once per
//   options.topology_refresh_interval). MOVED updates the slot at once and
//   retries the key at its new owner; ASK retries once at the named node
//   preceded by ASKING; TRYAGAIN retries. Each key follows at most
//   options.max_redirects redirects, then fails with kUnavailable.
// - Partial failure: a batch call fills one KeyResult per key and returns
//   the first error met (or OK). Keys whose node answered have kHit/kMiss
//   even when the call returns an error; callers treat kError as a miss.
// - Secrets: passwords appear in no Status message and no log line (this
//   file logs nothing). The server's own AUTH error text is passed through;
//   Redis never echoes the password in it.
//
// Status codes returned by the calls below (never any other):
//   kOk                  every key got an answer (kHit or kMiss)
//   kUnavailable         transient: a node unreachable, in backoff, timed
//                        out (deadline exceeded), closed the connection,
//                        LOADING / BUSY / CLUSTERDOWN / MASTERDOWN / TRYAGAIN,
//                        the slot map is unknown, or too many redirects
//   kFailedPrecondition  the server refused the credentials or a command
//                        (NOAUTH, WRONGPASS, NOPERM), SELECT failed, or the
//                        TLS handshake / certificate check failed
//   kResourceExhausted   the server is out of memory (OOM, maxmemory with
//                        noeviction)
//   kIoError             any other error reply, or a reply of the wrong type
//                        (e.g. WRONGTYPE: the key is not a string)
//   kInvalidArgument     from Create: bad URL or options; GetRangeMany of 0 bytes
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cc/common/status.h"
#include "cc/tiers/remote/redis_url.h"

namespace kvtier::remote {

struct RedisClientOptions {
  std::chrono::milliseconds connect_timeout{1000};
  // Default per-call budget (deadline {} = now + this).
  std::chrono::milliseconds command_timeout{1000};
  // Override the URL's credentials when non-empty (e.g. from an env var or a
  // file, so the password need not be in the URL).
  std::string username;
  std::string password;
  // Reconnect backoff per node (see ReconnectBackoff).
  std::chrono::milliseconds reconnect_backoff_initial{100};
  std::chrono::milliseconds reconnect_backoff_max{10000};
  // Cluster.
  int max_redirects = 5;
  std::chrono::milliseconds topology_refresh_interval{100};
  // TLS (rediss://). The peer is verified against the CA (file or directory;
  // neither: the system's default trust store) and its certificate must name
  // the host we connect to unless tls_verify_name is false.
  std::string tls_ca_file;
  std::string tls_ca_path;
  std::string tls_cert_file;  // client certificate (mutual TLS), optional
  std::string tls_key_file;
  std::string tls_server_name;  // SNI; default: the host
  bool tls_verify_peer = true;
  bool tls_verify_name = true;
  // Pipelined writes are flushed to the socket whenever this many bytes are
  // buffered, so a batch of large values is not first copied whole.
  size_t write_flush_bytes = 1 << 20;
};

// Outcome for one key of a batch.
enum class KeyResult : uint8_t {
  kHit,    // GET: value returned; EXISTS: present; SET NX: stored; DEL: deleted
  kMiss,   // GET/EXISTS/DEL: absent; SET NX: key existed, left unchanged
  kError,  // no answer for this key; the call's Status says why
};

struct KeyValue {
  std::string_view key;
  std::string_view value;  // binary-safe
};

struct RedisClientStats {
  uint64_t connects = 0;          // successful (re)connections
  uint64_t connect_failures = 0;  // failed attempts (refused, timeout, AUTH, TLS)
  uint64_t fast_failures = 0;     // node in backoff: failed without touching the network
  uint64_t disconnects = 0;       // connections closed after an error
  uint64_t timeouts = 0;          // deadline exceeded
  uint64_t moved = 0;             // MOVED redirects followed
  uint64_t ask = 0;               // ASK redirects followed
  uint64_t topology_refreshes = 0;  // successful CLUSTER SLOTS reloads
  uint64_t bytes_out = 0;         // bytes written to sockets (commands and values)
  uint64_t bytes_in = 0;          // value bytes returned by GET hits
};

class RedisClient {
 public:
  using Clock = std::chrono::steady_clock;
  // Called once per hit; `value` is valid only during the call.
  using ValueFn = std::function<void(size_t index, std::string_view value)>;

  // Validates the URL and options and prepares TLS; does not connect (the
  // first call does), so a client can be made while the server is down.
  // Returns kOk or kInvalidArgument.
  static StatusOr<std::unique_ptr<RedisClient>> Create(std::string_view url,
                                                       RedisClientOptions options = {});
  static StatusOr<std::unique_ptr<RedisClient>> Create(RedisUrl url, RedisClientOptions options);
  ~RedisClient();
  RedisClient(const RedisClient&) = delete;
  RedisClient& operator=(const RedisClient&) = delete;

  // PING every known node (connecting where needed); OK if all answered.
  Status Ping(Clock::time_point deadline = {});

  // GET each key; on_value(i, bytes) for each hit. results[i] per key.
  Status GetMany(std::span<const std::string_view> keys, const ValueFn& on_value,
                 std::vector<KeyResult>* results, Clock::time_point deadline = {});
  // GETRANGE key 0 max_bytes-1 for each key: at most max_bytes of each value
  // (a value longer than expected is cut, so a reader that knows its
  // largest value never allocates more than that for a foreign one). Redis
  // answers an empty string for a missing key: an empty value is kMiss.
  Status GetRangeMany(std::span<const std::string_view> keys, size_t max_bytes, const ValueFn& on_value,
                      std::vector<KeyResult>* results, Clock::time_point deadline = {});
  // Convenience: values copied out; missing and failed keys are empty optionals.
  Status GetMany(std::span<const std::string_view> keys,
                 std::vector<std::optional<std::string>>* values,
                 std::vector<KeyResult>* results, Clock::time_point deadline = {});

  // SET key value NX [EX ttl] for each item (ttl 0 = no expiry). kHit: stored;
  // kMiss: the key existed and was not overwritten.
  Status SetNxMany(std::span<const KeyValue> items, std::chrono::seconds ttl,
                   std::vector<KeyResult>* results, Clock::time_point deadline = {});

  // EXISTS for each key, one round trip per node.
  Status ExistsMany(std::span<const std::string_view> keys, std::vector<KeyResult>* results,
                    Clock::time_point deadline = {});

  // DEL each key. kHit: it existed and was deleted.
  Status DelMany(std::span<const std::string_view> keys, std::vector<KeyResult>* results,
                 Clock::time_point deadline = {});

  // False while some disconnected node waits for its reconnect attempt (a
  // call that needs it would fail fast with kUnavailable); true otherwise.
  bool ReconnectDue() const;
  // When the last waiting node becomes due ({} when none waits): after it,
  // ReconnectDue() is true until a new failure.
  Clock::time_point NextReconnectAttempt() const;

  RedisClientStats stats() const;
  const RedisUrl& url() const { return url_; }  // includes the password: do not log; use Redacted()

  struct Node;   // one server: endpoint, connection, backoff (redis_client.cc)
  struct Batch;  // one call's keys, commands and results (redis_client.cc)

 private:
  RedisClient(RedisUrl url, RedisClientOptions options);

  Status RunBatch(Batch& batch, Clock::time_point deadline);
  Status EnsureConnected(Node& node, Clock::time_point deadline);
  Status Connect(Node& node, Clock::time_point deadline);
  void Disconnect(Node& node);
  Status RefreshTopology(Clock::time_point deadline);
  Node& NodeFor(const RedisEndpoint& ep);
  Node* NodeForKey(std::string_view key);
  Clock::time_point Deadline(Clock::time_point d) const;

  const RedisUrl url_;
  const RedisClientOptions options_;

  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Node>> nodes_;  // never shrinks: indices are stable
  std::vector<int16_t> slot_owner_;           // cluster: slot -> nodes_ index, -1 unknown
  bool topology_stale_ = true;
  Clock::time_point last_refresh_attempt_{};
  RedisClientStats stats_;
  uint64_t seed_;
};

}  // namespace kvtier::remote
