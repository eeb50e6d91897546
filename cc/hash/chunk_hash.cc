#include "cc/hash/chunk_hash.h"

#include <xxhash.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>

namespace kvtier {
namespace {

// The format hashes tokens as little-endian uint32; on a little-endian host an
// int32 array already has exactly those bytes, so the hot loop feeds the
// caller's memory to XXH3 without a copy. A big-endian port must byte-swap
// through a stack buffer here instead.
static_assert(std::endian::native == std::endian::little,
              "chunk_hash.cc feeds int32 tokens to XXH3 as-is, which is only the "
              "little-endian canonical form on little-endian hosts");
static_assert(sizeof(int32_t) == 4);

void PutU32(std::string* s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

void PutString(std::string* s, const std::string& v) {
  PutU32(s, static_cast<uint32_t>(v.size()));
  s->append(v);
}

ChunkKey FromXxh128(XXH128_hash_t h) { return ChunkKey{h.low64, h.high64}; }

// The prev-key bytes of input_i: u64(lo) || u64(hi), little-endian.
void EncodePrev(const ChunkKey& prev, unsigned char out[16]) {
  std::memcpy(out, &prev.lo, 8);  // little-endian host (static_assert above)
  std::memcpy(out + 8, &prev.hi, 8);
}

void PutU64(unsigned char* out, uint64_t v) { std::memcpy(out, &v, 8); }  // little-endian host

// H of the format: XXH3-128 of bytes, null-remapped.
ChunkKey HashBytes(const void* data, size_t len) {
  const ChunkKey raw = FromXxh128(XXH3_128bits_withSeed(data, len, 0));
  return hash_internal::RemapNullKey(raw, XXH3_64bits_withSeed(data, len, kFingerprintSeed));
}

constexpr char kSaltTag[] = "KVTSALT";  // 7 bytes, no terminator hashed
constexpr char kSpanTag[] = "KVTSPAN";
constexpr size_t kTagBytes = 7;
static_assert(sizeof(kSaltTag) == kTagBytes + 1 && sizeof(kSpanTag) == kTagBytes + 1);

// prev for a chunk overlapped by spans[first..]: H("KVTSPAN" || prev || spans).
// Streams into XXH3 states on the stack, so hashing stays allocation-free.
ChunkKey MixSpans(const ChunkKey& prev, std::span<const KeySpan> spans, size_t first, size_t chunk_begin,
                  size_t chunk_end) {
  XXH3_state_t key_state;
  XXH3_state_t fp_state;
  XXH3_INITSTATE(&key_state);
  XXH3_INITSTATE(&fp_state);
  (void)XXH3_128bits_reset(&key_state);
  (void)XXH3_64bits_reset_withSeed(&fp_state, kFingerprintSeed);
  auto update = [&](const void* p, size_t n) {
    (void)XXH3_128bits_update(&key_state, p, n);
    (void)XXH3_64bits_update(&fp_state, p, n);
  };
  update(kSpanTag, kTagBytes);
  unsigned char prev_bytes[16];
  EncodePrev(prev, prev_bytes);
  update(prev_bytes, sizeof(prev_bytes));
  for (size_t j = first; j < spans.size() && spans[j].begin < chunk_end; ++j) {
    const KeySpan& s = spans[j];
    if (s.end <= chunk_begin) continue;
    unsigned char rec[24];
    std::memcpy(rec, &s.begin, 4);
    std::memcpy(rec + 4, &s.end, 4);
    PutU64(rec + 8, s.id.lo);
    PutU64(rec + 16, s.id.hi);
    update(rec, sizeof(rec));
  }
  return hash_internal::RemapNullKey(FromXxh128(XXH3_128bits_digest(&key_state)), XXH3_64bits_digest(&fp_state));
}

}  // namespace

ChunkKey IdentityKey(std::string_view bytes) { return HashBytes(bytes.data(), bytes.size()); }

Status ValidateKeyExtras(const KeyExtras* extras) {
  if (extras == nullptr) return Status::Ok();
  const auto& spans = extras->spans;
  for (size_t i = 0; i < spans.size(); ++i) {
    if (spans[i].begin >= spans[i].end) {
      return InvalidArgument("key extras: span " + std::to_string(i) + " is empty or reversed ([" +
                             std::to_string(spans[i].begin) + ", " + std::to_string(spans[i].end) + "))");
    }
    if (i > 0 && spans[i].begin < spans[i - 1].begin) {
      return InvalidArgument("key extras: spans must be sorted by begin; span " + std::to_string(i) +
                             " begins at " + std::to_string(spans[i].begin) + ", before span " +
                             std::to_string(i - 1) + " at " + std::to_string(spans[i - 1].begin));
    }
  }
  return Status::Ok();
}

namespace hash_internal {

ChunkKey SaltedStart(const ChunkKey& namespace_key, const ChunkKey& salt) {
  unsigned char in[kTagBytes + 32];
  std::memcpy(in, kSaltTag, kTagBytes);
  PutU64(in + kTagBytes, namespace_key.lo);
  PutU64(in + kTagBytes + 8, namespace_key.hi);
  PutU64(in + kTagBytes + 16, salt.lo);
  PutU64(in + kTagBytes + 24, salt.hi);
  return HashBytes(in, sizeof(in));
}

ChunkKey RemapNullKey(ChunkKey key, uint64_t fingerprint) {
  if (!key.IsNull()) return key;
  return ChunkKey{fingerprint, kNullKeyRemapHi};
}

std::string SerializeNamespace(const HashNamespace& ns, uint32_t chunk_tokens) {
  std::string s = "KVTNS";
  PutU32(&s, kChunkHashFormatVersion);
  PutString(&s, ns.model);
  PutString(&s, ns.dtype);
  PutString(&s, ns.layout);
  PutU32(&s, ns.rank);
  PutU32(&s, ns.world_size);
  PutU32(&s, chunk_tokens);
  return s;
}

}  // namespace hash_internal

StatusOr<ChunkHasher> ChunkHasher::Create(const HashNamespace& ns, uint32_t chunk_tokens,
                                          PartialChunkPolicy partial) {
  if (chunk_tokens == 0 || chunk_tokens > kMaxChunkTokens) {
    return InvalidArgument("chunk_tokens must be in [1, " + std::to_string(kMaxChunkTokens) +
                           "], got " + std::to_string(chunk_tokens));
  }
  if (ns.world_size == 0) return InvalidArgument("HashNamespace.world_size must be >= 1, got 0");
  if (ns.rank >= ns.world_size) {
    return InvalidArgument("HashNamespace.rank must be < world_size (" +
                           std::to_string(ns.world_size) + "), got " + std::to_string(ns.rank));
  }
  if (partial != PartialChunkPolicy::kDrop && partial != PartialChunkPolicy::kKeep) {
    return InvalidArgument("unknown PartialChunkPolicy " +
                           std::to_string(static_cast<unsigned>(partial)));
  }
  const std::string bytes = hash_internal::SerializeNamespace(ns, chunk_tokens);
  const ChunkKey raw = FromXxh128(XXH3_128bits_withSeed(bytes.data(), bytes.size(), 0));
  const uint64_t fp = XXH3_64bits_withSeed(bytes.data(), bytes.size(), kFingerprintSeed);
  return ChunkHasher(chunk_tokens, partial, hash_internal::RemapNullKey(raw, fp));
}

void ChunkHasher::Hash(std::span<const int32_t> tokens, std::vector<ChunkHash>* out,
                       const KeyExtras* extras) const {
  HashPrefix(tokens, std::numeric_limits<size_t>::max(), out, extras);
}

void ChunkHasher::HashPrefix(std::span<const int32_t> tokens, size_t max_chunks, std::vector<ChunkHash>* out,
                             const KeyExtras* extras) const {
  out->clear();
  const size_t n = std::min<size_t>(tokens.size(), std::numeric_limits<uint32_t>::max());
  const size_t c = chunk_tokens_;
  size_t chunks = n / c;
  const bool keep_tail = partial_ == PartialChunkPolicy::kKeep && n % c != 0;
  if (keep_tail) ++chunks;
  chunks = std::min(chunks, max_chunks);
  if (chunks == 0) return;
  out->reserve(chunks);

  // Streaming states on the stack: no allocation per chunk, and no copy of
  // the tokens into a contiguous prev||tokens buffer.
  XXH3_state_t key_state;
  XXH3_state_t fp_state;
  XXH3_INITSTATE(&key_state);
  XXH3_INITSTATE(&fp_state);

  ChunkKey prev = namespace_key_;
  std::span<const KeySpan> spans;
  if (extras != nullptr) {
    if (!extras->salt.IsNull()) prev = hash_internal::SaltedStart(namespace_key_, extras->salt);
    spans = extras->spans;
  }
  // Spans before first_span end at or before the current chunk: chunks only
  // move forward, so they can never overlap again.
  size_t first_span = 0;
  for (size_t i = 0; i < chunks; ++i) {
    const size_t begin = i * c;
    const size_t len = std::min(c, n - begin);
    while (first_span < spans.size() && spans[first_span].end <= begin) ++first_span;
    bool overlapped = false;
    for (size_t j = first_span; j < spans.size() && spans[j].begin < begin + len; ++j) {
      if (spans[j].end > begin) {
        overlapped = true;
        break;
      }
    }
    if (overlapped) prev = MixSpans(prev, spans, first_span, begin, begin + len);
    unsigned char prev_bytes[16];
    EncodePrev(prev, prev_bytes);
    const void* tok = tokens.data() + begin;
    const size_t tok_bytes = len * sizeof(int32_t);

    (void)XXH3_128bits_reset(&key_state);
    (void)XXH3_64bits_reset_withSeed(&fp_state, kFingerprintSeed);
    (void)XXH3_128bits_update(&key_state, prev_bytes, sizeof(prev_bytes));
    (void)XXH3_64bits_update(&fp_state, prev_bytes, sizeof(prev_bytes));
    (void)XXH3_128bits_update(&key_state, tok, tok_bytes);
    (void)XXH3_64bits_update(&fp_state, tok, tok_bytes);
    if (len < c) {
      unsigned char trailer[5];
      const uint32_t len32 = static_cast<uint32_t>(len);
      std::memcpy(trailer, &len32, 4);
      trailer[4] = kPartialTailTag;
      (void)XXH3_128bits_update(&key_state, trailer, sizeof(trailer));
      (void)XXH3_64bits_update(&fp_state, trailer, sizeof(trailer));
    }
    const uint64_t fp = XXH3_64bits_digest(&fp_state);
    const ChunkKey key = hash_internal::RemapNullKey(FromXxh128(XXH3_128bits_digest(&key_state)), fp);
    out->push_back(ChunkHash{key, fp, static_cast<uint32_t>(begin), static_cast<uint32_t>(len)});
    prev = key;
  }
}

}  // namespace kvtier
