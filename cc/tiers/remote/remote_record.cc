#include "cc/tiers/remote/remote_record.h"

#include <cstdio>
#include <cstring>

#include "cc/tiers/disk/crc32c.h"
#include <xxhash.h>

namespace kvtier::remote {
namespace {

using disk::Crc32c;

std::span<const std::byte> Bytes(const void* p, size_t n) { return {static_cast<const std::byte*>(p), n}; }

uint32_t HeaderCrc(RemoteRecordHeader h) {
  h.header_crc = 0;
  return Crc32c(Bytes(&h, sizeof(h)));
}

void AppendHex64(std::string* out, uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  out->append(buf, 16);
}

}  // namespace

uint64_t NamespaceDigest(const HashNamespace& ns, uint32_t chunk_tokens) {
  std::string buf = "kvtier-remote-namespace-v1";
  auto add = [&](std::string_view s) {
    const uint64_t n = s.size();
    buf.append(reinterpret_cast<const char*>(&n), sizeof(n));
    buf.append(s);
  };
  auto add32 = [&](uint32_t v) { buf.append(reinterpret_cast<const char*>(&v), sizeof(v)); };
  add(ns.model);
  add(ns.dtype);
  add(ns.layout);
  add32(ns.rank);
  add32(ns.world_size);
  add32(chunk_tokens);
  return XXH3_64bits(buf.data(), buf.size());
}

std::string RemoteKeyPrefix(uint64_t namespace_digest) {
  std::string out = "kvtier:1:";
  AppendHex64(&out, namespace_digest);
  out.push_back(':');
  return out;
}

std::string RemoteKey(uint64_t namespace_digest, const ChunkKey& key) {
  std::string out = RemoteKeyPrefix(namespace_digest);
  AppendHex64(&out, key.hi);
  AppendHex64(&out, key.lo);
  return out;
}

std::string EncodeRemoteRecord(const ChunkMeta& meta, std::span<const std::byte> payload) {
  RemoteRecordHeader h{};
  h.magic = kRemoteRecordMagic;
  h.version = kRemoteRecordVersion;
  h.header_bytes = sizeof(RemoteRecordHeader);
  h.key_lo = meta.key.lo;
  h.key_hi = meta.key.hi;
  h.fingerprint = meta.fingerprint;
  h.layout_id = meta.layout_id;
  h.payload_bytes = payload.size();
  h.num_tokens = meta.num_tokens;
  h.payload_crc = Crc32c(payload);
  h.header_crc = HeaderCrc(h);
  std::string out(sizeof(h) + payload.size(), '\0');
  std::memcpy(out.data(), &h, sizeof(h));
  if (!payload.empty()) std::memcpy(out.data() + sizeof(h), payload.data(), payload.size());
  return out;
}

Status CheckRemoteRecord(std::string_view value, const ChunkMeta& expected, size_t max_payload_bytes,
                         std::span<const std::byte>* payload, uint64_t* layout_id) {
  if (value.size() < sizeof(RemoteRecordHeader)) {
    return DataLoss("remote record of " + std::to_string(value.size()) + " bytes is shorter than its header");
  }
  RemoteRecordHeader h;
  std::memcpy(&h, value.data(), sizeof(h));
  if (h.magic != kRemoteRecordMagic) return DataLoss("remote record has a wrong magic");
  if (h.version != kRemoteRecordVersion || h.header_bytes != sizeof(RemoteRecordHeader)) {
    return DataLoss("remote record version " + std::to_string(h.version) + " / header of " +
                    std::to_string(h.header_bytes) + " bytes is not version 1");
  }
  if (h.header_crc != HeaderCrc(h)) return DataLoss("remote record header checksum mismatch");
  if (ChunkKey{h.key_lo, h.key_hi} != expected.key || h.fingerprint != expected.fingerprint ||
      h.num_tokens != expected.num_tokens) {
    return NotFound("remote record is another chunk's");
  }
  // Compared before any arithmetic: payload_bytes comes from outside.
  if (h.payload_bytes == 0 || h.payload_bytes > max_payload_bytes) {
    return DataLoss("remote record payload of " + std::to_string(h.payload_bytes) + " bytes is outside [1, " +
                    std::to_string(max_payload_bytes) + "]");
  }
  if (value.size() != sizeof(RemoteRecordHeader) + h.payload_bytes) {
    return DataLoss("remote record is " + std::to_string(value.size()) + " bytes, its header says " +
                    std::to_string(sizeof(RemoteRecordHeader) + h.payload_bytes) + " (truncated?)");
  }
  std::span<const std::byte> p = Bytes(value.data() + sizeof(RemoteRecordHeader), h.payload_bytes);
  if (Crc32c(p) != h.payload_crc) return DataLoss("remote record payload checksum mismatch");
  *payload = p;
  *layout_id = h.layout_id;
  return Status::Ok();
}

}  // namespace kvtier::remote
