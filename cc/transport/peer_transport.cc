#include "cc/transport/peer_transport.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "cc/common/cpu_affinity.h"
#include "cc/common/thread_guard.h"
#include "cc/tiers/disk/crc32c.h"
#include "cc/transport/wire.h"

namespace kvtier::transport {
namespace {

constexpr size_t kCrcSlice = 256 * 1024;

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// "host:port" or "[v6]:port".
StatusOr<std::pair<std::string, int>> SplitHostPort(std::string_view a) {
  const size_t colon = a.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 == a.size()) {
    return InvalidArgument("address '" + std::string(a) + "' is not host:port");
  }
  std::string host(a.substr(0, colon));
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  int port = 0;
  for (char c : a.substr(colon + 1)) {
    if (c < '0' || c > '9' || port > 65535) return InvalidArgument("address '" + std::string(a) + "': bad port");
    port = port * 10 + (c - '0');
  }
  if (port > 65535) return InvalidArgument("address '" + std::string(a) + "': port above 65535");
  return std::make_pair(host, port);
}

Status Resolve(const std::string& host, int port, bool passive, sockaddr_storage* out, socklen_t* len) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  const int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) {
    return InvalidArgument("cannot resolve '" + host + "': " + gai_strerror(rc));
  }
  std::memcpy(out, res->ai_addr, res->ai_addrlen);
  *len = res->ai_addrlen;
  freeaddrinfo(res);
  return Status::Ok();
}

std::string FirstNonLoopbackIpv4() {
  ifaddrs* ifs = nullptr;
  std::string found = "127.0.0.1";
  if (getifaddrs(&ifs) != 0) return found;
  for (ifaddrs* i = ifs; i != nullptr; i = i->ifa_next) {
    if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != AF_INET) continue;
    const auto* sin = reinterpret_cast<const sockaddr_in*>(i->ifa_addr);
    if ((ntohl(sin->sin_addr.s_addr) >> 24) == 127) continue;
    char buf[INET_ADDRSTRLEN];
    if (inet_ntop(AF_INET, &sin->sin_addr, buf, sizeof(buf)) != nullptr) {
      found = buf;
      break;
    }
  }
  freeifaddrs(ifs);
  return found;
}

size_t TokensCovered(const std::vector<ChunkHash>& chunks, size_t n) {
  return n == 0 ? 0 : chunks[n - 1].begin + chunks[n - 1].num_tokens;
}

std::span<const std::byte> AsBytes(const void* p, size_t n) { return {static_cast<const std::byte*>(p), n}; }

// A send's buffer, freed when UCX is done with it.
struct SendBuffer {
  const UcxApi* ucx;
  std::vector<std::byte> bytes;
};

void OnSendDone(void* request, ucs_status_t status, void* user_data) {
  auto* b = static_cast<SendBuffer*>(user_data);
  b->ucx->request_free(request);
  delete b;
}

}  // namespace

StatusOr<TransportHooks> ParseFault(std::string_view spec) {
  TransportHooks h;
  if (spec.empty() || spec == "none") return h;
  if (spec == "drop") {
    h.before_send_pull = [](std::vector<std::byte>*) { return false; };
  } else if (spec.rfind("delay:", 0) == 0) {
    int ms = 0;
    for (char c : spec.substr(6)) {
      if (c < '0' || c > '9' || ms > 3'600'000) return InvalidArgument("transport fault '" + std::string(spec) + "': bad delay");
      ms = ms * 10 + (c - '0');
    }
    if (spec.size() == 6) return InvalidArgument("transport fault 'delay:' needs milliseconds");
    h.before_send_pull = [ms](std::vector<std::byte>*) {
      std::this_thread::sleep_for(std::chrono::milliseconds(ms));  // the fault itself: a slow request
      return true;
    };
  } else if (spec == "corrupt") {
    h.after_get = [](size_t, std::span<std::byte> d) {
      if (!d.empty()) d[d.size() / 2] ^= std::byte{0x5A};
    };
  } else if (spec == "truncate") {
    h.get_bytes = [](size_t, size_t size) { return size / 2; };
  } else {
    return InvalidArgument("transport fault '" + std::string(spec) +
                           "': expected none, drop, delay:MS, corrupt or truncate");
  }
  return h;
}

// A consumer endpoint to one producer address.
struct PeerTransport::Peer {
  PeerTransport* self = nullptr;
  std::string address;
  ucp_ep_h ep = nullptr;
  bool failed = false;  // guarded by mu_ (set by the error callback)
};

struct PeerTransport::GetOp {
  Engine::ImportSlot slot;
  wire::ReplyEntry entry;
  const UcxApi* ucx = nullptr;
  size_t index = 0;   // in the window
  size_t bytes = 0;   // requested from the get (size unless truncated)
  bool done = false;  // guarded by mu_
  ucs_status_t status = UCS_OK;
};

struct PeerTransport::PullState {
  std::shared_ptr<Peer> peer;
  bool replied = false;  // guarded by mu_
  std::vector<std::byte> reply;
  std::vector<std::unique_ptr<GetOp>> ops;
  ucp_rkey_h rkey = nullptr;
  bool AllDone() const {
    return std::all_of(ops.begin(), ops.end(), [](const auto& o) { return o->done; });
  }
};

StatusOr<std::unique_ptr<PeerTransport>> PeerTransport::Create(Engine* engine, const TransportOptions& options) {
  if (engine == nullptr) return InvalidArgument("PeerTransport needs an engine");
  if (options.timeout_ms == 0 || options.timeout_ms > 3'600'000) {
    return InvalidArgument("transport timeout_ms must be in 1..3600000, got " + std::to_string(options.timeout_ms));
  }
  if (options.listen_port < 0 || options.listen_port > 65535) {
    return InvalidArgument("transport listen port must be in 0..65535, got " + std::to_string(options.listen_port));
  }
  KVT_ASSIGN_OR_RETURN(const UcxApi* ucx, UcxApi::Load());
  std::unique_ptr<PeerTransport> t(new PeerTransport(ucx, engine, options));
  {
    // UCX starts its async thread (which accepts connections) inside Init:
    // on the process's CPUs, not the caller's one core (cpu_affinity.h).
    ScopedProcessCpus wide;
    KVT_RETURN_IF_ERROR(t->Init());
  }
  KVT_RETURN_IF_ERROR(StartThread(&t->progress_, [p = t.get()] { p->ProgressLoop(); }).Annotate("transport progress"));
  return t;
}

PeerTransport::PeerTransport(const UcxApi* ucx, Engine* engine, const TransportOptions& options)
    : ucx_(ucx), engine_(engine), options_(options), hooks_(options.hooks) {}

Status PeerTransport::Init() {
  auto fail = [&](const char* what, ucs_status_t s) {
    return Unavailable(std::string("UCX ") + what + ": " + ucx_->status_string(s));
  };
  // A producer that restarts binds its old port again at once (the old
  // connections' sockets may linger in TIME_WAIT). UCX reads its transports'
  // options from the environment only (ucp_config_modify does not reach
  // the connection managers'); one set by the user wins (no overwrite).
  // (Only TCP's: UCX warns about a variable of a module it did not load,
  // and rdmacm is absent where there is no RDMA.)
  setenv("UCX_TCP_CM_REUSEADDR", "y", /*overwrite=*/0);
  ucp_config_t* config = nullptr;
  ucs_status_t s = ucx_->config_read(nullptr, nullptr, &config);
  if (s != UCS_OK) return fail("config_read", s);
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_RMA;
  s = ucx_->init_version(UCP_API_MAJOR, UCP_API_MINOR, &params, config, &context_);
  ucx_->config_release(config);
  if (s != UCS_OK) return fail("init", s);

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;  // mu_ serializes every call
  if ((s = ucx_->worker_create(context_, &wp, &worker_)) != UCS_OK) return fail("worker_create", s);

  auto handler = [&](unsigned id, ucp_am_recv_callback_t cb) {
    ucp_am_handler_param_t hp{};
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG |
                    UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
    hp.id = id;
    hp.cb = cb;
    hp.arg = this;
    hp.flags = UCP_AM_FLAG_WHOLE_MSG;
    return ucx_->worker_set_am_recv_handler(worker_, &hp);
  };
  if ((s = handler(wire::kAmPull, &OnAmPull)) != UCS_OK) return fail("am handler", s);
  if ((s = handler(wire::kAmReply, &OnAmReply)) != UCS_OK) return fail("am handler", s);
  if ((s = handler(wire::kAmRelease, &OnAmRelease)) != UCS_OK) return fail("am handler", s);

  if (!options_.listen_host.empty()) {
    sockaddr_storage ss{};
    socklen_t len = 0;
    KVT_RETURN_IF_ERROR(Resolve(options_.listen_host, options_.listen_port, /*passive=*/true, &ss, &len));
    ucp_listener_params_t lp{};
    lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
    lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&ss);
    lp.sockaddr.addrlen = len;
    lp.conn_handler.cb = &OnConnRequest;
    lp.conn_handler.arg = this;
    if ((s = ucx_->listener_create(worker_, &lp, &listener_)) != UCS_OK) {
      return Unavailable("UCX cannot listen on " + options_.listen_host + ":" + std::to_string(options_.listen_port) +
                         ": " + ucx_->status_string(s));
    }
    ucp_listener_attr_t attr{};
    attr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
    if ((s = ucx_->listener_query(listener_, &attr)) != UCS_OK) return fail("listener_query", s);
    int port = 0;
    if (attr.sockaddr.ss_family == AF_INET) {
      port = ntohs(reinterpret_cast<const sockaddr_in*>(&attr.sockaddr)->sin_port);
    } else if (attr.sockaddr.ss_family == AF_INET6) {
      port = ntohs(reinterpret_cast<const sockaddr_in6*>(&attr.sockaddr)->sin6_port);
    }
    std::string host = options_.listen_host;
    if (host == "0.0.0.0" || host == "::" || host == "*") host = FirstNonLoopbackIpv4();
    if (host.find(':') != std::string::npos) host = "[" + host + "]";
    address_ = host + ":" + std::to_string(port);
  }
  return Status::Ok();
}

PeerTransport::~PeerTransport() {
  stop_.store(true, std::memory_order_release);
  if (progress_.joinable()) progress_.join();
  if (worker_ == nullptr) {
    if (context_ != nullptr) ucx_->cleanup(context_);
    return;
  }
  std::unique_lock<std::mutex> lock(mu_);
  if (listener_ != nullptr) ucx_->listener_destroy(listener_);
  listener_ = nullptr;
  leases_.clear();
  holds_.clear();
  incoming_.clear();
  for (auto& [addr, peer] : peers_) CloseEpLocked(peer->ep);
  peers_.clear();
  for (ucp_ep_h ep : server_eps_) CloseEpLocked(ep);
  server_eps_.clear();
  for (ucp_ep_h ep : to_close_) CloseEpLocked(ep);
  to_close_.clear();
  // Force-closed endpoints complete their requests (gets of orphaned pulls
  // included) within a few progress calls; bounded all the same.
  const int64_t deadline = NowMs() + 2000;
  while (NowMs() < deadline) {
    ProgressLocked();
    closing_.erase(std::remove_if(closing_.begin(), closing_.end(),
                                  [&](void* r) {
                                    if (ucx_->request_check_status(r) == UCS_INPROGRESS) return false;
                                    ucx_->request_free(r);
                                    return true;
                                  }),
                   closing_.end());
    const bool orphans_done = std::all_of(orphans_.begin(), orphans_.end(), [](const auto& o) { return o->AllDone(); });
    if (closing_.empty() && orphans_done) break;
  }
  for (auto& o : orphans_) {
    if (o->rkey != nullptr) ucx_->rkey_destroy(o->rkey);
    // A get UCX never completed keeps its slot (the memory may still be
    // written): leaked, never reused.
    for (auto& op : o->ops) {
      if (!op->done) (void)new Engine::ImportSlot(std::move(op->slot));
    }
  }
  orphans_.clear();
  if (memh_ != nullptr) ucx_->mem_unmap(context_, memh_);
  ucx_->worker_destroy(worker_);
  ucx_->cleanup(context_);
}

unsigned PeerTransport::ProgressLocked() {
  unsigned total = 0, n;
  while ((n = ucx_->worker_progress(worker_)) != 0) total += n;
  return total;
}

void PeerTransport::CloseEpLocked(ucp_ep_h ep) {
  if (ep == nullptr) return;
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = UCP_EP_CLOSE_FLAG_FORCE;
  void* r = ucx_->ep_close_nbx(ep, &p);
  if (UCS_PTR_IS_PTR(r)) closing_.push_back(r);
}

void PeerTransport::DropPeerLocked(std::shared_ptr<Peer> peer) {
  auto it = peers_.find(peer->address);
  if (it != peers_.end() && it->second == peer) peers_.erase(it);
  if (peer->ep != nullptr) to_close_.push_back(std::exchange(peer->ep, nullptr));
  if (!peer->failed) {
    peer->failed = true;
    retired_peers_.push_back(peer);  // its error callback's arg: kept until the close is done
  }
}

std::shared_ptr<PeerTransport::Peer> PeerTransport::PeerLocked(const std::string& address, Status* error) {
  auto it = peers_.find(address);
  if (it != peers_.end()) {
    if (!it->second->failed) return it->second;
    DropPeerLocked(it->second);
  }
  auto hp = SplitHostPort(address);
  if (!hp.ok()) {
    *error = hp.status();
    return nullptr;
  }
  sockaddr_storage ss{};
  socklen_t len = 0;
  if (Status s = Resolve(hp->first, hp->second, /*passive=*/false, &ss, &len); !s.ok()) {
    *error = s;
    return nullptr;
  }
  auto peer = std::make_shared<Peer>();
  peer->self = this;
  peer->address = address;
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                  UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&ss);
  ep.sockaddr.addrlen = len;
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = &OnClientEpError;
  ep.err_handler.arg = peer.get();
  const ucs_status_t s = ucx_->ep_create(worker_, &ep, &peer->ep);
  if (s != UCS_OK) {
    *error = Unavailable("UCX cannot connect to " + address + ": " + ucx_->status_string(s));
    return nullptr;
  }
  peers_[address] = peer;
  return peer;
}

Status PeerTransport::SendLocked(ucp_ep_h ep, unsigned id, std::vector<std::byte> msg, bool want_reply) {
  auto* buf = new SendBuffer{ucx_, std::move(msg)};
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  p.cb.send = &OnSendDone;
  p.user_data = buf;
  // Eager: the receiver's handler always gets the whole message at once.
  p.flags = UCP_AM_SEND_FLAG_EAGER | (want_reply ? UCP_AM_SEND_FLAG_REPLY : 0);
  void* r = ucx_->am_send_nbx(ep, id, nullptr, 0, buf->bytes.data(), buf->bytes.size(), &p);
  if (UCS_PTR_IS_PTR(r)) return Status::Ok();  // OnSendDone frees buf
  delete buf;
  if (UCS_PTR_IS_ERR(r)) return Unavailable(std::string("UCX send: ") + ucx_->status_string(UCS_PTR_STATUS(r)));
  return Status::Ok();
}

CpuTier* PeerTransport::Tier() {
  if (CpuTier* t = tier_.load(std::memory_order_acquire)) return t;
  // Stats() reads the engine's CPU tier pointer with acquire ordering;
  // cpu_tier() alone would race with a concurrent SetChunkBytes.
  if (!engine_->Stats().has_cpu) return nullptr;
  CpuTier* t = engine_->cpu_tier();
  tier_.store(t, std::memory_order_release);
  return t;
}

Status PeerTransport::EnsureRegisteredLocked(CpuTier* tier) {
  if (memh_ != nullptr) return Status::Ok();
  const std::span<std::byte> region = tier->memory();
  ucp_mem_map_params_t mp{};
  mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  mp.address = region.data();
  mp.length = region.size();
  ucs_status_t s = ucx_->mem_map(context_, &mp, &memh_);
  if (s != UCS_OK) {
    memh_ = nullptr;
    return Unavailable(std::string("UCX mem_map of the CPU tier: ") + ucx_->status_string(s));
  }
  void* packed = nullptr;
  size_t size = 0;
  s = ucx_->rkey_pack(context_, memh_, &packed, &size);
  if (s != UCS_OK) {
    ucx_->mem_unmap(context_, memh_);
    memh_ = nullptr;
    return Unavailable(std::string("UCX rkey_pack: ") + ucx_->status_string(s));
  }
  rkey_.assign(static_cast<std::byte*>(packed), static_cast<std::byte*>(packed) + size);
  ucx_->rkey_buffer_release(packed);
  region_base_ = reinterpret_cast<uint64_t>(region.data());
  region_size_ = region.size();
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Callbacks (run inside ucp_worker_progress, i.e. under mu_).

void PeerTransport::OnConnRequest(ucp_conn_request_h request, void* arg) {
  auto* self = static_cast<PeerTransport*>(arg);
  ucp_ep_params_t p{};
  p.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  p.conn_request = request;
  p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  p.err_handler.cb = &OnServerEpError;
  p.err_handler.arg = self;
  ucp_ep_h ep = nullptr;
  if (self->ucx_->ep_create(self->worker_, &p, &ep) == UCS_OK) {
    self->server_eps_.insert(ep);
  } else {
    self->errors_.fetch_add(1, std::memory_order_relaxed);
  }
}

void PeerTransport::OnServerEpError(void* arg, ucp_ep_h ep, ucs_status_t status) {
  auto* self = static_cast<PeerTransport*>(arg);
  // The peer is gone: whatever it leased is released now, not at expiry.
  for (auto it = self->leases_.begin(); it != self->leases_.end();) {
    it = it->second.ep == ep ? self->leases_.erase(it) : std::next(it);
  }
  std::erase_if(self->incoming_, [ep](const Incoming& in) { return in.ep == ep; });
  if (self->server_eps_.erase(ep) != 0) self->to_close_.push_back(ep);
}

void PeerTransport::OnClientEpError(void* arg, ucp_ep_h ep, ucs_status_t status) {
  auto* peer = static_cast<Peer*>(arg);
  PeerTransport* self = peer->self;
  if (peer->failed) return;
  self->errors_.fetch_add(1, std::memory_order_relaxed);
  auto it = self->peers_.find(peer->address);
  if (it != self->peers_.end() && it->second.get() == peer) self->DropPeerLocked(it->second);
}

ucs_status_t PeerTransport::OnAmPull(void* arg, const void*, size_t, void* data, size_t length,
                                     const ucp_am_recv_param_t* param) {
  auto* self = static_cast<PeerTransport*>(arg);
  if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0 ||
      (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) == 0 || length > (size_t{16} << 20)) {
    self->errors_.fetch_add(1, std::memory_order_relaxed);  // not a kvtier consumer: dropped
    return UCS_OK;
  }
  auto bytes = AsBytes(data, length);
  self->incoming_.push_back(Incoming{param->reply_ep, {bytes.begin(), bytes.end()}});
  return UCS_OK;
}

ucs_status_t PeerTransport::OnAmReply(void* arg, const void*, size_t, void* data, size_t length,
                                      const ucp_am_recv_param_t* param) {
  auto* self = static_cast<PeerTransport*>(arg);
  if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0) return UCS_OK;
  const auto bytes = AsBytes(data, length);
  // The request id sits at the same offset as in a PULL header.
  if (length < sizeof(wire::ReplyHeader)) {
    self->errors_.fetch_add(1, std::memory_order_relaxed);
    return UCS_OK;
  }
  wire::ReplyHeader h;
  std::memcpy(&h, data, sizeof(h));
  auto it = self->waiting_.find(h.request_id);
  if (it == self->waiting_.end() || it->second->replied) return UCS_OK;  // late: its pull gave up
  it->second->reply.assign(bytes.begin(), bytes.end());
  it->second->replied = true;
  return UCS_OK;
}

ucs_status_t PeerTransport::OnAmRelease(void* arg, const void*, size_t, void* data, size_t length,
                                        const ucp_am_recv_param_t* param) {
  auto* self = static_cast<PeerTransport*>(arg);
  auto id = wire::DecodeRelease(AsBytes(data, length));
  if (!id.ok()) {
    self->errors_.fetch_add(1, std::memory_order_relaxed);
    return UCS_OK;
  }
  auto it = self->leases_.find(*id);
  // Only the endpoint that took a lease may end it.
  if (it != self->leases_.end() && ((param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) == 0 ||
                                    it->second.ep == param->reply_ep)) {
    self->leases_.erase(it);
  }
  return UCS_OK;
}

// ---------------------------------------------------------------------------
// Producer

void PeerTransport::ProgressLoop() {
  int64_t last_busy = NowMs();
  while (!stop_.load(std::memory_order_acquire)) {
    std::deque<Incoming> work;
    bool busy;
    {
      std::lock_guard<std::mutex> lock(mu_);
      busy = ProgressLocked() != 0;
      SweepLocked(NowMs());
      work.swap(incoming_);
    }
    for (auto& in : work) HandlePull(in.ep, in.msg);
    const int64_t now = NowMs();
    if (busy || !work.empty()) {
      last_busy = now;
      continue;
    }
    // Spin briefly after activity (a burst of PULLs), then poll with short
    // sleeps: a PULL waits at most that long for an idle producer, and an
    // idle transport costs a few hundred worker polls a second.
    const int64_t idle = now - last_busy;
    if (idle < 2) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(idle < 1000 ? 100 : 1000));
    }
  }
}

void PeerTransport::SweepLocked(int64_t now) {
  for (auto it = leases_.begin(); it != leases_.end();) {
    it = it->second.expires_ms <= now ? leases_.erase(it) : std::next(it);
  }
  for (auto it = holds_.begin(); it != holds_.end();) {
    if (it->second.expires_ms <= now) {
      holds_expired_.fetch_add(1, std::memory_order_relaxed);
      it = holds_.erase(it);
    } else {
      ++it;
    }
  }
  for (ucp_ep_h ep : to_close_) CloseEpLocked(ep);
  to_close_.clear();
  closing_.erase(std::remove_if(closing_.begin(), closing_.end(),
                                [&](void* r) {
                                  if (ucx_->request_check_status(r) == UCS_INPROGRESS) return false;
                                  ucx_->request_free(r);
                                  return true;
                                }),
                 closing_.end());
  if (to_close_.empty() && closing_.empty()) {
    std::erase_if(retired_peers_, [](const std::shared_ptr<Peer>& p) { return p.use_count() == 1; });
  }
  // Orphaned pulls: once UCX finished their gets, their slots may go.
  std::erase_if(orphans_, [&](const std::shared_ptr<PullState>& o) {
    if (!o->AllDone()) return false;
    if (o->rkey != nullptr) ucx_->rkey_destroy(o->rkey);
    return true;
  });
}

void PeerTransport::HandlePull(ucp_ep_h ep, std::span<const std::byte> msg) {
  wire::Reply reply;
  auto pull = wire::DecodePull(msg);
  CpuTier* tier = nullptr;
  std::vector<CpuTier::ReadLease> leases;
  if (!pull.ok()) {
    errors_.fetch_add(1, std::memory_order_relaxed);
    reply.request_id = wire::PeekRequestId(msg);
    reply.status = pull.status().code() == StatusCode::kNotImplemented ? wire::ReplyStatus::kBadVersion
                                                                      : wire::ReplyStatus::kBadRequest;
  } else if (reply.request_id = pull->request_id; pull->namespace_key != engine_->hasher().namespace_key()) {
    reply.status = wire::ReplyStatus::kNamespaceMismatch;
  } else if ((tier = Tier()) == nullptr) {
    reply.status = wire::ReplyStatus::kNoData;
  } else {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!EnsureRegisteredLocked(tier).ok()) {
        errors_.fetch_add(1, std::memory_order_relaxed);
        tier = nullptr;
      }
      reply.rkey = rkey_;
      reply.region_base = region_base_;
      reply.region_size = region_size_;
    }
    if (tier == nullptr) {
      reply.status = wire::ReplyStatus::kNoData;
      reply.rkey.clear();
    }
  }
  if (tier != nullptr) {
    reply.entries.resize(pull->entries.size());
    for (size_t i = 0; i < pull->entries.size(); ++i) {
      const wire::PullEntry& want = pull->entries[i];
      wire::ReplyEntry& e = reply.entries[i];
      e = wire::ReplyEntry{};
      e.key = want.key;
      e.fingerprint = want.fingerprint;
      auto lease = tier->AcquireUncounted(want.key, want.fingerprint);
      if (!lease.ok() || lease->meta().layout_id != pull->layout_id) continue;
      const auto data = lease->data();
      e.found = 1;
      e.layout_id = lease->meta().layout_id;
      e.num_tokens = lease->meta().num_tokens;
      e.addr = reinterpret_cast<uint64_t>(data.data());
      e.size = data.size();
      // Computed here, on the leased bytes, outside every lock: the consumer
      // checks what it read against it.
      e.crc32c = disk::Crc32c(data);
      leases.push_back(std::move(lease).value());
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (server_eps_.count(ep) == 0) return;  // the peer left meanwhile: the leases drop here
  if (!leases.empty()) {
    for (const auto& l : leases) {
      chunks_served_.fetch_add(1, std::memory_order_relaxed);
      bytes_served_.fetch_add(l.data().size(), std::memory_order_relaxed);
      if ((pull->flags & wire::kFlagReleaseHold) != 0) {
        auto h = holds_.find(l.meta().key);
        if (h != holds_.end()) holds_.erase(h);
      }
    }
    reply.lease_id = next_lease_id_++;
    const int64_t expires = NowMs() + 2 * int64_t{options_.timeout_ms};
    leases_.emplace(reply.lease_id, ServedLease{ep, std::move(leases), expires});
  }
  if (!SendLocked(ep, wire::kAmReply, wire::EncodeReply(reply), /*want_reply=*/false).ok()) {
    errors_.fetch_add(1, std::memory_order_relaxed);
    if (reply.lease_id != 0) leases_.erase(reply.lease_id);
  }
}

size_t PeerTransport::Hold(std::span<const int32_t> tokens, const KeyExtras* extras, double seconds) {
  if (!ValidateKeyExtras(extras).ok() || !(seconds > 0)) return 0;
  CpuTier* tier = Tier();
  if (tier == nullptr) return 0;
  std::vector<ChunkHash> chunks;
  engine_->hasher().Hash(tokens, &chunks, extras);
  const int64_t expires = NowMs() + static_cast<int64_t>(std::min(seconds, 1e7) * 1000.0);
  std::vector<std::pair<ChunkKey, CpuTier::ReadLease>> got;
  for (const ChunkHash& c : chunks) {
    // A chunk the producer's store found already filed may be on disk only
    // (after a restart, or evicted from CPU): promoted, since pulls read CPU.
    auto lease = engine_->AcquireInCpu(c);
    if (!lease.ok()) break;
    got.emplace_back(c.key, std::move(lease).value());
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [key, lease] : got) holds_.emplace(key, Held{std::move(lease), expires});
  return got.size();
}

// ---------------------------------------------------------------------------
// Consumer

bool PeerTransport::WaitLocked(std::unique_lock<std::mutex>& lock, const std::function<bool()>& done,
                               int64_t deadline_ms) {
  int idle = 0;
  for (;;) {
    const unsigned n = ProgressLocked();
    if (done()) return true;
    if (NowMs() >= deadline_ms) return false;
    lock.unlock();
    // Busy-poll while the transfer moves (what ucx_perftest does too); back
    // off to short sleeps once nothing has happened for a while, so a dead
    // peer costs little CPU until the deadline.
    idle = n != 0 ? 0 : idle + 1;
    if (idle < 2000) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    lock.lock();
  }
}

size_t PeerTransport::Pull(std::string_view address, std::span<const int32_t> tokens, uint64_t layout_id,
                           const KeyExtras* extras, bool release_hold) {
  pulls_.fetch_add(1, std::memory_order_relaxed);
  if (!ValidateKeyExtras(extras).ok()) {
    errors_.fetch_add(1, std::memory_order_relaxed);
    return 0;
  }
  std::vector<ChunkHash> chunks;
  engine_->hasher().Hash(tokens, &chunks, extras);
  std::vector<ChunkKey> keys(chunks.size());
  std::vector<uint64_t> fps(chunks.size());
  for (size_t i = 0; i < chunks.size(); ++i) {
    keys[i] = chunks[i].key;
    fps[i] = chunks[i].fingerprint;
  }
  size_t have = engine_->index().LookupPrefix(keys, fps);
  if (have == chunks.size()) return TokensCovered(chunks, have);
  if (Tier() == nullptr) {  // nowhere to put chunks before SetChunkBytes
    errors_.fetch_add(1, std::memory_order_relaxed);
    misses_.fetch_add(1, std::memory_order_relaxed);
    return TokensCovered(chunks, have);
  }
  TransportHooks hooks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    hooks = hooks_;
  }
  const std::string addr(address);
  while (have < chunks.size()) {
    const size_t end = std::min(chunks.size(), have + size_t{wire::kMaxPullChunks});
    const size_t got = PullWindow(addr, chunks, have, end, layout_id, release_hold, hooks);
    have += got;
    if (have < end) {
      misses_.fetch_add(1, std::memory_order_relaxed);
      break;
    }
  }
  return TokensCovered(chunks, have);
}

size_t PeerTransport::PullWindow(const std::string& address, const std::vector<ChunkHash>& chunks, size_t begin,
                                 size_t end, uint64_t layout_id, bool release_hold, const TransportHooks& hooks) {
  const int64_t deadline = NowMs() + options_.timeout_ms;
  auto st = std::make_shared<PullState>();
  wire::Pull pull;
  pull.flags = release_hold ? wire::kFlagReleaseHold : 0;
  pull.namespace_key = engine_->hasher().namespace_key();
  pull.layout_id = layout_id;
  for (size_t i = begin; i < end; ++i) pull.entries.push_back({chunks[i].key, chunks[i].fingerprint});

  std::unique_lock<std::mutex> lock(mu_);
  Status error;
  st->peer = PeerLocked(address, &error);
  if (st->peer == nullptr) {
    errors_.fetch_add(1, std::memory_order_relaxed);
    return 0;
  }
  const uint64_t request_id = pull.request_id = next_request_id_++;
  lock.unlock();
  std::vector<std::byte> msg = wire::EncodePull(pull);
  const bool send = !hooks.before_send_pull || hooks.before_send_pull(&msg);
  lock.lock();
  waiting_[request_id] = st.get();
  if (send && !st->peer->failed) {
    if (!SendLocked(st->peer->ep, wire::kAmPull, std::move(msg), /*want_reply=*/true).ok()) {
      st->peer->failed = true;
    }
  }
  const std::shared_ptr<Peer> peer = st->peer;
  const bool replied = WaitLocked(lock, [&] { return st->replied || peer->failed; }, deadline);
  waiting_.erase(request_id);
  auto give_up = [&](std::atomic<uint64_t>& counter) {
    counter.fetch_add(1, std::memory_order_relaxed);
    DropPeerLocked(peer);  // the next pull reconnects
    return size_t{0};
  };
  if (!st->replied) return give_up(replied ? errors_ : timeouts_);

  auto reply = wire::DecodeReply(st->reply);
  if (!reply.ok() || reply->request_id != request_id) return give_up(errors_);
  auto release = [&] {
    if (reply->lease_id != 0 && !peer->failed) (void)SendLocked(peer->ep, wire::kAmRelease, wire::EncodeRelease(reply->lease_id), false);
  };
  if (reply->status != wire::ReplyStatus::kOk || reply->entries.size() != end - begin) {
    if (reply->status == wire::ReplyStatus::kOk) errors_.fetch_add(1, std::memory_order_relaxed);
    release();
    return 0;
  }
  if (reply->entries.empty() || !reply->entries[0].found) {
    release();
    return 0;
  }
  if (ucx_->ep_rkey_unpack(peer->ep, reply->rkey.data(), &st->rkey) != UCS_OK) {
    st->rkey = nullptr;
    release();
    return give_up(errors_);
  }
  lock.unlock();

  // Reserve a slot per found chunk, in prefix order, stopping at the first
  // that is missing, inconsistent or has no room. A chunk that became
  // cached locally meanwhile needs no get.
  size_t present = 0;  // leading chunks cached without a get
  for (size_t i = 0; i < reply->entries.size(); ++i) {
    const wire::ReplyEntry& e = reply->entries[i];
    const ChunkHash& c = chunks[begin + i];
    if (!e.found) break;
    if (e.key != c.key || e.fingerprint != c.fingerprint || e.layout_id != layout_id || e.num_tokens != c.num_tokens) {
      errors_.fetch_add(1, std::memory_order_relaxed);
      break;
    }
    ChunkMeta m;
    m.key = c.key;
    m.fingerprint = c.fingerprint;
    m.layout_id = layout_id;
    m.num_tokens = c.num_tokens;
    auto slot = engine_->BeginImport(m, e.size);
    if (slot.status().code() == StatusCode::kAlreadyExists && st->ops.empty()) {
      ++present;
      continue;
    }
    // Anything else ends the window here (a chunk cached after some gets
    // included: the next pull starts past it).
    if (!slot.ok()) {
      if (slot.status().code() == StatusCode::kInvalidArgument) errors_.fetch_add(1, std::memory_order_relaxed);
      break;
    }
    auto op = std::make_unique<GetOp>(GetOp{std::move(slot).value(), e, ucx_, i});
    op->bytes = hooks.get_bytes ? std::min<size_t>(hooks.get_bytes(i, e.size), e.size) : e.size;
    st->ops.push_back(std::move(op));
  }

  lock.lock();
  if (peer->failed) {
    for (auto& op : st->ops) op->done = true;  // never issued
    ucx_->rkey_destroy(std::exchange(st->rkey, nullptr));
    return give_up(errors_);
  }
  for (auto& op : st->ops) {
    if (op->bytes == 0) {
      op->done = true;
      continue;
    }
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = [](void* request, ucs_status_t status, void* user_data) {
      auto* o = static_cast<GetOp*>(user_data);
      o->status = status;
      o->done = true;
      o->ucx->request_free(request);
    };
    p.user_data = op.get();
    void* r = ucx_->get_nbx(peer->ep, op->slot.data().data(), op->bytes, op->entry.addr, st->rkey, &p);
    if (UCS_PTR_IS_ERR(r)) {
      op->status = UCS_PTR_STATUS(r);
      op->done = true;
    } else if (r == nullptr) {
      op->done = true;
    }
  }
  // Check and commit each chunk as soon as its own get is done, in prefix
  // order, while the later gets are still moving (the CRC32C of one chunk
  // overlaps the transfer of the next).
  size_t committed = 0;
  std::atomic<uint64_t>* failure = nullptr;  // the counter of what ended the window early
  for (auto& op : st->ops) {
    if (!WaitLocked(lock, [&] { return op->done || peer->failed; }, deadline)) {
      failure = &timeouts_;
      break;
    }
    if (!op->done || op->status != UCS_OK) {
      failure = &errors_;
      break;
    }
    lock.unlock();
    const std::span<std::byte> data = op->slot.data().first(op->entry.size);
    if (hooks.after_get) hooks.after_get(op->index, data);
    // In slices, driving the worker between them: over TCP the later gets
    // move only while someone progresses the worker.
    uint32_t crc = 0;
    for (size_t off = 0; off < data.size(); off += kCrcSlice) {
      crc = disk::Crc32cExtend(crc, data.subspan(off, std::min(kCrcSlice, data.size() - off)));
      std::lock_guard<std::mutex> progress_lock(mu_);
      ProgressLocked();
    }
    bool ok = crc == op->entry.crc32c;
    if (!ok) corrupt_.fetch_add(1, std::memory_order_relaxed);
    ok = ok && engine_->CommitImport(std::move(op->slot)).ok();
    if (ok) {
      chunks_pulled_.fetch_add(1, std::memory_order_relaxed);
      bytes_pulled_.fetch_add(data.size(), std::memory_order_relaxed);
      ++committed;
    }
    lock.lock();
    if (!ok) break;
  }
  if (failure != nullptr) {
    failure->fetch_add(1, std::memory_order_relaxed);
    DropPeerLocked(peer);  // force-closed: the gets still in flight complete soon
  } else {
    release();
  }
  if (!st->AllDone()) {
    // Gets still in flight may yet write into their slots: the slots (and
    // the rkey) stay until UCX completes them; the progress thread reaps.
    orphans_.push_back(st);
  } else {
    ucx_->rkey_destroy(std::exchange(st->rkey, nullptr));
  }
  lock.unlock();
  return present + committed;
}

TransportStats PeerTransport::Stats() const {
  TransportStats s;
  auto ld = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  s.pulls = ld(pulls_);
  s.chunks_pulled = ld(chunks_pulled_);
  s.bytes_pulled = ld(bytes_pulled_);
  s.chunks_served = ld(chunks_served_);
  s.bytes_served = ld(bytes_served_);
  s.misses = ld(misses_);
  s.corrupt = ld(corrupt_);
  s.timeouts = ld(timeouts_);
  s.errors = ld(errors_);
  s.holds_expired = ld(holds_expired_);
  std::lock_guard<std::mutex> lock(mu_);
  s.connected_peers = server_eps_.size();
  for (const auto& [addr, peer] : peers_) s.connected_peers += peer->failed ? 0 : 1;
  s.holds = holds_.size();
  s.orphaned_pulls = orphans_.size();
  return s;
}

void PeerTransport::SetHooks(TransportHooks hooks) {
  std::lock_guard<std::mutex> lock(mu_);
  hooks_ = std::move(hooks);
}

}  // namespace kvtier::transport
