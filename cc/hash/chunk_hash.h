// Chunk hashing: turns a token sequence into prefix-chained 128-bit chunk keys.
//
// Contract
// - Stable format. The keys below are written into shared memory, disk
//   records and remote stores, and are compared across processes, machines
//   and releases. The same (namespace, chunk_tokens, policy, tokens) gives
//   bit-identical keys everywhere: no pointer values, no random seeds, no
//   std::hash, no dependence on the host's byte order in the output. A change
//   to anything in "Format" below is a new format: bump kChunkHashFormatVersion
//   (it is hashed into every key, so old and new keys never meet).
// - Thread safety: ChunkHasher is immutable after Create(); every const method
//   may be called concurrently. Hash() allocates nothing per chunk (streaming
//   XXH3 states live on the stack); it may grow *out once per call.
// - Cost: two XXH3 passes over the token bytes (key and fingerprint), about
//   the cost of reading the prompt twice from cache.
//
// Format (version 1)
// All integers are little-endian. XXH3 is xxHash 0.8's XXH3 (XXH3_128bits /
// XXH3_64bits with the given seed; the 128-bit result is split as .low64 ->
// ChunkKey::lo, .high64 -> ChunkKey::hi).
//
//   token bytes   Each token is written as its uint32 two's-complement value,
//                 4 bytes little-endian.
//   namespace     ns_bytes = "KVTNS" (5 ASCII bytes)
//   serialization          || u32(kChunkHashFormatVersion)
//                          || u32(len(model))  || model bytes
//                          || u32(len(dtype))  || dtype bytes
//                          || u32(len(layout)) || layout bytes
//                          || u32(rank) || u32(world_size)
//                          || u32(chunk_tokens)
//                 chunk_tokens is part of the namespace: KV of a 128-token
//                 chunk must never be served for a 256-token chunk, and this
//                 also keeps partial tails of one chunk size apart from full
//                 chunks of another.
//   namespace key N = XXH3-128(ns_bytes, seed 0), null-remapped (see below).
//   chunk i       covers tokens [i*C, min((i+1)*C, n)), C = chunk_tokens.
//   input_i       = u64(prev.lo) || u64(prev.hi) || token bytes of chunk i
//                   [|| u32(num_tokens_i) || u8(0xA5)   only for a partial tail]
//                 where prev = key_{i-1}, and key_{-1} = N.
//                 A full chunk's input is 16 + 4*C bytes (a multiple of 4); a
//                 partial tail's is 16 + 4*k + 5 bytes (1 mod 4), so no partial
//                 tail input can ever equal a full chunk's input.
//   key_i         = XXH3-128(input_i, seed 0), null-remapped.
//   fingerprint_i = XXH3-64(input_i, seed kFingerprintSeed). A different,
//                 non-zero seed makes XXH3 derive a different secret, so the
//                 fingerprint is not a function of the 128-bit key (with seed
//                 0 XXH3-64 equals the low half of XXH3-128 for long inputs).
//                 It is stored beside the key and compared on retrieve so a
//                 128-bit collision is a miss, never wrong KV.
//   null remap    ChunkKey{0,0} is reserved (the index's "no key"). A key
//                 that comes out all-zero is replaced by
//                 {lo = fingerprint of the same input, hi = kNullKeyRemapHi};
//                 hi is non-zero, so the result is never null, and it is
//                 derived from the input alone, so it is deterministic. The
//                 chain continues from the remapped key. For the namespace key
//                 the "fingerprint" is XXH3-64(ns_bytes, kFingerprintSeed).
//
// Partial tail: with kDrop a last chunk shorter than C produces no ChunkHash
// (its KV is recomputed every time); with kKeep it produces one whose
// num_tokens < C and whose key can never equal a full chunk's key.
//
// Key extras (same format version: keys hashed without extras, or with an
// empty KeyExtras, are bit-identical to the above)
// The KV of a token depends on more than token ids: a LoRA adapter, a
// cache salt, the image behind a run of placeholder tokens. KeyExtras
// carries that identity and folds it into the chain:
//   H(bytes)      = XXH3-128(bytes, seed 0), null-remapped with
//                   XXH3-64(bytes, kFingerprintSeed) (same rule as N).
//   salt          When extras.salt is non-null the chain starts from
//                   S = H("KVTSALT" || u64(N.lo) || u64(N.hi)
//                         || u64(salt.lo) || u64(salt.hi))
//                 instead of N, so a salt changes every key.
//   spans         Chunk i (tokens [b, e)) is overlapped by span s when
//                 s.begin < e and s.end > b. If any span overlaps chunk i,
//                 prev is replaced, before input_i is built, by
//                   H("KVTSPAN" || u64(prev.lo) || u64(prev.hi)
//                     || for each overlapping span, in the given order:
//                        u32(s.begin) || u32(s.end) || u64(s.id.lo) || u64(s.id.hi))
//                 input_i is otherwise unchanged (so the full/partial length
//                 argument above still holds). Keys chain, so the first
//                 overlapped chunk and every chunk after it change; chunks
//                 before it keep their extras-free keys (a shared text prefix
//                 before an image stays shared).
//   validity      Every span has begin < end, and spans are sorted by begin
//                 (non-decreasing); they may overlap each other and chunk
//                 boundaries, and may extend past the tokens (only the part
//                 over hashed chunks matters, so hashing a prefix of a prompt
//                 gives a prefix of the prompt's keys). ValidateKeyExtras
//                 checks this; Hash() with invalid extras is deterministic
//                 but meaningless, so callers validate first (Engine does).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cc/common/chunk_key.h"
#include "cc/common/status.h"

namespace kvtier {

inline constexpr uint32_t kChunkHashFormatVersion = 1;
// "kvtier/f" as ASCII, little-endian. Any fixed non-zero value works; it is
// written down because it is part of the stable format.
inline constexpr uint64_t kFingerprintSeed = 0x662f72656974766bull;
// "kvtier.0" as ASCII, little-endian: the hi half of a remapped null key.
inline constexpr uint64_t kNullKeyRemapHi = 0x302e72656974766bull;
inline constexpr uint32_t kMaxChunkTokens = 1u << 20;
// Trailer byte of a partial tail's input (see Format).
inline constexpr uint8_t kPartialTailTag = 0xA5;

// Separates caches that must never share KV.
struct HashNamespace {
  std::string model;   // model id or path
  std::string dtype;   // KV dtype name, e.g. "float16"
  std::string layout;  // KV layout id string
  uint32_t rank = 0;   // tensor-parallel rank
  uint32_t world_size = 1;
};

// Identity of some tokens beyond their ids: tokens [begin, end) of the
// prompt stand for `id` (e.g. an image's content hash).
struct KeySpan {
  uint32_t begin = 0;
  uint32_t end = 0;
  ChunkKey id;
};

// Everything besides token ids that decides what KV a request's tokens have
// (see "Key extras" above). Plain data; the caller owns it.
struct KeyExtras {
  ChunkKey salt;               // null: none. LoRA adapter, cache_salt, prompt-embeds digest...
  std::vector<KeySpan> spans;  // sorted by begin; may overlap chunk boundaries
  bool empty() const { return salt.IsNull() && spans.empty(); }
};

// XXH3-128 of arbitrary bytes, null-remapped: how strings become ids and
// salts. Never returns the null key.
ChunkKey IdentityKey(std::string_view bytes);

// kInvalidArgument (naming the span) unless every span has begin < end and
// the spans are sorted by begin. A null pointer or empty extras is valid.
Status ValidateKeyExtras(const KeyExtras* extras);

// What to do with a last chunk shorter than chunk_tokens.
enum class PartialChunkPolicy : uint8_t { kDrop, kKeep };

struct ChunkHash {
  ChunkKey key;
  uint64_t fingerprint;
  uint32_t begin;       // index of the chunk's first token in the input
  uint32_t num_tokens;  // == chunk_tokens except for a kept partial tail
};

class ChunkHasher {
 public:
  // kInvalidArgument for chunk_tokens == 0 or > kMaxChunkTokens,
  // world_size == 0, rank >= world_size. Never any other error code.
  static StatusOr<ChunkHasher> Create(const HashNamespace& ns, uint32_t chunk_tokens,
                                      PartialChunkPolicy partial);

  uint32_t chunk_tokens() const { return chunk_tokens_; }
  PartialChunkPolicy partial_policy() const { return partial_; }
  // N in the format above.
  const ChunkKey& namespace_key() const { return namespace_key_; }

  // Clears *out, then appends one ChunkHash per chunk (full chunks, plus the
  // partial tail iff kKeep). Only the first 2^32-1 tokens are considered
  // (ChunkHash::begin is 32-bit); real prompts are far shorter. extras
  // (nullptr or empty: none) must pass ValidateKeyExtras.
  void Hash(std::span<const int32_t> tokens, std::vector<ChunkHash>* out,
            const KeyExtras* extras = nullptr) const;
  // Same, but stops after max_chunks chunks. Chunk i's key does not depend on
  // tokens after chunk i, so this equals a prefix of Hash()'s output.
  void HashPrefix(std::span<const int32_t> tokens, size_t max_chunks,
                  std::vector<ChunkHash>* out, const KeyExtras* extras = nullptr) const;

 private:
  ChunkHasher(uint32_t chunk_tokens, PartialChunkPolicy partial, ChunkKey ns_key)
      : chunk_tokens_(chunk_tokens), partial_(partial), namespace_key_(ns_key) {}

  uint32_t chunk_tokens_;
  PartialChunkPolicy partial_;
  ChunkKey namespace_key_;
};

namespace hash_internal {
// The null-remap rule of the format; exposed so tests can check it (no
// practical input hashes to zero).
ChunkKey RemapNullKey(ChunkKey key, uint64_t fingerprint);
// ns_bytes of the format.
std::string SerializeNamespace(const HashNamespace& ns, uint32_t chunk_tokens);
// S of the format: the chain's start for a non-null salt.
ChunkKey SaltedStart(const ChunkKey& namespace_key, const ChunkKey& salt);
}  // namespace hash_internal

}  // namespace kvtier
