// The kvtier peer-transfer wire protocol (version 1): the small messages a
// consumer and a producer exchange over a UCX endpoint (active messages).
// The chunk bytes themselves never travel in these messages: the consumer
// reads them with RMA gets straight out of the producer's registered CPU
// tier region into its own slab memory.
//
//   consumer                                  producer
//     PULL {request_id, namespace, layout,  ->
//           flags, [key, fingerprint] x n}
//                                           <-  REPLY {request_id, status,
//                                                 lease_id, [found, addr, size,
//                                                 crc32c, key, fingerprint,
//                                                 layout, tokens] x n, rkey}
//     RMA get of each found chunk (addr, size, rkey) into a CPU slab slot
//     check: size, CRC32C, key, fingerprint, layout -> commit, else a miss
//     RELEASE {lease_id}                    ->  the chunks' leases end
//
// Encoding: little-endian, fixed-size records, no padding holes (each
// struct below is static_assert-ed). Every message starts with the same
// 8-byte preamble {magic "KVTP", version, kind}. A decoder checks magic,
// version, kind, that the length is exactly header + count * record (+ the
// rkey for a REPLY), and count <= kMaxPullChunks, before reading a record;
// anything else is kInvalidArgument and the message is dropped (a bad PULL
// is answered with status kBadRequest so the consumer does not wait out its
// timeout). Unknown flag bits are rejected, never ignored.
//
// Versioning: a producer answers a PULL of another version with a REPLY
// {status kBadVersion} of its own version and no records; a consumer treats
// any REPLY it cannot decode as a miss. A new version adds a new kind or
// bumps kWireVersion; nothing is reinterpreted in place.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "cc/common/chunk_key.h"
#include "cc/common/status.h"

namespace kvtier::transport::wire {

inline constexpr uint32_t kMagic = 0x5054564B;  // "KVTP"
inline constexpr uint16_t kWireVersion = 1;
// A PULL names at most this many chunks (1024 chunks of 256 tokens is a
// 256k-token prompt); a consumer asks in windows of it.
inline constexpr uint32_t kMaxPullChunks = 1024;
// A packed rkey is a few hundred bytes; anything far larger is garbage.
inline constexpr uint32_t kMaxRkeyBytes = 64 * 1024;

// UCX active-message ids.
enum AmId : unsigned { kAmPull = 0x4B01, kAmReply = 0x4B02, kAmRelease = 0x4B03 };

enum class Kind : uint16_t { kPull = 1, kReply = 2, kRelease = 3 };

// PULL flags.
inline constexpr uint32_t kFlagReleaseHold = 1u << 0;  // drop one producer hold per found chunk
inline constexpr uint32_t kKnownPullFlags = kFlagReleaseHold;

enum class ReplyStatus : uint16_t {
  kOk = 0,
  kBadRequest = 1,         // the PULL failed validation
  kBadVersion = 2,         // the PULL's version is not this producer's
  kNamespaceMismatch = 3,  // another model / layout / rank: nothing can match
  kNoData = 4,             // the producer has no CPU tier yet
};

struct Preamble {
  uint32_t magic;
  uint16_t version;
  uint16_t kind;
};
static_assert(sizeof(Preamble) == 8);

struct PullHeader {
  Preamble pre;
  uint32_t flags;
  uint32_t count;
  uint64_t request_id;
  ChunkKey namespace_key;
  uint64_t layout_id;
};
static_assert(sizeof(PullHeader) == 48, "wire record: fixed size, no padding");

struct PullEntry {
  ChunkKey key;
  uint64_t fingerprint;
};
static_assert(sizeof(PullEntry) == 24, "wire record: fixed size, no padding");

struct ReplyHeader {
  Preamble pre;
  uint16_t status;
  uint16_t reserved;
  uint32_t count;
  uint64_t request_id;
  uint64_t lease_id;     // 0: nothing leased, no RELEASE needed
  uint64_t region_base;  // the producer's registered region: every addr lies in it
  uint64_t region_size;
  uint32_t rkey_bytes;
  uint32_t reserved2;
};
static_assert(sizeof(ReplyHeader) == 56, "wire record: fixed size, no padding");

struct ReplyEntry {
  ChunkKey key;
  uint64_t fingerprint;
  uint64_t layout_id;
  uint64_t addr;
  uint64_t size;
  uint32_t crc32c;
  uint32_t num_tokens;
  uint32_t found;  // 0 or 1
  uint32_t reserved;
};
static_assert(sizeof(ReplyEntry) == 64, "wire record: fixed size, no padding");

struct ReleaseMsg {
  Preamble pre;
  uint32_t reserved;
  uint32_t reserved2;
  uint64_t lease_id;
};
static_assert(sizeof(ReleaseMsg) == 24, "wire record: fixed size, no padding");

struct Pull {
  uint32_t flags = 0;
  uint64_t request_id = 0;
  ChunkKey namespace_key;
  uint64_t layout_id = 0;
  std::vector<PullEntry> entries;
};

struct Reply {
  ReplyStatus status = ReplyStatus::kOk;
  uint64_t request_id = 0;
  uint64_t lease_id = 0;
  uint64_t region_base = 0, region_size = 0;
  std::vector<ReplyEntry> entries;
  std::vector<std::byte> rkey;
};

std::vector<std::byte> EncodePull(const Pull& p);
std::vector<std::byte> EncodeReply(const Reply& r);
std::vector<std::byte> EncodeRelease(uint64_t lease_id);

// kInvalidArgument naming the first bad field. DecodePull of a well-formed
// PULL of another version is kNotImplemented (answer kBadVersion).
StatusOr<Pull> DecodePull(std::span<const std::byte> msg);
StatusOr<Reply> DecodeReply(std::span<const std::byte> msg);
StatusOr<uint64_t> DecodeRelease(std::span<const std::byte> msg);
// The request id of a PULL too broken to decode, when it can still be read
// (to answer kBadRequest); 0 otherwise.
uint64_t PeekRequestId(std::span<const std::byte> msg);

}  // namespace kvtier::transport::wire
