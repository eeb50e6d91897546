// Redis endpoint URLs, cluster hash slots and reconnect backoff: the pure
// (network-free) pieces of the Redis client (redis_client.h).
//
// URL grammar (the redis-cli / redis-py forms, plus cluster seeds):
//   redis://[userinfo@]host[:port][/db]          one node, plain TCP
//   rediss://[userinfo@]host[:port][/db]         one node, TLS
//   redis+cluster://[userinfo@]h:p[,h:p...][/0]  Redis Cluster seed nodes
//   rediss+cluster://...                         Redis Cluster over TLS
//   userinfo = ":password" | "user:password"     (percent-encoded)
//   host     = name | IPv4 | "[" IPv6 "]";  port 1..65535, default 6379
//   db       = 0..(2^31-1), default 0; a cluster has only db 0.
// Anything else (a query string, a fragment, an empty host, a user without a
// password, a bad port or db, an unknown scheme) is kInvalidArgument, with a
// message that quotes the URL with its password replaced by "***". No
// function here ever puts a password into a message or a log line.
#pragma once

#include <chrono>
#include <cstdint>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "cc/common/status.h"

namespace kvtier::remote {

struct RedisEndpoint {
  std::string host;  // without IPv6 brackets
  int port = 6379;
  // "host:port", or "[v6]:port"; the node's identity in the client.
  std::string ToString() const;
  friend bool operator==(const RedisEndpoint&, const RedisEndpoint&) = default;
};

struct RedisUrl {
  bool cluster = false;
  bool tls = false;
  std::vector<RedisEndpoint> nodes;  // one unless cluster; never empty
  std::string username;              // empty: the "default" user
  std::string password;              // empty: no AUTH
  int db = 0;
  // The URL with the password replaced by "***" (safe to log).
  std::string Redacted() const;
};

// Parses `url` per the grammar above. Returns only kOk or kInvalidArgument.
StatusOr<RedisUrl> ParseRedisUrl(std::string_view url);

// Redis Cluster key -> hash slot (0..16383): CRC16-XMODEM of the key, or of
// the part between the first "{" and the next "}" when that is non-empty
// (a hash tag: keys sharing a tag share a slot).
inline constexpr int kClusterSlots = 16384;
uint16_t Crc16(std::string_view data);
int HashSlot(std::string_view key);

// Exponential backoff with jitter for reconnect attempts. After the n-th
// consecutive failure the next attempt is due after a delay drawn uniformly
// from [d/2, d], d = min(max, initial * 2^(n-1)); a success resets it. The
// caller asks Due(now) and never waits: a call that finds the attempt not yet
// due fails fast. Not thread-safe (the client guards it).
class ReconnectBackoff {
 public:
  using Clock = std::chrono::steady_clock;
  ReconnectBackoff(Clock::duration initial, Clock::duration max, uint64_t seed);

  bool Due(Clock::time_point now) const { return now >= next_attempt_; }
  Clock::time_point next_attempt() const { return next_attempt_; }
  int failures() const { return failures_; }
  void RecordFailure(Clock::time_point now);
  void RecordSuccess();

 private:
  Clock::duration initial_;
  Clock::duration max_;
  std::minstd_rand rng_;
  int failures_ = 0;
  Clock::time_point next_attempt_{};  // epoch: due now
};

}  // namespace kvtier::remote
