#include "cc/hash/chunk_hash.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include <atomic>
#include <cstdio>
#include <new>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <vector>

// Counts heap allocations so the test can show Hash() makes none per chunk.
static std::atomic<long> g_allocations{0};
void* operator new(size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);  // a count, guards nothing
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }

namespace kvtier {
namespace {

std::vector<int32_t> Tokens(size_t n, uint64_t seed) {
  std::vector<int32_t> t(n);
  uint64_t x = seed;
  for (auto& v : t) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    v = static_cast<int32_t>(x >> 32);  // full int32 range, negatives included
  }
  return t;
}

HashNamespace Ns() { return HashNamespace{"llama-3-8b", "float16", "nhd-v1", 0, 1}; }

ChunkHasher MakeHasher(const HashNamespace& ns, uint32_t c, PartialChunkPolicy p) {
  auto h = ChunkHasher::Create(ns, c, p);
  EXPECT_TRUE(h.ok()) << h.status().ToString();
  return *h;
}

std::vector<ChunkHash> HashAll(const ChunkHasher& h, const std::vector<int32_t>& t) {
  std::vector<ChunkHash> out;
  h.Hash(t, &out);
  return out;
}

// Independent one-shot implementation of the documented format, so the
// streaming code in chunk_hash.cc is checked against the header's text.
struct RefChunk {
  ChunkKey key;
  uint64_t fp;
};
RefChunk ReferenceChunk(const ChunkKey& prev, const int32_t* tok, size_t len, bool partial) {
  std::vector<unsigned char> in;
  auto put = [&](uint64_t v, int bytes) {
    for (int i = 0; i < bytes; ++i) in.push_back(static_cast<unsigned char>(v >> (8 * i)));
  };
  put(prev.lo, 8);
  put(prev.hi, 8);
  for (size_t i = 0; i < len; ++i) put(static_cast<uint32_t>(tok[i]), 4);
  if (partial) {
    put(len, 4);
    in.push_back(0xA5);
  }
  XXH128_hash_t k = XXH3_128bits_withSeed(in.data(), in.size(), 0);
  uint64_t fp = XXH3_64bits_withSeed(in.data(), in.size(), 0x662f72656974766bull);
  return {ChunkKey{k.low64, k.high64}, fp};
}

TEST(ChunkHasherTest, RejectsBadArguments) {
  const auto p = PartialChunkPolicy::kDrop;
  auto s = ChunkHasher::Create(Ns(), 0, p);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("chunk_tokens"), std::string_view::npos);
  EXPECT_EQ(ChunkHasher::Create(Ns(), (1u << 20) + 1, p).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(ChunkHasher::Create(Ns(), 1u << 20, p).ok());
  EXPECT_TRUE(ChunkHasher::Create(Ns(), 1, p).ok());

  HashNamespace ns = Ns();
  ns.world_size = 0;
  s = ChunkHasher::Create(ns, 256, p);
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("world_size"), std::string_view::npos);
  ns.world_size = 4;
  ns.rank = 4;
  s = ChunkHasher::Create(ns, 256, p);
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("rank"), std::string_view::npos);
  ns.rank = 3;
  EXPECT_TRUE(ChunkHasher::Create(ns, 256, p).ok());
  EXPECT_EQ(ChunkHasher::Create(Ns(), 256, static_cast<PartialChunkPolicy>(7)).status().code(),
            StatusCode::kInvalidArgument);
}

TEST(ChunkHasherTest, AccessorsAndChunkLayout) {
  ChunkHasher h = MakeHasher(Ns(), 16, PartialChunkPolicy::kKeep);
  EXPECT_EQ(h.chunk_tokens(), 16u);
  EXPECT_EQ(h.partial_policy(), PartialChunkPolicy::kKeep);
  EXPECT_FALSE(h.namespace_key().IsNull());
  auto out = HashAll(h, Tokens(50, 1));
  ASSERT_EQ(out.size(), 4u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(out[i].begin, i * 16);
    EXPECT_EQ(out[i].num_tokens, 16u);
  }
  EXPECT_EQ(out[3].begin, 48u);
  EXPECT_EQ(out[3].num_tokens, 2u);
}

TEST(ChunkHasherTest, MatchesDocumentedFormat) {
  const HashNamespace ns = Ns();
  ChunkHasher h = MakeHasher(ns, 8, PartialChunkPolicy::kKeep);
  const std::string nsb = hash_internal::SerializeNamespace(ns, 8);
  // "KVTNS" | ver | 3 strings with u32 length prefix | rank | world | chunk.
  EXPECT_EQ(nsb.size(), 5u + 4 + (4 + 10) + (4 + 7) + (4 + 6) + 4 + 4 + 4);
  EXPECT_EQ(nsb.substr(0, 5), "KVTNS");
  XXH128_hash_t nk = XXH3_128bits_withSeed(nsb.data(), nsb.size(), 0);
  EXPECT_EQ(h.namespace_key(), (ChunkKey{nk.low64, nk.high64}));

  const auto t = Tokens(21, 7);
  auto out = HashAll(h, t);
  ASSERT_EQ(out.size(), 3u);
  ChunkKey prev = h.namespace_key();
  for (size_t i = 0; i < out.size(); ++i) {
    const bool partial = out[i].num_tokens < 8;
    RefChunk r = ReferenceChunk(prev, t.data() + out[i].begin, out[i].num_tokens, partial);
    EXPECT_EQ(out[i].key, r.key) << i;
    EXPECT_EQ(out[i].fingerprint, r.fp) << i;
    EXPECT_NE(out[i].fingerprint, out[i].key.lo) << "fingerprint must not be the key's low half";
    prev = out[i].key;
  }
}

// Hard-coded after being computed once: any change of the format (byte order,
// serialization, seeds, chaining) fails here and must bump the version.
TEST(ChunkHasherTest, GoldenValues) {
  HashNamespace ns{"kvtier-golden", "float16", "layout-a", 1, 2};
  ChunkHasher h = MakeHasher(ns, 4, PartialChunkPolicy::kKeep);
  const std::vector<int32_t> t = {1, 2, 3, 4, 5, 6, 7, 8, -1, 2147483647, -2147483647 - 1};
  auto out = HashAll(h, t);
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(h.namespace_key().ToHex(), "54e70cdfcd0051ed57138ee23e8b8805");
  EXPECT_EQ(out[0].key.ToHex(), "6e07ca1d84d7b441a045e6b3687010c5");
  EXPECT_EQ(out[1].key.ToHex(), "ed71637599db5b7a86782a07c2c50798");
  EXPECT_EQ(out[2].key.ToHex(), "e74b575f899703a4f7837799b9dc2ba8");
  EXPECT_EQ(out[0].fingerprint, 11797862210380633307ull);
  EXPECT_EQ(out[2].fingerprint, 6008837018880772675ull);
}

TEST(ChunkHasherTest, OneChangedTokenChangesThatChunkAndAllLater) {
  ChunkHasher h = MakeHasher(Ns(), 32, PartialChunkPolicy::kKeep);
  const auto base = Tokens(32 * 10 + 5, 3);
  const auto a = HashAll(h, base);
  ASSERT_EQ(a.size(), 11u);
  for (size_t pos : {size_t{0}, size_t{31}, size_t{32}, size_t{32 * 5 + 17}, size_t{32 * 10 + 4}}) {
    auto t = base;
    t[pos] ^= 1;
    const auto b = HashAll(h, t);
    ASSERT_EQ(b.size(), a.size());
    const size_t changed = pos / 32;
    for (size_t i = 0; i < a.size(); ++i) {
      if (i < changed) {
        EXPECT_EQ(a[i].key, b[i].key) << "pos " << pos << " chunk " << i;
        EXPECT_EQ(a[i].fingerprint, b[i].fingerprint);
      } else {
        EXPECT_NE(a[i].key, b[i].key) << "pos " << pos << " chunk " << i;
        EXPECT_NE(a[i].fingerprint, b[i].fingerprint);
      }
    }
  }
}

TEST(ChunkHasherTest, SameChunkContentAtDifferentPositionsDiffers) {
  // Prefix chaining: identical token chunks get different keys.
  ChunkHasher h = MakeHasher(Ns(), 16, PartialChunkPolicy::kDrop);
  std::vector<int32_t> t(64, 42);
  auto out = HashAll(h, t);
  std::set<ChunkKey> keys;
  for (auto& c : out) keys.insert(c.key);
  EXPECT_EQ(keys.size(), 4u);
}

TEST(ChunkHasherTest, EachNamespaceFieldSeparates) {
  const auto t = Tokens(64, 5);
  std::vector<HashNamespace> variants;
  variants.push_back(Ns());
  HashNamespace v = Ns();
  v.model = "llama-3-8c";
  variants.push_back(v);
  v = Ns();
  v.dtype = "bfloat16";
  variants.push_back(v);
  v = Ns();
  v.layout = "hnd-v1";
  variants.push_back(v);
  v = Ns();
  v.world_size = 2;
  variants.push_back(v);
  v.rank = 1;
  variants.push_back(v);
  // Length prefixes: moving a byte between fields must change the key.
  v = Ns();
  v.model = "llama-3-8bf";
  v.dtype = "loat16";
  variants.push_back(v);
  std::set<ChunkKey> ns_keys, first_keys;
  for (const auto& ns : variants) {
    ChunkHasher h = MakeHasher(ns, 16, PartialChunkPolicy::kDrop);
    ns_keys.insert(h.namespace_key());
    first_keys.insert(HashAll(h, t)[0].key);
  }
  EXPECT_EQ(ns_keys.size(), variants.size());
  EXPECT_EQ(first_keys.size(), variants.size());
  // chunk_tokens is part of the namespace too.
  EXPECT_NE(MakeHasher(Ns(), 16, PartialChunkPolicy::kDrop).namespace_key(),
            MakeHasher(Ns(), 32, PartialChunkPolicy::kDrop).namespace_key());
  // Same namespace, separately created: same keys.
  EXPECT_EQ(HashAll(MakeHasher(Ns(), 16, PartialChunkPolicy::kDrop), t)[3].key,
            HashAll(MakeHasher(Ns(), 16, PartialChunkPolicy::kKeep), t)[3].key);
}

TEST(ChunkHasherTest, PartialTailPolicy) {
  const auto t = Tokens(16 * 3 + 15, 9);
  ChunkHasher drop = MakeHasher(Ns(), 16, PartialChunkPolicy::kDrop);
  ChunkHasher keep = MakeHasher(Ns(), 16, PartialChunkPolicy::kKeep);
  auto d = HashAll(drop, t);
  auto k = HashAll(keep, t);
  ASSERT_EQ(d.size(), 3u);
  ASSERT_EQ(k.size(), 4u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(d[i].key, k[i].key);
  EXPECT_EQ(k[3].num_tokens, 15u);
  // Exact multiple: no tail under either policy.
  std::vector<int32_t> exact(t.begin(), t.begin() + 48);
  EXPECT_EQ(HashAll(keep, exact).size(), 3u);
  // Shorter than one chunk.
  std::vector<int32_t> tiny(t.begin(), t.begin() + 5);
  EXPECT_EQ(HashAll(drop, tiny).size(), 0u);
  ASSERT_EQ(HashAll(keep, tiny).size(), 1u);
  EXPECT_EQ(HashAll(keep, tiny)[0].num_tokens, 5u);
  EXPECT_EQ(HashAll(keep, {}).size(), 0u);

  // A 15-token tail whose input looks like a full chunk ending in "15" must
  // not collide with that full chunk: the trailer makes the lengths differ.
  std::vector<int32_t> full(t.begin() + 48, t.begin() + 63);
  full.push_back(15);
  std::vector<int32_t> as_full(t.begin(), t.begin() + 48);
  as_full.insert(as_full.end(), full.begin(), full.end());
  auto f = HashAll(keep, as_full);
  ASSERT_EQ(f.size(), 4u);
  EXPECT_EQ(f[3].num_tokens, 16u);
  EXPECT_NE(f[3].key, k[3].key);
}

TEST(ChunkHasherTest, HashPrefixIsPrefixOfHash) {
  ChunkHasher h = MakeHasher(Ns(), 16, PartialChunkPolicy::kKeep);
  const auto t = Tokens(16 * 5 + 3, 11);
  auto all = HashAll(h, t);
  ASSERT_EQ(all.size(), 6u);
  std::vector<ChunkHash> out = all;  // must be cleared by HashPrefix
  for (size_t m : {size_t{0}, size_t{1}, size_t{5}, size_t{6}, size_t{100}}) {
    h.HashPrefix(t, m, &out);
    ASSERT_EQ(out.size(), std::min(m, all.size()));
    for (size_t i = 0; i < out.size(); ++i) {
      EXPECT_EQ(out[i].key, all[i].key);
      EXPECT_EQ(out[i].num_tokens, all[i].num_tokens);
    }
  }
}

TEST(ChunkHasherTest, NoHeapAllocationWhenOutputHasCapacity) {
  ChunkHasher h = MakeHasher(Ns(), 256, PartialChunkPolicy::kKeep);
  const auto t = Tokens(32 * 1024 + 100, 17);
  std::vector<ChunkHash> out;
  out.reserve(200);
  const long before = g_allocations.load(std::memory_order_relaxed);
  h.Hash(t, &out);
  const long after = g_allocations.load(std::memory_order_relaxed);
  EXPECT_EQ(out.size(), 129u);
  EXPECT_EQ(after - before, 0);
}

TEST(ChunkHasherTest, NullKeyRemap) {
  const ChunkKey k{5, 6};
  EXPECT_EQ(hash_internal::RemapNullKey(k, 99), k);
  const ChunkKey r = hash_internal::RemapNullKey(ChunkKey{}, 0x1234);
  EXPECT_FALSE(r.IsNull());
  EXPECT_EQ(r, (ChunkKey{0x1234, kNullKeyRemapHi}));
  EXPECT_FALSE(hash_internal::RemapNullKey(ChunkKey{}, 0).IsNull());
  EXPECT_NE(hash_internal::RemapNullKey(ChunkKey{}, 1), hash_internal::RemapNullKey(ChunkKey{}, 2));
}

// ---------------------------------------------------------------------------
// Key extras

KeyExtras Extras(ChunkKey salt, std::vector<KeySpan> spans) {
  KeyExtras e;
  e.salt = salt;
  e.spans = std::move(spans);
  return e;
}

// One-shot H of the format, independent of chunk_hash.cc's helpers.
ChunkKey RefH(const std::vector<unsigned char>& in) {
  XXH128_hash_t k = XXH3_128bits_withSeed(in.data(), in.size(), 0);
  ChunkKey key{k.low64, k.high64};
  if (key.IsNull()) key = ChunkKey{XXH3_64bits_withSeed(in.data(), in.size(), kFingerprintSeed), kNullKeyRemapHi};
  return key;
}

void PutLe(std::vector<unsigned char>* in, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) in->push_back(static_cast<unsigned char>(v >> (8 * i)));
}

TEST(KeyExtrasTest, NoneOrEmptyExtrasKeepTheKeys) {
  ChunkHasher h = MakeHasher(Ns(), 16, PartialChunkPolicy::kKeep);
  const auto t = Tokens(16 * 4 + 3, 21);
  const auto plain = HashAll(h, t);
  std::vector<ChunkHash> out;
  const KeyExtras empty;
  EXPECT_TRUE(empty.empty());
  h.Hash(t, &out, &empty);
  ASSERT_EQ(out.size(), plain.size());
  for (size_t i = 0; i < out.size(); ++i) {
    EXPECT_EQ(out[i].key, plain[i].key);
    EXPECT_EQ(out[i].fingerprint, plain[i].fingerprint);
  }
  // Spans entirely past the tokens overlap no chunk: keys unchanged too.
  const KeyExtras far = Extras({}, {{1000, 1010, IdentityKey("img")}});
  EXPECT_FALSE(far.empty());
  h.Hash(t, &out, &far);
  for (size_t i = 0; i < out.size(); ++i) EXPECT_EQ(out[i].key, plain[i].key);
}

TEST(KeyExtrasTest, SpanChangesKeysFromTheFirstOverlappedChunkOn) {
  ChunkHasher h = MakeHasher(Ns(), 16, PartialChunkPolicy::kKeep);
  const auto t = Tokens(16 * 6 + 5, 22);
  const auto plain = HashAll(h, t);
  ASSERT_EQ(plain.size(), 7u);
  // [begin, end) -> first chunk whose key must change.
  const std::vector<std::pair<std::pair<uint32_t, uint32_t>, size_t>> cases = {
      {{0, 1}, 0},    {{15, 17}, 0},  {{16, 32}, 1}, {{31, 33}, 1},
      {{40, 41}, 2},  {{47, 70}, 2},  {{96, 97}, 6}, {{100, 200}, 6},
  };
  for (const auto& [range, first] : cases) {
    const KeyExtras a = Extras({}, {{range.first, range.second, IdentityKey("image-a")}});
    const KeyExtras b = Extras({}, {{range.first, range.second, IdentityKey("image-b")}});
    std::vector<ChunkHash> ka, kb, ka2;
    h.Hash(t, &ka, &a);
    h.Hash(t, &kb, &b);
    h.Hash(t, &ka2, &a);
    ASSERT_EQ(ka.size(), plain.size());
    for (size_t i = 0; i < plain.size(); ++i) {
      EXPECT_EQ(ka[i].key, ka2[i].key) << "deterministic";
      if (i < first) {
        EXPECT_EQ(ka[i].key, plain[i].key) << range.first << "," << range.second << " chunk " << i;
        EXPECT_EQ(ka[i].fingerprint, plain[i].fingerprint);
      } else {
        EXPECT_NE(ka[i].key, plain[i].key) << range.first << "," << range.second << " chunk " << i;
        EXPECT_NE(ka[i].key, kb[i].key) << "two images, same placeholder tokens: chunk " << i;
        EXPECT_NE(ka[i].fingerprint, plain[i].fingerprint);
      }
    }
  }
  // The span's position is part of the identity, not only its id.
  std::vector<ChunkHash> p1, p2;
  const KeyExtras at1 = Extras({}, {{16, 20, IdentityKey("x")}});
  const KeyExtras at2 = Extras({}, {{17, 21, IdentityKey("x")}});
  h.Hash(t, &p1, &at1);
  h.Hash(t, &p2, &at2);
  EXPECT_NE(p1[1].key, p2[1].key);
}

TEST(KeyExtrasTest, SaltChangesEveryKey) {
  ChunkHasher h = MakeHasher(Ns(), 16, PartialChunkPolicy::kKeep);
  const auto t = Tokens(16 * 3 + 1, 23);
  const auto plain = HashAll(h, t);
  const KeyExtras s1 = Extras(IdentityKey("lora:adapter-1"), {});
  const KeyExtras s2 = Extras(IdentityKey("lora:adapter-2"), {});
  std::vector<ChunkHash> k1, k2, k1b;
  h.Hash(t, &k1, &s1);
  h.Hash(t, &k2, &s2);
  h.Hash(t, &k1b, &s1);
  ASSERT_EQ(k1.size(), plain.size());
  for (size_t i = 0; i < plain.size(); ++i) {
    EXPECT_NE(k1[i].key, plain[i].key) << i;
    EXPECT_NE(k1[i].key, k2[i].key) << i;
    EXPECT_NE(k1[i].fingerprint, plain[i].fingerprint) << i;
    EXPECT_EQ(k1[i].key, k1b[i].key) << i;
    EXPECT_EQ(k1[i].fingerprint, k1b[i].fingerprint) << i;
  }
  // Salt and span compose: each one alone differs from both together.
  const KeyExtras both = Extras(IdentityKey("lora:adapter-1"), {{0, 4, IdentityKey("img")}});
  const KeyExtras span_only = Extras({}, {{0, 4, IdentityKey("img")}});
  std::vector<ChunkHash> kb, ks;
  h.Hash(t, &kb, &both);
  h.Hash(t, &ks, &span_only);
  EXPECT_NE(kb[0].key, k1[0].key);
  EXPECT_NE(kb[0].key, ks[0].key);
}

TEST(KeyExtrasTest, MatchesDocumentedFormat) {
  ChunkHasher h = MakeHasher(Ns(), 8, PartialChunkPolicy::kKeep);
  const auto t = Tokens(8 * 4 + 3, 24);
  const ChunkKey salt = IdentityKey("cache_salt:abc");
  // Span 0 crosses the chunk 0/1 boundary; span 1 overlaps span 0 and
  // chunk 1; span 2 is inside chunk 3; nothing touches chunk 2 or the tail.
  const std::vector<KeySpan> spans = {
      {6, 10, IdentityKey("a")}, {7, 9, IdentityKey("b")}, {25, 27, IdentityKey("c")}};
  const KeyExtras extras = Extras(salt, spans);
  std::vector<ChunkHash> out;
  h.Hash(t, &out, &extras);
  ASSERT_EQ(out.size(), 5u);

  std::vector<unsigned char> in = {'K', 'V', 'T', 'S', 'A', 'L', 'T'};
  PutLe(&in, h.namespace_key().lo, 8);
  PutLe(&in, h.namespace_key().hi, 8);
  PutLe(&in, salt.lo, 8);
  PutLe(&in, salt.hi, 8);
  ChunkKey prev = RefH(in);
  EXPECT_EQ(prev, hash_internal::SaltedStart(h.namespace_key(), salt));
  for (size_t i = 0; i < out.size(); ++i) {
    const uint32_t b = out[i].begin, e = b + out[i].num_tokens;
    std::vector<unsigned char> mix = {'K', 'V', 'T', 'S', 'P', 'A', 'N'};
    PutLe(&mix, prev.lo, 8);
    PutLe(&mix, prev.hi, 8);
    bool any = false;
    for (const KeySpan& s : spans) {
      if (s.begin < e && s.end > b) {
        any = true;
        PutLe(&mix, s.begin, 4);
        PutLe(&mix, s.end, 4);
        PutLe(&mix, s.id.lo, 8);
        PutLe(&mix, s.id.hi, 8);
      }
    }
    EXPECT_EQ(any, i == 0 || i == 1 || i == 3) << i;
    if (any) prev = RefH(mix);
    RefChunk r = ReferenceChunk(prev, t.data() + b, out[i].num_tokens, out[i].num_tokens < 8);
    EXPECT_EQ(out[i].key, r.key) << i;
    EXPECT_EQ(out[i].fingerprint, r.fp) << i;
    prev = out[i].key;
  }
  const std::string abc = "abc";
  EXPECT_EQ(IdentityKey(abc), RefH(std::vector<unsigned char>(abc.begin(), abc.end())));
}

// Computed once; a change means keys with extras changed format.
TEST(KeyExtrasTest, GoldenValues) {
  HashNamespace ns{"kvtier-golden", "float16", "layout-a", 1, 2};
  ChunkHasher h = MakeHasher(ns, 4, PartialChunkPolicy::kKeep);
  const std::vector<int32_t> t = {1, 2, 3, 4, 5, 6, 7, 8, -1, 2147483647, -2147483647 - 1};
  const KeyExtras extras = Extras(IdentityKey("salt"), {{3, 6, IdentityKey("image")}});
  std::vector<ChunkHash> out;
  h.Hash(t, &out, &extras);
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(IdentityKey("image").ToHex(), "e9c754bdc1a6ca9114ecfbe942ed47df");
  EXPECT_EQ(out[0].key.ToHex(), "e8cc19fc1e25057fff70d9863c53b068");
  EXPECT_EQ(out[2].key.ToHex(), "58d4e4fba97b0d7d60095ad7172adb52");
}

TEST(KeyExtrasTest, PrefixesAgree) {
  // A prefix of the tokens (or HashPrefix) gives a prefix of the keys, also
  // with spans reaching past the prefix: stores of a computed prefix and
  // lookups of the whole prompt must meet.
  ChunkHasher h = MakeHasher(Ns(), 16, PartialChunkPolicy::kKeep);
  const auto t = Tokens(16 * 6, 25);
  const KeyExtras extras = Extras(IdentityKey("s"), {{20, 40, IdentityKey("a")}, {60, 90, IdentityKey("b")}});
  std::vector<ChunkHash> all, part;
  h.Hash(t, &all, &extras);
  for (size_t m : {size_t{1}, size_t{3}, size_t{4}, size_t{6}}) {
    h.HashPrefix(t, m, &part, &extras);
    ASSERT_EQ(part.size(), m);
    for (size_t i = 0; i < m; ++i) EXPECT_EQ(part[i].key, all[i].key) << m << " " << i;
    std::vector<int32_t> prefix(t.begin(), t.begin() + static_cast<ptrdiff_t>(m * 16));
    h.Hash(prefix, &part, &extras);
    ASSERT_EQ(part.size(), m);
    for (size_t i = 0; i < m; ++i) EXPECT_EQ(part[i].key, all[i].key) << m << " " << i;
  }
}

TEST(KeyExtrasTest, Validation) {
  EXPECT_TRUE(ValidateKeyExtras(nullptr).ok());
  KeyExtras e;
  EXPECT_TRUE(ValidateKeyExtras(&e).ok());
  const ChunkKey id = IdentityKey("x");
  e.spans = {{0, 4, id}, {2, 8, id}, {2, 3, id}, {100, 101, id}};  // overlapping, ties: fine
  EXPECT_TRUE(ValidateKeyExtras(&e).ok());
  e.spans = {{4, 4, id}};
  Status s = ValidateKeyExtras(&e);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("span 0"), std::string_view::npos) << s.ToString();
  e.spans = {{0, 2, id}, {5, 4, id}};
  s = ValidateKeyExtras(&e);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("span 1"), std::string_view::npos) << s.ToString();
  e.spans = {{8, 10, id}, {4, 6, id}};
  s = ValidateKeyExtras(&e);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("sorted"), std::string_view::npos) << s.ToString();
}

TEST(KeyExtrasTest, IdentityKeyIsNeverNullAndSeparates) {
  std::set<ChunkKey> keys;
  for (const char* s : {"", "a", "b", "ab", "lora:1", "lora:2"}) {
    const ChunkKey k = IdentityKey(s);
    EXPECT_FALSE(k.IsNull());
    keys.insert(k);
  }
  EXPECT_EQ(keys.size(), 6u);
  EXPECT_EQ(IdentityKey(std::string("a\0b", 3)), IdentityKey(std::string("a\0b", 3)));
  EXPECT_NE(IdentityKey(std::string("a\0b", 3)), IdentityKey("a"));
}

TEST(KeyExtrasTest, NoHeapAllocationWithExtras) {
  ChunkHasher h = MakeHasher(Ns(), 256, PartialChunkPolicy::kKeep);
  const auto t = Tokens(32 * 1024, 26);
  const KeyExtras extras = Extras(IdentityKey("s"), {{100, 700, IdentityKey("a")}, {5000, 9000, IdentityKey("b")}});
  std::vector<ChunkHash> out;
  out.reserve(200);
  const long before = g_allocations.load(std::memory_order_relaxed);
  h.Hash(t, &out, &extras);
  const long after = g_allocations.load(std::memory_order_relaxed);
  EXPECT_EQ(out.size(), 128u);
  EXPECT_EQ(after - before, 0);
}

// Cross-process: the child is this same binary, exec'ed fresh (new address
// space, new ASLR layout, new heap), printing its keys on stdout.
constexpr char kChildEnv[] = "KVTIER_CHUNK_HASH_CHILD";

std::vector<std::string> KeysAsLines() {
  HashNamespace ns{"cross-process-model", "float8_e4m3", "layout-x", 3, 8};
  ChunkHasher h = MakeHasher(ns, 64, PartialChunkPolicy::kKeep);
  std::vector<std::string> lines;
  for (const auto& c : HashAll(h, Tokens(64 * 40 + 7, 2024))) {
    char fp[17];
    std::snprintf(fp, sizeof(fp), "%016llx", static_cast<unsigned long long>(c.fingerprint));
    lines.push_back(c.key.ToHex() + ":" + fp);
  }
  return lines;
}

TEST(ChunkHasherChild, PrintKeys) {
  if (std::getenv(kChildEnv) == nullptr) GTEST_SKIP() << "only runs as the cross-process child";
  for (const auto& l : KeysAsLines()) std::printf("KEY %s\n", l.c_str());
  std::fflush(stdout);
}

TEST(ChunkHasherTest, IdenticalKeysAcrossProcesses) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    dup2(fds[1], STDOUT_FILENO);
    close(fds[0]);
    close(fds[1]);
    setenv(kChildEnv, "1", 1);
    execl("/proc/self/exe", "chunk_hash_test", "--gtest_filter=ChunkHasherChild.PrintKeys",
          static_cast<char*>(nullptr));
    _exit(127);
  }
  close(fds[1]);
  std::string text;
  char buf[4096];
  ssize_t r;
  while ((r = read(fds[0], buf, sizeof(buf))) > 0) text.append(buf, static_cast<size_t>(r));
  close(fds[0]);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << text;

  std::vector<std::string> child;
  size_t pos = 0;
  while ((pos = text.find("KEY ", pos)) != std::string::npos) {
    size_t end = text.find('\n', pos);
    child.push_back(text.substr(pos + 4, end - pos - 4));
    pos = end;
  }
  const auto mine = KeysAsLines();
  ASSERT_EQ(mine.size(), 41u);
  EXPECT_EQ(child, mine);
}

}  // namespace
}  // namespace kvtier
