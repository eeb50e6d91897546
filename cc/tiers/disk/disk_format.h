// On-disk format of the disk tier (format version 1). Everything here is
// little-endian (x86-64 only; static_asserts below pin the sizes) and every
// offset and length is a multiple of kBlock (4096), the O_DIRECT unit.
//
// Directory
//   <path>/LOCK               flock(LOCK_EX) held by the owning process; its
//                             text is the owner's pid (for the error message)
//   <path>/seg_NNNNN.kvt      segment files, NNNNN = segment index (decimal,
//                             5 digits), each exactly segment_bytes long,
//                             preallocated with fallocate when first used
//
// Segment file
//   [0, 4096)                 SegmentHeader, zero padded
//   [4096, segment_bytes)     records appended back to back (log-structured),
//                             each starting on a 4096 boundary
//
// Record
//   [0, 4096)                 RecordHeader, zero padded
//   [4096, 4096 + P)          payload (P = payload_bytes)
//   [4096 + P, 4096 + P')     zero padding, P' = P rounded up to 4096
//
// Validity (what makes a record visible; rebuild checks all but the payload
// CRC, which every Get checks)
//   A record is valid iff its header has the magic, version 1, a correct
//   header_crc, segment_gen equal to its segment header's gen (non-zero), a
//   payload_bytes in [1, segment_bytes - 8192] that ends inside the segment
//   (checked before any arithmetic: see PayloadBytesFit), and its payload's
//   CRC32C equals payload_crc. header_crc covers every header
//   field (itself taken as zero), including payload_crc, so one 32-bit check
//   chains over header and payload. A torn write (kill -9, power cut between
//   blocks) leaves a mismatch somewhere and the record is invalid: nothing is
//   published by a separate "commit" write, the checksum is the commit.
//
// Generations
//   Every time a segment is (re)opened for writing it gets a new gen from a
//   counter that only grows (rebuild restarts it at max seen + 1) and its
//   header is rewritten before any record goes in. Records left from an
//   earlier use of the segment carry an older gen and are ignored, so
//   reclaiming a segment is one 4096-byte header write, not an erase.
//   Evicting or clearing a segment writes gen 0 (= empty) to its header,
//   with reserved1 = the gen its records carry (saturating at 2^32 - 1):
//   rebuild restarts the counter above every such retired gen too, so a
//   segment never gets back a gen its stale records still carry (which
//   would bring cleared chunks back after a restart). Rebuild also reads
//   the header of every intact record, stale ones and those of retired
//   segments included, and restarts the counter above the highest gen any
//   of them carries: a record whose gen is newer than its segment's (a
//   crash before the header write landed, or a forged file) can then never
//   match a later header either.
//   FIFO order across restarts is the gen order.
//
// Removal of a single record rewrites its header block with kFlagDead (and
// a new header_crc); rebuild skips it without counting it as corrupt. When a
// segment is sealed with 8 KiB or more unused, a dead record with the null
// key and payload_bytes = the rest less 4096 closes it, so start-up (which
// reads headers only) jumps over the tail. v1 readers skip it like any
// removed record.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "cc/common/chunk_key.h"

namespace kvtier::disk {

inline constexpr uint64_t kBlock = 4096;
inline constexpr uint64_t RoundUpToBlock(uint64_t n) { return (n + kBlock - 1) & ~(kBlock - 1); }

inline constexpr uint64_t kSegmentMagic = 0x31304745'5354564Bull;  // "KVTSEG01"
inline constexpr uint64_t kRecordMagic = 0x31304345'5254564Bull;   // "KVTREC01"
inline constexpr uint16_t kFormatVersion = 1;
inline constexpr uint16_t kFlagDead = 1;

struct SegmentHeader {
  uint64_t magic;
  uint16_t version;
  uint16_t reserved0;
  uint32_t segment_index;  // must match the file name
  uint64_t segment_bytes;  // must match the file size and the options
  uint64_t gen;            // 0: empty segment
  uint32_t reserved1;
  uint32_t crc;            // CRC32C of this struct with crc = 0
};
static_assert(sizeof(SegmentHeader) == 40, "SegmentHeader layout is part of the on-disk format v1");

struct RecordHeader {
  uint64_t magic;
  uint16_t version;
  uint16_t flags;          // kFlagDead
  uint32_t header_bytes;   // sizeof(RecordHeader): lets v1 readers skip fields a later version appends
  uint64_t segment_gen;
  uint64_t key_lo;
  uint64_t key_hi;
  uint64_t fingerprint;
  uint64_t layout_id;
  uint32_t num_tokens;
  uint32_t payload_crc;    // CRC32C of the payload bytes (not the padding)
  uint64_t payload_bytes;
  uint32_t reserved;
  uint32_t header_crc;     // CRC32C of this struct with header_crc = 0
};
static_assert(sizeof(RecordHeader) == 80, "RecordHeader layout is part of the on-disk format v1");
static_assert(sizeof(RecordHeader) <= kBlock && sizeof(SegmentHeader) <= kBlock,
              "headers must fit their 4096-byte block");

// Bytes a record with `payload_bytes` of payload occupies in a segment.
// Wraps for payload_bytes >= 2^64 - 4095: call it on a value read from disk
// only after PayloadBytesFit() said yes.
inline constexpr uint64_t RecordBytes(uint64_t payload_bytes) {
  return kBlock + RoundUpToBlock(payload_bytes);
}

// Largest payload a record can carry in a segment of `segment_bytes` (>= 2
// blocks): the segment header and the record header take a block each.
inline constexpr uint64_t MaxPayloadBytes(uint64_t segment_bytes) { return segment_bytes - 2 * kBlock; }

// Whether a payload_bytes read from disk can belong to a record of a segment
// of `segment_bytes`. A header's checksum proves nothing here: a forged header
// simply carries a recomputed one. So every payload_bytes taken from disk
// passes this before any arithmetic on it; then RecordBytes() cannot wrap and
// offset + RecordBytes() stays below 2 * segment_bytes.
inline constexpr bool PayloadBytesFit(uint64_t payload_bytes, uint64_t segment_bytes) {
  return segment_bytes >= 2 * kBlock && payload_bytes != 0 && payload_bytes <= MaxPayloadBytes(segment_bytes);
}

// Fill header_crc / crc from the other fields.
void SealSegmentHeader(SegmentHeader* h);
void SealRecordHeader(RecordHeader* h);

// True if magic, version and crc are right (does not look at the payload).
bool SegmentHeaderValid(const SegmentHeader& h);
bool RecordHeaderValid(const RecordHeader& h);

inline ChunkKey KeyOf(const RecordHeader& h) { return ChunkKey{h.key_lo, h.key_hi}; }

template <typename T>
T LoadHeader(const std::byte* block) {
  T h;
  std::memcpy(&h, block, sizeof(T));
  return h;
}

}  // namespace kvtier::disk
