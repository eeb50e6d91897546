// What the remote tier keeps in Redis: the key of a chunk and its value, a
// self-describing record (format version 1, a sibling of the disk tier's
// record in cc/tiers/disk/disk_format.h). Little-endian, x86-64 only.
//
// Key
//   "kvtier:1:<ns>:<chunk>"
//     1        the key scheme's version
//     <ns>     16 hex digits: a digest of the engine's hash namespace (model
//              identity, KV dtype, layout string, rank, world size) and its
//              chunk size, so an operator can find (SCAN MATCH) and drop one
//              deployment's keys, and deployments sharing a Redis never meet
//     <chunk>  32 hex digits: the ChunkKey (hi then lo). Chunk keys already
//              chain over the namespace and the request's key extras, so the
//              <ns> part separates by construction, not by luck.
//   No {hash tag}: in a Redis Cluster a prompt's chunks spread over every
//   master (a prompt's batch is pipelined per node anyway).
//
// Value
//   [0, 72)    RemoteRecordHeader
//   [72, 72+P) payload: the chunk's bytes (the CPU tier's, unchanged)
//   The value is exactly header_bytes + payload_bytes long.
//
// Validity: a value read back is used only if all of these hold, checked
// before any payload byte is copied anywhere (CheckRemoteRecord):
//   the value is at least a header long; magic and version are right;
//   header_bytes == sizeof(RemoteRecordHeader); header_crc (CRC32C of the
//   header with header_crc = 0) is right; key and fingerprint are the ones
//   asked for; num_tokens is the chunk's; payload_bytes is in [1, max] (max:
//   the caller's largest chunk) and the value's length is header + payload
//   exactly; payload_crc (CRC32C of the payload) is right. layout_id is
//   returned for the caller to compare (another layout is a stale chunk, a
//   miss, as in the engine). Anything else -- corrupt, truncated, foreign,
//   absurdly large -- is a miss.
// Readers bound what they fetch (GETRANGE 0..header+max-1), so an absurdly
// large value written by someone else never allocates more than that.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "cc/common/chunk_key.h"
#include "cc/common/status.h"
#include "cc/hash/chunk_hash.h"
#include "cc/tiers/tier.h"

namespace kvtier::remote {

inline constexpr uint64_t kRemoteRecordMagic = 0x31304D52'5254564Bull;  // "KVTRRM01"
inline constexpr uint16_t kRemoteRecordVersion = 1;

struct RemoteRecordHeader {
  uint64_t magic;
  uint16_t version;
  uint16_t flags;         // 0 in version 1
  uint32_t header_bytes;  // sizeof(RemoteRecordHeader)
  uint64_t key_lo;
  uint64_t key_hi;
  uint64_t fingerprint;
  uint64_t layout_id;
  uint64_t payload_bytes;
  uint32_t num_tokens;
  uint32_t payload_crc;  // CRC32C of the payload
  uint32_t reserved;
  uint32_t header_crc;   // CRC32C of this struct with header_crc = 0
};
static_assert(sizeof(RemoteRecordHeader) == 72, "RemoteRecordHeader layout is part of the remote format v1");

// XXH3-64 of the namespace's fields (length-prefixed) and chunk_tokens: the
// <ns> part of the keys. Equal namespaces give equal digests in every
// process (the scheduler's view and the workers' engines).
uint64_t NamespaceDigest(const HashNamespace& ns, uint32_t chunk_tokens);

// The key prefix "kvtier:1:<ns>:" of an engine with this namespace digest.
std::string RemoteKeyPrefix(uint64_t namespace_digest);
// "kvtier:1:<ns>:<chunk>" (RemoteKeyPrefix(namespace_digest) + chunk hex).
std::string RemoteKey(uint64_t namespace_digest, const ChunkKey& key);

// The value for a chunk: header + payload, in one string.
std::string EncodeRemoteRecord(const ChunkMeta& meta, std::span<const std::byte> payload);

// Bytes a reader fetches at most for chunks of up to max_payload_bytes.
inline constexpr size_t RemoteRecordMaxBytes(size_t max_payload_bytes) {
  return sizeof(RemoteRecordHeader) + max_payload_bytes;
}

// Checks `value` against what was asked for (see Validity). On OK *payload
// is the payload inside `value` and *layout_id its layout. kDataLoss for a
// corrupt or truncated value (the message says which check failed),
// kNotFound for a value that is another chunk's (key, fingerprint or token
// count differ).
Status CheckRemoteRecord(std::string_view value, const ChunkMeta& expected, size_t max_payload_bytes,
                         std::span<const std::byte>* payload, uint64_t* layout_id);

}  // namespace kvtier::remote
