#include "cc/tiers/remote/redis_client.h"

#include <hiredis/hiredis.h>
#include <hiredis/hiredis_ssl.h>
#include <signal.h>
#include <sys/time.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <optional>
#include <utility>

// Debian's libhiredis-dev 0.14 headers live in /usr/include/hiredis too; the
// build must pick the 1.x sources from @hiredis (TLS, redisOptions).
static_assert(HIREDIS_MAJOR >= 1, "built against hiredis 0.x headers; want @hiredis (1.x)");

namespace kvtier::remote {
namespace {

using Clock = RedisClient::Clock;

timeval ToTimeval(Clock::duration d) {
  const auto us = std::max<int64_t>(
      1, std::chrono::duration_cast<std::chrono::microseconds>(d).count());  // 0 = no timeout
  return timeval{static_cast<time_t>(us / 1000000), static_cast<suseconds_t>(us % 1000000)};
}

int64_t Millis(Clock::duration d) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
}

// hiredis writes with send(fd, ..., 0): a peer that closed the socket raises
// SIGPIPE, which kills a process that did not ignore it (Python does; C++
// tests and other embedders may not). Block it in this thread around writes
// and swallow one that the writes raised, without touching the process-wide
// disposition.
class ScopedSigpipeBlock {
 public:
  ScopedSigpipeBlock() {
    sigset_t pending;
    sigemptyset(&pending);
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGPIPE);
    blocked_ = pthread_sigmask(SIG_BLOCK, &block, &old_) == 0;
  }
  ~ScopedSigpipeBlock() {
    if (!blocked_) return;
    if (!was_pending_) {
      sigset_t pending;
      sigemptyset(&pending);
      sigpending(&pending);
      if (sigismember(&pending, SIGPIPE) == 1) {
        sigset_t pipe_only;
        sigemptyset(&pipe_only);
        sigaddset(&pipe_only, SIGPIPE);
        const timespec zero{0, 0};
        while (sigtimedwait(&pipe_only, nullptr, &zero) == -1 && errno == EINTR) {
        }
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  ScopedSigpipeBlock(const ScopedSigpipeBlock&) = delete;
  ScopedSigpipeBlock& operator=(const ScopedSigpipeBlock&) = delete;

 private:
  sigset_t old_;
  bool blocked_ = false;
  bool was_pending_ = false;
};

void InitOpenSslOnce() {
  static std::once_flag once;
  std::call_once(once, [] { redisInitOpenSSL(); });
}

// Maps an error reply to a Status (see the table in the header).
Status ServerError(std::string_view node, std::string_view msg) {
  const std::string_view word = msg.substr(0, msg.find(' '));
  std::string text = "Redis " + std::string(node) + " replied: " + std::string(msg);
  if (word == "LOADING" || word == "BUSY" || word == "CLUSTERDOWN" || word == "MASTERDOWN" ||
      word == "TRYAGAIN" || word == "READONLY") {
    return Unavailable(std::move(text));
  }
  if (word == "NOAUTH" || word == "WRONGPASS" || word == "NOPERM") {
    return FailedPrecondition(std::move(text));
  }
  if (word == "OOM") return ResourceExhausted(std::move(text));
  return IoError(std::move(text));
}

// "MOVED 3999 127.0.0.1:6381" / "ASK 3999 127.0.0.1:6381" -> endpoint. An
// empty host (cluster-preferred-endpoint-type unknown-endpoint) means the
// host of the node that replied.
bool ParseRedirect(std::string_view msg, std::string_view reply_host, int* slot, RedisEndpoint* ep) {
  const size_t sp1 = msg.find(' ');
  const size_t sp2 = sp1 == std::string_view::npos ? sp1 : msg.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos) return false;
  const std::string slot_text(msg.substr(sp1 + 1, sp2 - sp1 - 1));
  const std::string_view addr = msg.substr(sp2 + 1);
  const size_t colon = addr.rfind(':');
  if (colon == std::string_view::npos) return false;
  std::string_view host = addr.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  char* end = nullptr;
  const long s = std::strtol(slot_text.c_str(), &end, 10);
  const std::string port_text(addr.substr(colon + 1));
  char* pend = nullptr;
  const long port = std::strtol(port_text.c_str(), &pend, 10);
  if (*end != '\0' || s < 0 || s >= kClusterSlots || *pend != '\0' || port <= 0 || port > 65535) {
    return false;
  }
  *slot = static_cast<int>(s);
  ep->host = host.empty() ? std::string(reply_host) : std::string(host);
  ep->port = static_cast<int>(port);
  return true;
}

bool StartsWith(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

}  // namespace

// ---- Node and Batch -----------------------------------------------------------

struct RedisClient::Node {
  Node(RedisEndpoint e, const RedisClientOptions& o, uint64_t seed)
      : ep(std::move(e)), name(ep.ToString()),
        backoff(o.reconnect_backoff_initial, o.reconnect_backoff_max, seed) {}
  ~Node() {
    if (ctx != nullptr) redisFree(ctx);
    if (ssl != nullptr) redisFreeSSLContext(ssl);
  }

  const RedisEndpoint ep;
  const std::string name;
  redisContext* ctx = nullptr;  // null: disconnected
  redisSSLContext* ssl = nullptr;
  ReconnectBackoff backoff;
  Status last_error;
  // The socket timeout last set, to skip a setsockopt per 16 KiB read.
  Clock::time_point timeout_set_at{};
  Clock::time_point timeout_for_deadline{};
  // One batch round: (item, preceded by ASKING) sent to this node.
  std::vector<std::pair<size_t, bool>> round;
  bool round_failed = false;
};

struct RedisClient::Batch {
  enum class Op { kGet, kGetRange, kSetNx, kExists, kDel };
  Op op = Op::kGet;
  size_t size = 0;
  std::span<const std::string_view> keys;
  std::span<const KeyValue> items;
  std::string ttl;  // SET NX: seconds as text, empty = no EX
  std::string range_end;  // GETRANGE: last byte offset as text
  const ValueFn* on_value = nullptr;
  std::vector<KeyResult>* results = nullptr;
  uint64_t value_bytes = 0;

  static Batch Keys(Op op, std::span<const std::string_view> keys, std::vector<KeyResult>* results) {
    Batch b;
    b.op = op;
    b.size = keys.size();
    b.keys = keys;
    b.results = results;
    return b;
  }

  std::string_view Key(size_t i) const { return op == Op::kSetNx ? items[i].key : keys[i]; }

  bool Append(redisContext* c, size_t i) const {
    const char* argv[6];
    size_t len[6];
    int argc = 0;
    auto add = [&](std::string_view s) {
      argv[argc] = s.data();
      len[argc] = s.size();
      ++argc;
    };
    switch (op) {
      case Op::kGet: add("GET"); add(keys[i]); break;
      case Op::kGetRange:
        add("GETRANGE");
        add(keys[i]);
        add("0");
        add(range_end);
        break;
      case Op::kExists: add("EXISTS"); add(keys[i]); break;
      case Op::kDel: add("DEL"); add(keys[i]); break;
      case Op::kSetNx:
        add("SET");
        add(items[i].key);
        add(items[i].value);
        add("NX");
        if (!ttl.empty()) {
          add("EX");
          add(ttl);
        }
        break;
    }
    return redisAppendCommandArgv(c, argc, argv, len) == REDIS_OK;
  }

  // A non-error reply for item i.
  Status OnReply(size_t i, const redisReply* r, std::string_view node) {
    KeyResult& out = (*results)[i];
    switch (op) {
      case Op::kGet:
        if (r->type == REDIS_REPLY_STRING) {
          value_bytes += r->len;
          if (on_value != nullptr && *on_value) (*on_value)(i, std::string_view(r->str, r->len));
          out = KeyResult::kHit;
          return Status::Ok();
        }
        if (r->type == REDIS_REPLY_NIL) {
          out = KeyResult::kMiss;
          return Status::Ok();
        }
        break;
      case Op::kGetRange:
        if (r->type == REDIS_REPLY_STRING) {
          if (r->len == 0) {  // GETRANGE of a missing key (or of an empty value)
            out = KeyResult::kMiss;
            return Status::Ok();
          }
          value_bytes += r->len;
          if (on_value != nullptr && *on_value) (*on_value)(i, std::string_view(r->str, r->len));
          out = KeyResult::kHit;
          return Status::Ok();
        }
        break;
      case Op::kSetNx:
        if (r->type == REDIS_REPLY_STATUS) {
          value_bytes += items[i].value.size();
          out = KeyResult::kHit;
          return Status::Ok();
        }
        if (r->type == REDIS_REPLY_NIL) {
          out = KeyResult::kMiss;
          return Status::Ok();
        }
        break;
      case Op::kExists:
      case Op::kDel:
        if (r->type == REDIS_REPLY_INTEGER) {
          out = r->integer > 0 ? KeyResult::kHit : KeyResult::kMiss;
          return Status::Ok();
        }
        break;
    }
    return IoError("Redis " + std::string(node) + ": unexpected reply type " +
                   std::to_string(r->type));
  }
};

// ---- socket I/O with a deadline ------------------------------------------------

namespace {

// Sets the socket timeouts to the time left, unless they were set for the same
// deadline less than kSlack ago (then a read may overrun by at most kSlack).
constexpr Clock::duration kTimeoutSlack = std::chrono::milliseconds(1);

Status TimeLeft(RedisClient::Node& n, Clock::time_point deadline, RedisClientStats& stats) {
  const Clock::time_point now = Clock::now();
  if (now >= deadline) {
    ++stats.timeouts;
    return Unavailable("deadline exceeded talking to Redis " + n.name);
  }
  if (n.timeout_for_deadline != deadline || now - n.timeout_set_at > kTimeoutSlack) {
    if (redisSetTimeout(n.ctx, ToTimeval(deadline - now)) != REDIS_OK) {
      return Unavailable("Redis " + n.name + ": cannot set socket timeout: " + n.ctx->errstr);
    }
    n.timeout_for_deadline = deadline;
    n.timeout_set_at = now;
  }
  return Status::Ok();
}

// After redisBufferRead/Write failed: why, as a Status.
Status IoFailure(RedisClient::Node& n, int saved_errno, RedisClientStats& stats) {
  const redisContext* c = n.ctx;
  if (c->err == REDIS_ERR_TIMEOUT ||
      (c->err == REDIS_ERR_IO && (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK ||
                                  saved_errno == ETIMEDOUT))) {
    ++stats.timeouts;
    return Unavailable("deadline exceeded talking to Redis " + n.name);
  }
  if (c->err == REDIS_ERR_EOF) return Unavailable("Redis " + n.name + " closed the connection");
  return Unavailable("Redis " + n.name + ": " + c->errstr);
}

Status Flush(RedisClient::Node& n, Clock::time_point deadline, RedisClientStats& stats) {
  int done = 0;
  while (done == 0) {
    KVT_RETURN_IF_ERROR(TimeLeft(n, deadline, stats));
    const size_t before = sdslen(n.ctx->obuf);
    errno = 0;
    if (redisBufferWrite(n.ctx, &done) != REDIS_OK) return IoFailure(n, errno, stats);
    stats.bytes_out += before - (done != 0 ? 0 : sdslen(n.ctx->obuf));
  }
  return Status::Ok();
}

// One reply; the caller owns it (freeReplyObject).
Status Read(RedisClient::Node& n, Clock::time_point deadline, RedisClientStats& stats,
            redisReply** out) {
  for (;;) {
    void* r = nullptr;
    if (redisGetReplyFromReader(n.ctx, &r) != REDIS_OK) {
      return Unavailable("Redis " + n.name + ": protocol error: " + n.ctx->errstr);
    }
    if (r != nullptr) {
      *out = static_cast<redisReply*>(r);
      return Status::Ok();
    }
    KVT_RETURN_IF_ERROR(TimeLeft(n, deadline, stats));
    errno = 0;
    if (redisBufferRead(n.ctx) != REDIS_OK) return IoFailure(n, errno, stats);
  }
}

struct ReplyDeleter {
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using ReplyPtr = std::unique_ptr<redisReply, ReplyDeleter>;

// One command on a connected node, waiting for its reply.
StatusOr<ReplyPtr> Call(RedisClient::Node& n, std::span<const std::string_view> args,
                        Clock::time_point deadline, RedisClientStats& stats) {
  std::vector<const char*> argv;
  std::vector<size_t> len;
  for (std::string_view a : args) {
    argv.push_back(a.data());
    len.push_back(a.size());
  }
  if (redisAppendCommandArgv(n.ctx, static_cast<int>(argv.size()), argv.data(), len.data()) !=
      REDIS_OK) {
    return ResourceExhausted("out of memory building a Redis command");
  }
  ScopedSigpipeBlock no_sigpipe;
  KVT_RETURN_IF_ERROR(Flush(n, deadline, stats));
  redisReply* r = nullptr;
  KVT_RETURN_IF_ERROR(Read(n, deadline, stats, &r));
  return ReplyPtr(r);
}

}  // namespace

// ---- RedisClient --------------------------------------------------------------

StatusOr<std::unique_ptr<RedisClient>> RedisClient::Create(std::string_view url,
                                                           RedisClientOptions options) {
  KVT_ASSIGN_OR_RETURN(RedisUrl parsed, ParseRedisUrl(url));
  return Create(std::move(parsed), std::move(options));
}

StatusOr<std::unique_ptr<RedisClient>> RedisClient::Create(RedisUrl url, RedisClientOptions options) {
  if (url.nodes.empty()) return InvalidArgument("Redis URL names no node");
  if (options.connect_timeout.count() <= 0 || options.command_timeout.count() <= 0) {
    return InvalidArgument("Redis connect/command timeouts must be > 0 ms");
  }
  if (options.reconnect_backoff_initial.count() < 0 ||
      options.reconnect_backoff_max < options.reconnect_backoff_initial) {
    return InvalidArgument("Redis reconnect backoff: want 0 <= initial <= max");
  }
  if (options.max_redirects < 0) return InvalidArgument("Redis max_redirects must be >= 0");
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return InvalidArgument("Redis TLS client certificate and key go together");
  }
  if (!options.password.empty()) {
    url.username = options.username;
    url.password = options.password;
  } else if (!options.username.empty()) {
    return InvalidArgument("Redis username given without a password");
  }
  if (url.tls) {
    // Build one TLS context now so a bad CA / certificate path is reported
    // by Create, not by every call.
    InitOpenSslOnce();
    redisSSLContextError err = REDIS_SSL_CTX_NONE;
    redisSSLOptions o{};
    o.cacert_filename = options.tls_ca_file.empty() ? nullptr : options.tls_ca_file.c_str();
    o.capath = options.tls_ca_path.empty() ? nullptr : options.tls_ca_path.c_str();
    o.cert_filename = options.tls_cert_file.empty() ? nullptr : options.tls_cert_file.c_str();
    o.private_key_filename = options.tls_key_file.empty() ? nullptr : options.tls_key_file.c_str();
    o.verify_mode = options.tls_verify_peer ? REDIS_SSL_VERIFY_PEER : REDIS_SSL_VERIFY_NONE;
    redisSSLContext* probe = redisCreateSSLContextWithOptions(&o, &err);
    if (probe == nullptr) {
      return InvalidArgument(std::string("Redis TLS setup failed: ") + redisSSLContextGetError(err));
    }
    redisFreeSSLContext(probe);
    if (options.tls_verify_name && !options.tls_verify_peer) {
      return InvalidArgument("Redis TLS: tls_verify_name needs tls_verify_peer");
    }
  }
  return std::unique_ptr<RedisClient>(new RedisClient(std::move(url), std::move(options)));
}

RedisClient::RedisClient(RedisUrl url, RedisClientOptions options)
    : url_(std::move(url)), options_(std::move(options)) {
  seed_ = static_cast<uint64_t>(Clock::now().time_since_epoch().count()) ^
          reinterpret_cast<uintptr_t>(this);
  for (const RedisEndpoint& ep : url_.nodes) NodeFor(ep);
  if (url_.cluster) slot_owner_.assign(kClusterSlots, -1);
}

RedisClient::~RedisClient() = default;

Clock::time_point RedisClient::Deadline(Clock::time_point d) const {
  return d == Clock::time_point{} ? Clock::now() + options_.command_timeout : d;
}

RedisClient::Node& RedisClient::NodeFor(const RedisEndpoint& ep) {
  for (auto& n : nodes_) {
    if (n->ep == ep) return *n;
  }
  nodes_.push_back(std::make_unique<Node>(ep, options_, seed_ + nodes_.size() * 0x9e3779b97f4a7c15ull));
  return *nodes_.back();
}

RedisClient::Node* RedisClient::NodeForKey(std::string_view key) {
  if (!url_.cluster) return nodes_.front().get();
  const int16_t owner = slot_owner_[HashSlot(key)];
  return owner < 0 ? nullptr : nodes_[owner].get();
}

void RedisClient::Disconnect(Node& n) {
  if (n.ctx != nullptr) {
    redisFree(n.ctx);
    n.ctx = nullptr;
    ++stats_.disconnects;
  }
  n.backoff.RecordFailure(Clock::now());
  if (url_.cluster) topology_stale_ = true;
}

Status RedisClient::EnsureConnected(Node& n, Clock::time_point deadline) {
  if (n.ctx != nullptr) return Status::Ok();
  const Clock::time_point now = Clock::now();
  if (!n.backoff.Due(now)) {
    ++stats_.fast_failures;
    return Unavailable(std::string(n.last_error.ok() ? "Redis " + n.name + " is down"
                                                     : std::string(n.last_error.message())) +
                       "; next reconnect attempt in " +
                       std::to_string(Millis(n.backoff.next_attempt() - now)) + " ms");
  }
  Status s = Connect(n, deadline);
  if (!s.ok()) {
    if (n.ctx != nullptr) {
      redisFree(n.ctx);
      n.ctx = nullptr;
    }
    ++stats_.connect_failures;
    n.backoff.RecordFailure(Clock::now());
    n.last_error = s;
    if (url_.cluster) topology_stale_ = true;
    return s;
  }
  ++stats_.connects;
  n.backoff.RecordSuccess();
  n.last_error = Status::Ok();
  return Status::Ok();
}

Status RedisClient::Connect(Node& n, Clock::time_point deadline) {
  const Clock::time_point now = Clock::now();
  if (now >= deadline) {
    ++stats_.timeouts;
    return Unavailable("deadline exceeded before connecting to Redis " + n.name);
  }
  const timeval tv = ToTimeval(std::min<Clock::duration>(options_.connect_timeout, deadline - now));
  redisOptions o{};
  REDIS_OPTIONS_SET_TCP(&o, n.ep.host.c_str(), n.ep.port);
  o.connect_timeout = &tv;
  o.command_timeout = &tv;
  o.options |= REDIS_OPT_SET_SOCK_CLOEXEC;
  n.ctx = redisConnectWithOptions(&o);
  if (n.ctx == nullptr) return ResourceExhausted("out of memory creating a Redis connection");
  if (n.ctx->err != 0) {
    return Unavailable("cannot connect to Redis " + n.name + ": " + n.ctx->errstr);
  }
  n.timeout_for_deadline = Clock::time_point{};
  if (url_.tls) {
    if (n.ssl == nullptr) {
      InitOpenSslOnce();
      const std::string& sni = options_.tls_server_name.empty() ? n.ep.host : options_.tls_server_name;
      redisSSLOptions so{};
      so.cacert_filename = options_.tls_ca_file.empty() ? nullptr : options_.tls_ca_file.c_str();
      so.capath = options_.tls_ca_path.empty() ? nullptr : options_.tls_ca_path.c_str();
      so.cert_filename = options_.tls_cert_file.empty() ? nullptr : options_.tls_cert_file.c_str();
      so.private_key_filename = options_.tls_key_file.empty() ? nullptr : options_.tls_key_file.c_str();
      so.server_name = sni.c_str();
      so.verify_mode = options_.tls_verify_peer ? REDIS_SSL_VERIFY_PEER : REDIS_SSL_VERIFY_NONE;
      so.verify_name = options_.tls_verify_name ? n.ep.host.c_str() : nullptr;
      redisSSLContextError err = REDIS_SSL_CTX_NONE;
      n.ssl = redisCreateSSLContextWithOptions(&so, &err);
      if (n.ssl == nullptr) {
        return FailedPrecondition("Redis " + n.name + ": TLS setup failed: " +
                                  redisSSLContextGetError(err));
      }
    }
    ScopedSigpipeBlock no_sigpipe;
    if (redisInitiateSSLWithContext(n.ctx, n.ssl) != REDIS_OK) {
      return FailedPrecondition("Redis " + n.name + ": TLS handshake failed: " + n.ctx->errstr);
    }
  }
  if (!url_.password.empty()) {
    std::vector<std::string_view> auth = {"AUTH"};
    if (!url_.username.empty()) auth.push_back(url_.username);
    auth.push_back(url_.password);
    KVT_ASSIGN_OR_RETURN(ReplyPtr r, Call(n, auth, deadline, stats_));
    if (r->type == REDIS_REPLY_ERROR) {
      // The reply never contains the password; the user name is not secret.
      const std::string who = url_.username.empty() ? "with a password" : "as user '" + url_.username + "'";
      return FailedPrecondition("Redis " + n.name + " refused AUTH " + who + ": " +
                                std::string(r->str, r->len));
    }
  }
  if (url_.db != 0) {
    const std::string db = std::to_string(url_.db);
    const std::string_view select[] = {"SELECT", db};
    KVT_ASSIGN_OR_RETURN(ReplyPtr r, Call(n, select, deadline, stats_));
    if (r->type == REDIS_REPLY_ERROR) {
      return FailedPrecondition("Redis " + n.name + ": SELECT " + db + " failed: " +
                                std::string(r->str, r->len));
    }
  }
  return Status::Ok();
}

Status RedisClient::RefreshTopology(Clock::time_point deadline) {
  const Clock::time_point now = Clock::now();
  const bool known = std::any_of(slot_owner_.begin(), slot_owner_.end(), [](int16_t o) { return o >= 0; });
  if (!topology_stale_ || (known && now - last_refresh_attempt_ < options_.topology_refresh_interval)) {
    return Status::Ok();
  }
  last_refresh_attempt_ = now;
  // Connected nodes first: no connect cost, and they are the likely live ones.
  std::vector<size_t> order;
  for (size_t i = 0; i < nodes_.size(); ++i) {
    if (nodes_[i]->ctx != nullptr) order.push_back(i);
  }
  for (size_t i = 0; i < nodes_.size(); ++i) {
    if (nodes_[i]->ctx == nullptr) order.push_back(i);
  }
  Status last = Unavailable("no Redis Cluster node known");
  for (size_t idx : order) {
    Node& n = *nodes_[idx];
    Status s = EnsureConnected(n, deadline);
    if (!s.ok()) {
      last = s;
      continue;
    }
    const std::string_view cmd[] = {"CLUSTER", "SLOTS"};
    auto r = Call(n, cmd, deadline, stats_);
    if (!r.ok()) {
      Disconnect(n);
      last = r.status();
      continue;
    }
    const redisReply* reply = r->get();
    if (reply->type == REDIS_REPLY_ERROR) {
      last = ServerError(n.name, std::string_view(reply->str, reply->len));
      continue;
    }
    if (reply->type != REDIS_REPLY_ARRAY) {
      last = IoError("Redis " + n.name + ": CLUSTER SLOTS: unexpected reply type");
      continue;
    }
    std::vector<int16_t> owners(kClusterSlots, -1);
    bool ok = true;
    for (size_t i = 0; i < reply->elements && ok; ++i) {
      const redisReply* range = reply->element[i];
      ok = range->type == REDIS_REPLY_ARRAY && range->elements >= 3 &&
           range->element[0]->type == REDIS_REPLY_INTEGER &&
           range->element[1]->type == REDIS_REPLY_INTEGER &&
           range->element[2]->type == REDIS_REPLY_ARRAY && range->element[2]->elements >= 2 &&
           range->element[2]->element[0]->type == REDIS_REPLY_STRING &&
           range->element[2]->element[1]->type == REDIS_REPLY_INTEGER;
      if (!ok) break;
      const long long lo = range->element[0]->integer;
      const long long hi = range->element[1]->integer;
      const redisReply* master = range->element[2];
      std::string host(master->element[0]->str, master->element[0]->len);
      // "" or "?": the endpoint is unknown to the cluster; use the address
      // we reached this node by (single-host test clusters, NAT).
      if (host.empty() || host == "?") host = n.ep.host;
      const long long port = master->element[1]->integer;
      ok = lo >= 0 && hi < kClusterSlots && lo <= hi && port > 0 && port <= 65535;
      if (!ok) break;
      Node& owner = NodeFor(RedisEndpoint{host, static_cast<int>(port)});
      int16_t owner_idx = -1;
      for (size_t k = 0; k < nodes_.size(); ++k) {
        if (nodes_[k].get() == &owner) owner_idx = static_cast<int16_t>(k);
      }
      std::fill(owners.begin() + lo, owners.begin() + hi + 1, owner_idx);
    }
    if (!ok) {
      last = IoError("Redis " + n.name + ": malformed CLUSTER SLOTS reply");
      continue;
    }
    slot_owner_ = std::move(owners);
    topology_stale_ = false;
    ++stats_.topology_refreshes;
    return Status::Ok();
  }
  return Unavailable("cannot load the Redis Cluster slot map: " + std::string(last.message()));
}

Status RedisClient::RunBatch(Batch& b, Clock::time_point deadline) {
  b.results->assign(b.size, KeyResult::kError);
  Status first;
  auto note = [&first](Status s) {
    if (first.ok() && !s.ok()) first = std::move(s);
  };
  std::vector<size_t> pending(b.size);
  for (size_t i = 0; i < b.size; ++i) pending[i] = i;
  std::vector<size_t> next;
  std::vector<int> ask_node;  // per item, -1: route by slot
  ScopedSigpipeBlock no_sigpipe;
  for (int round = 0; !pending.empty(); ++round) {
    if (round > options_.max_redirects) {
      note(Unavailable("Redis Cluster: gave up after " + std::to_string(options_.max_redirects) +
                       " redirects"));
      break;
    }
    if (Clock::now() >= deadline) {
      ++stats_.timeouts;
      note(Unavailable("deadline exceeded before the Redis batch completed"));
      break;
    }
    if (url_.cluster) {
      Status s = RefreshTopology(deadline);
      if (!s.ok()) note(s);  // a partly known map still serves its slots
    }
    // Route.
    std::vector<Node*> used;
    for (size_t i : pending) {
      Node* n = nullptr;
      bool asking = false;
      if (!ask_node.empty() && ask_node[i] >= 0) {
        n = nodes_[ask_node[i]].get();
        asking = true;
        ask_node[i] = -1;
      } else {
        n = NodeForKey(b.Key(i));
      }
      if (n == nullptr) {
        note(Unavailable("Redis Cluster: no node known for slot " + std::to_string(HashSlot(b.Key(i)))));
        continue;
      }
      if (n->round.empty()) {
        used.push_back(n);
        n->round_failed = false;
      }
      n->round.emplace_back(i, asking);
    }
    // Write every node's commands before reading any replies.
    for (Node* n : used) {
      Status s = EnsureConnected(*n, deadline);
      for (size_t k = 0; s.ok() && k < n->round.size(); ++k) {
        const auto [i, asking] = n->round[k];
        if ((asking && redisAppendCommand(n->ctx, "ASKING") != REDIS_OK) || !b.Append(n->ctx, i)) {
          s = ResourceExhausted("out of memory building Redis commands");
        } else if (sdslen(n->ctx->obuf) >= options_.write_flush_bytes) {
          s = Flush(*n, deadline, stats_);
        }
      }
      if (s.ok()) s = Flush(*n, deadline, stats_);
      if (!s.ok()) {
        note(s);
        if (n->ctx != nullptr) Disconnect(*n);
        n->round_failed = true;
      }
    }
    // Read, in order.
    next.clear();
    for (Node* n : used) {
      for (size_t k = 0; !n->round_failed && k < n->round.size(); ++k) {
        const auto [i, asking] = n->round[k];
        redisReply* raw = nullptr;
        Status s;
        if (asking) {
          s = Read(*n, deadline, stats_, &raw);
          if (s.ok()) freeReplyObject(raw);  // +OK; an error shows in the next reply
        }
        if (s.ok()) s = Read(*n, deadline, stats_, &raw);
        if (!s.ok()) {
          note(s);
          Disconnect(*n);
          n->round_failed = true;
          break;
        }
        ReplyPtr r(raw);
        if (r->type != REDIS_REPLY_ERROR) {
          note(b.OnReply(i, r.get(), n->name));
          continue;
        }
        const std::string_view msg(r->str, r->len);
        int slot = 0;
        RedisEndpoint to;
        if (url_.cluster && StartsWith(msg, "MOVED ") && ParseRedirect(msg, n->ep.host, &slot, &to)) {
          Node& target = NodeFor(to);
          for (size_t t = 0; t < nodes_.size(); ++t) {
            if (nodes_[t].get() == &target) slot_owner_[slot] = static_cast<int16_t>(t);
          }
          topology_stale_ = true;  // one moved slot usually means a reshard
          ++stats_.moved;
          next.push_back(i);
        } else if (url_.cluster && StartsWith(msg, "ASK ") &&
                   ParseRedirect(msg, n->ep.host, &slot, &to)) {
          Node& target = NodeFor(to);
          if (ask_node.empty()) ask_node.assign(b.size, -1);
          for (size_t t = 0; t < nodes_.size(); ++t) {
            if (nodes_[t].get() == &target) ask_node[i] = static_cast<int>(t);
          }
          ++stats_.ask;
          next.push_back(i);
        } else if (url_.cluster && StartsWith(msg, "TRYAGAIN")) {
          next.push_back(i);
        } else {
          note(ServerError(n->name, msg));
        }
      }
      n->round.clear();
    }
    pending.swap(next);
  }
  for (auto& n : nodes_) n->round.clear();
  if (b.op == Batch::Op::kGet || b.op == Batch::Op::kGetRange) stats_.bytes_in += b.value_bytes;
  return first;
}

Status RedisClient::Ping(Clock::time_point deadline) {
  std::lock_guard<std::mutex> lock(mu_);
  deadline = Deadline(deadline);
  ScopedSigpipeBlock no_sigpipe;
  if (url_.cluster) KVT_RETURN_IF_ERROR(RefreshTopology(deadline));
  std::vector<bool> owns(nodes_.size(), !url_.cluster);
  for (int16_t o : slot_owner_) {
    if (o >= 0) owns[o] = true;
  }
  for (size_t i = 0; i < nodes_.size(); ++i) {
    if (!owns[i]) continue;
    Node& n = *nodes_[i];
    KVT_RETURN_IF_ERROR(EnsureConnected(n, deadline));
    const std::string_view ping[] = {"PING"};
    auto r = Call(n, ping, deadline, stats_);
    if (!r.ok()) {
      Disconnect(n);
      return r.status();
    }
    if ((*r)->type == REDIS_REPLY_ERROR) return ServerError(n.name, std::string_view((*r)->str, (*r)->len));
  }
  return Status::Ok();
}

Status RedisClient::GetMany(std::span<const std::string_view> keys, const ValueFn& on_value,
                            std::vector<KeyResult>* results, Clock::time_point deadline) {
  std::lock_guard<std::mutex> lock(mu_);
  Batch b = Batch::Keys(Batch::Op::kGet, keys, results);
  b.on_value = &on_value;
  return RunBatch(b, Deadline(deadline));
}

Status RedisClient::GetRangeMany(std::span<const std::string_view> keys, size_t max_bytes, const ValueFn& on_value,
                                 std::vector<KeyResult>* results, Clock::time_point deadline) {
  if (max_bytes == 0) return InvalidArgument("GETRANGE of 0 bytes");
  std::lock_guard<std::mutex> lock(mu_);
  Batch b = Batch::Keys(Batch::Op::kGetRange, keys, results);
  b.range_end = std::to_string(max_bytes - 1);
  b.on_value = &on_value;
  return RunBatch(b, Deadline(deadline));
}

Status RedisClient::GetMany(std::span<const std::string_view> keys,
                            std::vector<std::optional<std::string>>* values,
                            std::vector<KeyResult>* results, Clock::time_point deadline) {
  values->assign(keys.size(), std::nullopt);
  const ValueFn copy = [values](size_t i, std::string_view v) { (*values)[i].emplace(v); };
  return GetMany(keys, copy, results, deadline);
}

Status RedisClient::SetNxMany(std::span<const KeyValue> items, std::chrono::seconds ttl,
                              std::vector<KeyResult>* results, Clock::time_point deadline) {
  std::lock_guard<std::mutex> lock(mu_);
  Batch b = Batch::Keys(Batch::Op::kSetNx, {}, results);
  b.size = items.size();
  b.items = items;
  if (ttl.count() > 0) b.ttl = std::to_string(ttl.count());
  return RunBatch(b, Deadline(deadline));
}

Status RedisClient::ExistsMany(std::span<const std::string_view> keys,
                               std::vector<KeyResult>* results, Clock::time_point deadline) {
  std::lock_guard<std::mutex> lock(mu_);
  Batch b = Batch::Keys(Batch::Op::kExists, keys, results);
  return RunBatch(b, Deadline(deadline));
}

Status RedisClient::DelMany(std::span<const std::string_view> keys, std::vector<KeyResult>* results,
                            Clock::time_point deadline) {
  std::lock_guard<std::mutex> lock(mu_);
  Batch b = Batch::Keys(Batch::Op::kDel, keys, results);
  return RunBatch(b, Deadline(deadline));
}

bool RedisClient::ReconnectDue() const {
  std::lock_guard<std::mutex> lock(mu_);
  const Clock::time_point now = Clock::now();
  for (const auto& n : nodes_) {
    if (n->ctx == nullptr && !n->backoff.Due(now)) return false;
  }
  return true;
}

Clock::time_point RedisClient::NextReconnectAttempt() const {
  std::lock_guard<std::mutex> lock(mu_);
  Clock::time_point latest{};
  for (const auto& n : nodes_) {
    if (n->ctx == nullptr) latest = std::max(latest, n->backoff.next_attempt());
  }
  return latest;
}

RedisClientStats RedisClient::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace kvtier::remote
