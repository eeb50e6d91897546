#include "cc/transport/wire.h"

#include <cstring>
#include <string>

namespace kvtier::transport::wire {
namespace {

// The records are memcpy'd: the protocol is little-endian and so is every
// machine kvtier builds for (x86-64, see .bazelrc).
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "wire records are little-endian");

template <typename T>
void Append(std::vector<std::byte>* out, const T& v) {
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  out->insert(out->end(), p, p + sizeof(T));
}

template <typename T>
T Read(std::span<const std::byte> msg, size_t off) {
  T v;
  std::memcpy(&v, msg.data() + off, sizeof(T));
  return v;
}

Preamble MakePreamble(Kind k) { return Preamble{kMagic, kWireVersion, static_cast<uint16_t>(k)}; }

// Checks the preamble; kNotImplemented for a known kind of another version.
Status CheckPreamble(std::span<const std::byte> msg, Kind kind) {
  if (msg.size() < sizeof(Preamble)) return InvalidArgument("message of " + std::to_string(msg.size()) + " bytes");
  const auto pre = Read<Preamble>(msg, 0);
  if (pre.magic != kMagic) return InvalidArgument("bad magic");
  if (pre.kind != static_cast<uint16_t>(kind)) return InvalidArgument("kind " + std::to_string(pre.kind));
  if (pre.version != kWireVersion) {
    return Status(StatusCode::kNotImplemented, "wire version " + std::to_string(pre.version) + ", this side speaks " +
                                                  std::to_string(kWireVersion));
  }
  return Status::Ok();
}

}  // namespace

std::vector<std::byte> EncodePull(const Pull& p) {
  std::vector<std::byte> out;
  out.reserve(sizeof(PullHeader) + p.entries.size() * sizeof(PullEntry));
  PullHeader h{};
  h.pre = MakePreamble(Kind::kPull);
  h.flags = p.flags;
  h.count = static_cast<uint32_t>(p.entries.size());
  h.request_id = p.request_id;
  h.namespace_key = p.namespace_key;
  h.layout_id = p.layout_id;
  Append(&out, h);
  for (const auto& e : p.entries) Append(&out, e);
  return out;
}

std::vector<std::byte> EncodeReply(const Reply& r) {
  std::vector<std::byte> out;
  out.reserve(sizeof(ReplyHeader) + r.entries.size() * sizeof(ReplyEntry) + r.rkey.size());
  ReplyHeader h{};
  h.pre = MakePreamble(Kind::kReply);
  h.status = static_cast<uint16_t>(r.status);
  h.count = static_cast<uint32_t>(r.entries.size());
  h.request_id = r.request_id;
  h.lease_id = r.lease_id;
  h.region_base = r.region_base;
  h.region_size = r.region_size;
  h.rkey_bytes = static_cast<uint32_t>(r.rkey.size());
  Append(&out, h);
  for (const auto& e : r.entries) Append(&out, e);
  out.insert(out.end(), r.rkey.begin(), r.rkey.end());
  return out;
}

std::vector<std::byte> EncodeRelease(uint64_t lease_id) {
  std::vector<std::byte> out;
  ReleaseMsg m{};
  m.pre = MakePreamble(Kind::kRelease);
  m.lease_id = lease_id;
  Append(&out, m);
  return out;
}

StatusOr<Pull> DecodePull(std::span<const std::byte> msg) {
  KVT_RETURN_IF_ERROR(CheckPreamble(msg, Kind::kPull));
  if (msg.size() < sizeof(PullHeader)) return InvalidArgument("PULL shorter than its header");
  const auto h = Read<PullHeader>(msg, 0);
  if ((h.flags & ~kKnownPullFlags) != 0) return InvalidArgument("PULL has unknown flags");
  if (h.count == 0 || h.count > kMaxPullChunks) return InvalidArgument("PULL count " + std::to_string(h.count));
  if (msg.size() != sizeof(PullHeader) + size_t{h.count} * sizeof(PullEntry)) {
    return InvalidArgument("PULL of " + std::to_string(msg.size()) + " bytes for " + std::to_string(h.count) +
                           " chunks");
  }
  if (h.request_id == 0) return InvalidArgument("PULL request id 0");
  Pull p;
  p.flags = h.flags;
  p.request_id = h.request_id;
  p.namespace_key = h.namespace_key;
  p.layout_id = h.layout_id;
  p.entries.resize(h.count);
  std::memcpy(p.entries.data(), msg.data() + sizeof(PullHeader), size_t{h.count} * sizeof(PullEntry));
  for (const auto& e : p.entries) {
    if (e.key.IsNull()) return InvalidArgument("PULL names the null key");
  }
  return p;
}

StatusOr<Reply> DecodeReply(std::span<const std::byte> msg) {
  KVT_RETURN_IF_ERROR(CheckPreamble(msg, Kind::kReply));
  if (msg.size() < sizeof(ReplyHeader)) return InvalidArgument("REPLY shorter than its header");
  const auto h = Read<ReplyHeader>(msg, 0);
  if (h.status > static_cast<uint16_t>(ReplyStatus::kNoData)) return InvalidArgument("REPLY status unknown");
  if (h.count > kMaxPullChunks) return InvalidArgument("REPLY count " + std::to_string(h.count));
  if (h.rkey_bytes > kMaxRkeyBytes) return InvalidArgument("REPLY rkey of " + std::to_string(h.rkey_bytes));
  if (msg.size() != sizeof(ReplyHeader) + size_t{h.count} * sizeof(ReplyEntry) + h.rkey_bytes) {
    return InvalidArgument("REPLY of " + std::to_string(msg.size()) + " bytes does not match its counts");
  }
  Reply r;
  r.status = static_cast<ReplyStatus>(h.status);
  r.request_id = h.request_id;
  r.lease_id = h.lease_id;
  r.region_base = h.region_base;
  r.region_size = h.region_size;
  r.entries.resize(h.count);
  std::memcpy(r.entries.data(), msg.data() + sizeof(ReplyHeader), size_t{h.count} * sizeof(ReplyEntry));
  const size_t rk = sizeof(ReplyHeader) + size_t{h.count} * sizeof(ReplyEntry);
  r.rkey.assign(msg.begin() + rk, msg.end());
  for (const auto& e : r.entries) {
    if (e.found > 1) return InvalidArgument("REPLY found flag " + std::to_string(e.found));
    if (e.found == 0) continue;
    // Every found chunk lies inside the advertised region (no wrap-around).
    if (e.size == 0 || e.addr < r.region_base || e.size > r.region_size ||
        e.addr - r.region_base > r.region_size - e.size) {
      return InvalidArgument("REPLY chunk outside the producer's region");
    }
  }
  if (r.status == ReplyStatus::kOk && h.count > 0 && r.rkey.empty()) return InvalidArgument("REPLY without rkey");
  return r;
}

StatusOr<uint64_t> DecodeRelease(std::span<const std::byte> msg) {
  KVT_RETURN_IF_ERROR(CheckPreamble(msg, Kind::kRelease));
  if (msg.size() != sizeof(ReleaseMsg)) return InvalidArgument("RELEASE of " + std::to_string(msg.size()) + " bytes");
  return Read<ReleaseMsg>(msg, 0).lease_id;
}

uint64_t PeekRequestId(std::span<const std::byte> msg) {
  if (msg.size() < sizeof(PullHeader)) return 0;
  return Read<PullHeader>(msg, 0).request_id;
}

}  // namespace kvtier::transport::wire
