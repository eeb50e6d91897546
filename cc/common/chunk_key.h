// ChunkKey: the 128-bit identity of one chunk of KV (see cc/hash for how it
// is derived from tokens). Plain data, trivially copyable, stable layout: it
// is written into shared memory (cc/index) and into disk records (cc/tiers).
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>

namespace kvtier {

struct ChunkKey {
  uint64_t lo = 0;
  uint64_t hi = 0;

  friend bool operator==(const ChunkKey& a, const ChunkKey& b) { return a.lo == b.lo && a.hi == b.hi; }
  friend bool operator!=(const ChunkKey& a, const ChunkKey& b) { return !(a == b); }
  friend bool operator<(const ChunkKey& a, const ChunkKey& b) {
    return a.hi != b.hi ? a.hi < b.hi : a.lo < b.lo;
  }
  // All-zero is reserved as "no key" (the empty slot marker in the index);
  // the hash maps the one input that would produce it elsewhere.
  bool IsNull() const { return lo == 0 && hi == 0; }

  std::string ToHex() const {
    char buf[33];
    std::snprintf(buf, sizeof(buf), "%016llx%016llx", static_cast<unsigned long long>(hi),
                  static_cast<unsigned long long>(lo));
    return buf;
  }
};
static_assert(sizeof(ChunkKey) == 16, "ChunkKey is stored verbatim in shared memory and on disk");

// Mixes both halves (a multiply-xorshift finaliser): real keys are XXH3
// output, but tests and tools build structured keys, and `lo ^ hi * C` sends
// families like {i * C + 1, i} to one bucket.
struct ChunkKeyHash {
  size_t operator()(const ChunkKey& k) const noexcept {
    uint64_t x = k.lo * 0x9E3779B97F4A7C15ull + k.hi;
    x ^= x >> 32;
    x *= 0xD6E8FEB86659FD93ull;
    x ^= x >> 29;
    return static_cast<size_t>(x);
  }
};

}  // namespace kvtier
