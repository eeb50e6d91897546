#include "cc/engine/engine.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <random>
#include <stdexcept>
#include <thread>

#include <gtest/gtest.h>

#include "cc/common/thread_guard.h"

namespace kvtier {
namespace {

constexpr uint32_t kChunk = 16;         // tokens per chunk (small to keep tests fast)
constexpr size_t kBytesPerToken = 512;  // "KV" bytes per token
constexpr size_t kChunkBytes = kChunk * kBytesPerToken;

std::string TempDir(const char* tag) {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string dir = std::string(base ? base : "/var/tmp") + "/" + tag + "-" + std::to_string(::getpid()) + "-" +
                    std::to_string(std::random_device{}());
  std::filesystem::create_directories(dir);
  return dir;
}

EngineOptions Options(const std::string& disk_dir = "", size_t cpu_bytes = 4 << 20) {
  EngineOptions o;
  o.hash_namespace.model = "test-model";
  o.hash_namespace.dtype = "float16";
  o.chunk_tokens = kChunk;
  o.cpu.capacity_bytes = cpu_bytes;
  o.cpu.chunk_bytes = kChunkBytes;
  o.copy_threads = 2;
  if (!disk_dir.empty()) {
    o.disk.path = disk_dir;
    o.disk.capacity_bytes = 64 << 20;
  }
  return o;
}

std::vector<int32_t> Tokens(size_t n, int32_t first) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

// KV of a token is a pattern derived from the token id and its position.
std::byte Pattern(const std::vector<int32_t>& tokens, size_t pos, size_t byte) {
  return static_cast<std::byte>((tokens[pos] * 131 + pos * 7 + byte) & 0xff);
}

size_t BytesFor(uint32_t n) { return size_t{n} * kBytesPerToken; }

Engine::FillFn Filler(const std::vector<int32_t>& tokens) {
  return [&tokens](const ChunkHash& c, std::span<std::byte> dst) -> Status {
    if (dst.size() != BytesFor(c.num_tokens)) return Internal("wrong dst size");
    for (uint32_t i = 0; i < c.num_tokens; ++i) {
      for (size_t b = 0; b < kBytesPerToken; ++b) dst[i * kBytesPerToken + b] = Pattern(tokens, c.begin + i, b);
    }
    return Status();
  };
}

// Consumer that checks every byte and records which tokens it saw.
struct Checker {
  const std::vector<int32_t>& tokens;
  std::vector<bool> seen = std::vector<bool>(tokens.size(), false);
  size_t bad = 0;
  Engine::ConsumeFn Fn() {
    return [this](const ChunkHash& c, std::span<const std::byte> src) -> Status {
      if (src.size() != BytesFor(c.num_tokens)) return Internal("wrong src size");
      for (uint32_t i = 0; i < c.num_tokens; ++i) {
        seen[c.begin + i] = true;
        for (size_t b = 0; b < kBytesPerToken; ++b) bad += src[i * kBytesPerToken + b] != Pattern(tokens, c.begin + i, b);
      }
      return Status();
    };
  }
};

void StoreAndWait(Engine& e, const std::vector<int32_t>& tokens, size_t skip = 0, uint64_t layout = 7) {
  auto h = e.Store(tokens, skip, layout, BytesFor, Filler(tokens));
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  ASSERT_TRUE((*h)->Wait().ok());
}

TEST(EngineTest, StoreLookupRetrieveRoundTrip) {
  auto e = Engine::Create(Options());
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  auto tokens = Tokens(100, 1000);  // 6 full chunks + 4-token tail
  EXPECT_EQ((*e)->Lookup(tokens), 0u);
  StoreAndWait(**e, tokens);
  EXPECT_EQ((*e)->Lookup(tokens), 100u);
  // A longer prompt sharing the prefix hits the full chunks only (the old
  // tail chunk had 4 tokens, the new one is a full chunk with other keys).
  auto longer = Tokens(120, 1000);
  EXPECT_EQ((*e)->Lookup(longer), 96u);

  Checker check{tokens};
  auto n = (*e)->Retrieve(tokens, 0, 7, check.Fn());
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 100u);
  EXPECT_EQ(check.bad, 0u);
  EngineStats s = (*e)->Stats();
  EXPECT_EQ(s.chunks_stored, 7u);
  EXPECT_EQ(s.chunks_loaded_cpu, 7u);
  EXPECT_EQ(s.tokens_loaded, 100u);
}

// AcquirePrefix hands over leases: the data stays pinned (Clear cannot take
// it) until the caller drops them, and the prefix rule is Retrieve's.
TEST(EngineTest, AcquirePrefixHoldsChunksUntilReleased) {
  auto e = Engine::Create(Options());
  ASSERT_TRUE(e.ok());
  auto tokens = Tokens(100, 77);  // 6 full chunks + 4-token tail
  StoreAndWait(**e, tokens);
  {
    auto p = (*e)->AcquirePrefix(tokens, 32, 7);  // caller holds 0..31
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    EXPECT_EQ(p->valid_tokens, 100u);
    ASSERT_EQ(p->chunks.size(), 5u);
    ASSERT_EQ(p->leases.size(), 5u);
    EXPECT_EQ(p->chunks.front().begin, 32u);
    Checker check{tokens};
    auto consume = check.Fn();
    for (size_t i = 0; i < p->chunks.size(); ++i) ASSERT_TRUE(consume(p->chunks[i], p->leases[i].data()).ok());
    EXPECT_EQ(check.bad, 0u);
    (*e)->Clear();  // the leased chunks are pinned: they survive
    EXPECT_EQ(check.bad, 0u);
    for (size_t i = 0; i < p->chunks.size(); ++i) ASSERT_TRUE(consume(p->chunks[i], p->leases[i].data()).ok());
    EXPECT_EQ(check.bad, 0u);
    EXPECT_EQ((*e)->cpu_tier()->Stats().entries, 5u);  // chunks 0 and 1 were not leased
    // A wrong layout ends the prefix at once, as in Retrieve.
    auto wrong = (*e)->AcquirePrefix(tokens, 32, /*layout=*/8);
    ASSERT_TRUE(wrong.ok());
    EXPECT_EQ(wrong->valid_tokens, 32u);
    EXPECT_TRUE(wrong->leases.empty());
  }
  (*e)->Clear();  // released: now they go
  EXPECT_EQ((*e)->cpu_tier()->Stats().entries, 0u);
  EXPECT_EQ((*e)->Lookup(tokens), 0u);
}

TEST(EngineTest, ChangedTokenMissesFromThatChunkOn) {
  auto e = Engine::Create(Options());
  ASSERT_TRUE(e.ok());
  auto tokens = Tokens(64, 5);
  StoreAndWait(**e, tokens);
  auto other = tokens;
  other[40] += 1;  // chunk 2 (tokens 32..47) differs
  EXPECT_EQ((*e)->Lookup(other), 32u);
  Checker check{other};
  auto n = (*e)->Retrieve(other, 0, 7, check.Fn());
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 32u);
  EXPECT_EQ(check.bad, 0u);
}

TEST(EngineTest, SkipTokensAreNeitherStoredNorLoaded) {
  auto e = Engine::Create(Options());
  ASSERT_TRUE(e.ok());
  auto tokens = Tokens(64, 9);
  StoreAndWait(**e, tokens, /*skip=*/20);  // chunks starting before 20 are skipped: 0 and 1
  EXPECT_EQ((*e)->Stats().chunks_stored, 2u);
  EXPECT_EQ((*e)->Lookup(tokens), 0u);  // the prefix starts with a missing chunk
  Checker check{tokens};
  auto n = (*e)->Retrieve(tokens, 32, 7, check.Fn());  // caller already has 0..31
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 64u);
  EXPECT_FALSE(check.seen[0]);
  EXPECT_TRUE(check.seen[32]);
  EXPECT_EQ(check.bad, 0u);
}

TEST(EngineTest, LayoutMismatchIsAnErrorNotData) {
  auto e = Engine::Create(Options());
  ASSERT_TRUE(e.ok());
  auto tokens = Tokens(32, 1);
  StoreAndWait(**e, tokens, 0, /*layout=*/7);
  Checker check{tokens};
  auto n = (*e)->Retrieve(tokens, 0, /*layout=*/8, check.Fn());
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 0u);
  EXPECT_FALSE(check.seen[0]);
  EXPECT_EQ((*e)->Stats().load_errors, 1u);
}

// Request identity beyond tokens (issue 14 item 1): the same tokens under
// two salts (LoRA adapters, cache_salt) or two span ids (two images behind
// the same placeholder tokens) never share KV. Each identity's KV is a
// different byte pattern; every retrieve checks the bytes of its own.
TEST(EngineTest, KeyExtrasNeverShareKv) {
  const std::string dir = TempDir("kvt-extras");
  auto e = Engine::Create(Options(dir));
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  const auto tokens = Tokens(64, 4242);  // 4 chunks
  // Same tokens, a different "model state": bytes shifted by `variant`.
  auto fill_for = [&tokens](uint8_t variant) -> Engine::FillFn {
    return [&tokens, variant](const ChunkHash& c, std::span<std::byte> dst) -> Status {
      for (uint32_t i = 0; i < c.num_tokens; ++i) {
        for (size_t b = 0; b < kBytesPerToken; ++b) {
          dst[i * kBytesPerToken + b] = Pattern(tokens, c.begin + i, b) ^ static_cast<std::byte>(variant);
        }
      }
      return Status();
    };
  };
  struct Variant {
    KeyExtras extras;
    uint8_t pattern;
  };
  std::vector<Variant> variants(5);
  variants[0].pattern = 0;  // no extras at all
  variants[1].extras.salt = IdentityKey("lora:adapter-a");
  variants[1].pattern = 1;
  variants[2].extras.salt = IdentityKey("lora:adapter-b");
  variants[2].pattern = 2;
  variants[3].extras.spans = {{20, 40, IdentityKey("image-1")}};  // chunks 1 and 2
  variants[3].pattern = 3;
  variants[4].extras.spans = {{20, 40, IdentityKey("image-2")}};
  variants[4].pattern = 4;
  auto extras_of = [](const Variant& v) { return v.extras.empty() ? nullptr : &v.extras; };
  // Tokens whose bytes are variant v's; a chunk before the first span is the
  // same KV under every span id (and is shared, which is right).
  auto retrieve_checked = [&](const Variant& v, size_t* bad) -> size_t {
    const uint8_t expect_pattern = v.pattern;
    auto n = (*e)->Retrieve(
        tokens, 0, 7,
        [&](const ChunkHash& c, std::span<const std::byte> src) -> Status {
          // Chunk 0 ends before the image: span variants share it with the
          // extras-free variant 0, which stored it first.
          for (uint32_t i = 0; i < c.num_tokens; ++i) {
            for (size_t b = 0; b < kBytesPerToken; ++b) {
              const std::byte got = src[i * kBytesPerToken + b];
              const std::byte want = Pattern(tokens, c.begin + i, b) ^ static_cast<std::byte>(expect_pattern);
              const std::byte shared = Pattern(tokens, c.begin + i, b);
              *bad += got != want && !(c.begin == 0 && v.pattern >= 3 && got == shared);
            }
          }
          return Status();
        },
        extras_of(v));
    EXPECT_TRUE(n.ok()) << n.status().ToString();
    return n.ok() ? *n : 0;
  };
  for (size_t i = 0; i < variants.size(); ++i) {
    const Variant& v = variants[i];
    // Before this identity stored anything, nothing of it is promised beyond
    // what is identical by construction: chunk 0, before the image.
    const size_t expected_before = v.extras.spans.empty() ? 0 : kChunk;
    EXPECT_EQ((*e)->Lookup(tokens, extras_of(v)), expected_before) << "variant " << i;
    size_t bad = 0;
    EXPECT_EQ(retrieve_checked(v, &bad), expected_before) << "variant " << i;
    EXPECT_EQ(bad, 0u) << "variant " << i;
    auto h = (*e)->Store(tokens, 0, 7, BytesFor, fill_for(v.pattern), extras_of(v));
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    ASSERT_TRUE((*h)->Wait().ok());
    EXPECT_EQ((*e)->Lookup(tokens, extras_of(v)), 64u);
  }
  // Every identity reads its own bytes, from CPU and, after a restart, from disk.
  for (int round = 0; round < 2; ++round) {
    if (round == 1) {
      e->reset();  // releases the directory
      e = Engine::Create(Options(dir));
      ASSERT_TRUE(e.ok()) << e.status().ToString();
    }
    for (size_t i = 0; i < variants.size(); ++i) {
      size_t bad = 0;
      EXPECT_EQ(retrieve_checked(variants[i], &bad), 64u) << "round " << round << " variant " << i;
      EXPECT_EQ(bad, 0u) << "round " << round << " variant " << i;
    }
  }
  // Pin and Unpin address the identity's own chunks.
  EXPECT_EQ((*e)->Pin(tokens, &variants[1].extras), 4u);
  EXPECT_EQ((*e)->Unpin(tokens, &variants[1].extras), 4u);

  // Invalid extras: nothing is promised, stored or loaded.
  KeyExtras bad_extras;
  bad_extras.spans = {{30, 20, IdentityKey("x")}};
  EXPECT_EQ((*e)->Lookup(tokens, &bad_extras), 0u);
  EXPECT_EQ((*e)->Store(tokens, 0, 7, BytesFor, fill_for(9), &bad_extras).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ((*e)->StoreBuffers(tokens, 7, {}, &bad_extras).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*e)->Retrieve(tokens, 0, 7, [](const ChunkHash&, std::span<const std::byte>) { return Status(); },
                           &bad_extras)
                .status()
                .code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ((*e)->AcquirePrefix(tokens, 0, 7, &bad_extras).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*e)->Pin(tokens, &bad_extras), 0u);
  EXPECT_EQ((*e)->Unpin(tokens, &bad_extras), 0u);
  EXPECT_EQ((*e)->Prefetch(tokens, &bad_extras), 0u);
  e->reset();  // close before removing the directory
  std::filesystem::remove_all(dir);
}

// Issue 14 item 4: after a restart with another KV layout (the layout is
// not in the key), the old chunks used to stay catalogued: lookups promised
// them, loads failed, and Store skipped them as present, forever. Now the
// first retrieve drops every stale chunk of the prompt and the next store
// files the new layout's KV.
TEST(EngineTest, LayoutChangeIsAMissThatDropsTheStaleChunks) {
  const std::string dir = TempDir("kvt-layout");
  const auto tokens = Tokens(5 * kChunk, 606);
  for (const bool restart : {true, false}) {
    SCOPED_TRACE(restart ? "after a restart (disk)" : "same engine (CPU and disk)");
    std::filesystem::remove_all(dir);
    auto e = Engine::Create(Options(dir));
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    StoreAndWait(**e, tokens, 0, /*layout=*/7);
    (*e)->Flush();
    if (restart) {
      e->reset();
      e = Engine::Create(Options(dir));
      ASSERT_TRUE(e.ok()) << e.status().ToString();
    }
    ASSERT_EQ((*e)->Lookup(tokens), tokens.size());
    Checker miss{tokens};
    auto n = (*e)->Retrieve(tokens, 0, /*layout=*/8, miss.Fn());
    ASSERT_TRUE(n.ok()) << n.status().ToString();
    EXPECT_EQ(*n, 0u);
    EXPECT_FALSE(miss.seen[0]);
    EngineStats s = (*e)->Stats();
    EXPECT_EQ(s.layout_mismatches, 5u);
    EXPECT_EQ(s.load_errors, 1u);
    EXPECT_EQ((*e)->Lookup(tokens), 0u) << "stale chunks must not be promised";
    EXPECT_EQ(s.catalogue_entries, 0u);
    EXPECT_EQ(s.disk.entries, 0u);
    EXPECT_EQ(s.cpu.entries, 0u);
    // The new layout's KV is filed, not skipped as present.
    StoreAndWait(**e, tokens, 0, /*layout=*/8);
    s = (*e)->Stats();
    EXPECT_EQ(s.chunks_stored, restart ? 5u : 10u);
    EXPECT_EQ(s.chunks_skipped_present, 0u);
    Checker hit{tokens};
    n = (*e)->Retrieve(tokens, 0, /*layout=*/8, hit.Fn());
    ASSERT_TRUE(n.ok());
    EXPECT_EQ(*n, tokens.size());
    EXPECT_EQ(hit.bad, 0u);
  }
  std::filesystem::remove_all(dir);
}

TEST(EngineTest, BadInputGetsClearErrors) {
  EngineOptions bad = Options();
  bad.chunk_tokens = 0;
  EXPECT_EQ(Engine::Create(bad).status().code(), StatusCode::kInvalidArgument);
  bad = Options();
  bad.copy_threads = 0;
  EXPECT_EQ(Engine::Create(bad).status().code(), StatusCode::kInvalidArgument);

  EngineOptions deferred = Options();
  deferred.cpu.chunk_bytes = 0;
  auto e = Engine::Create(deferred);
  ASSERT_TRUE(e.ok());
  auto tokens = Tokens(32, 1);
  // Store before the chunk size is known.
  EXPECT_EQ((*e)->Store(tokens, 0, 7, BytesFor, Filler(tokens)).status().code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*e)->SetChunkBytes(kChunkBytes).ok());
  EXPECT_TRUE((*e)->SetChunkBytes(kChunkBytes).ok());  // idempotent
  EXPECT_EQ((*e)->SetChunkBytes(kChunkBytes * 2).code(), StatusCode::kFailedPrecondition);
  // A chunk larger than the CPU tier's chunk size.
  auto big = [](uint32_t n) { return size_t{n} * kBytesPerToken * 2; };
  EXPECT_EQ((*e)->Store(tokens, 0, 7, big, Filler(tokens)).status().code(), StatusCode::kInvalidArgument);
  // A fill that fails: the chunk is not catalogued and the handle reports it.
  auto h = (*e)->Store(tokens, 0, 7, BytesFor,
                       [](const ChunkHash&, std::span<std::byte>) { return DataLoss("source gone"); });
  ASSERT_TRUE(h.ok());
  EXPECT_EQ((*h)->Wait().code(), StatusCode::kDataLoss);
  EXPECT_EQ((*e)->Lookup(tokens), 0u);
  EXPECT_EQ((*e)->Stats().catalogue_entries, 0u);
}

TEST(EngineTest, StoreBuffersAndSizeMismatch) {
  auto e = Engine::Create(Options());
  ASSERT_TRUE(e.ok());
  auto tokens = Tokens(20, 3);  // one full chunk + 4-token tail
  std::vector<std::byte> a(BytesFor(16)), b(BytesFor(4));
  ASSERT_TRUE(Filler(tokens)(ChunkHash{{}, 0, 0, 16}, a).ok());
  ASSERT_TRUE(Filler(tokens)(ChunkHash{{}, 0, 16, 4}, b).ok());
  auto h = (*e)->StoreBuffers(tokens, 7, {std::span<const std::byte>(a), std::span<const std::byte>(b)});
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE((*h)->Wait().ok());
  EXPECT_EQ((*e)->Lookup(tokens), 20u);
  EXPECT_EQ((*e)->StoreBuffers(tokens, 7, {std::span<const std::byte>(a)}).status().code(),
            StatusCode::kInvalidArgument);
}

TEST(EngineTest, CpuEvictionDropsCatalogueEntries) {
  // Room for ~8 chunks: storing 40 chunks must evict, never fail or lie.
  auto e = Engine::Create(Options("", 8 * kChunkBytes));
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  for (int r = 0; r < 5; ++r) {
    auto tokens = Tokens(8 * kChunk, 10000 * (r + 1));
    StoreAndWait(**e, tokens);
  }
  EngineStats s = (*e)->Stats();
  EXPECT_GT(s.cpu.evictions, 0u);
  EXPECT_EQ(s.catalogue_entries, s.cpu.entries);  // I1: no entry without a copy
  // Whatever lookup promises, retrieve delivers, byte-exact.
  for (int r = 0; r < 5; ++r) {
    auto tokens = Tokens(8 * kChunk, 10000 * (r + 1));
    size_t promised = (*e)->Lookup(tokens);
    Checker check{tokens};
    auto n = (*e)->Retrieve(tokens, 0, 7, check.Fn());
    ASSERT_TRUE(n.ok());
    EXPECT_EQ(*n, promised);
    EXPECT_EQ(check.bad, 0u);
  }
}

TEST(EngineTest, WriteBehindThenRestartHitsFromDisk) {
  const std::string dir = TempDir("kvt-engine");
  auto tokens = Tokens(80, 77);  // 5 chunks
  {
    auto e = Engine::Create(Options(dir));
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    StoreAndWait(**e, tokens);
    (*e)->Flush();
    EngineStats s = (*e)->Stats();
    EXPECT_EQ(s.write_behind_written, 5u);
    EXPECT_EQ(s.disk.entries, 5u);
  }
  // A new engine on the same directory: the catalogue is rebuilt from disk.
  auto e = Engine::Create(Options(dir));
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_EQ((*e)->Lookup(tokens), 80u);
  Checker check{tokens};
  auto n = (*e)->Retrieve(tokens, 0, 7, check.Fn());
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 80u);
  EXPECT_EQ(check.bad, 0u);
  EngineStats s = (*e)->Stats();
  EXPECT_EQ(s.chunks_loaded_disk, 5u);
  // Promoted: a second retrieve is served from CPU.
  Checker again{tokens};
  ASSERT_TRUE((*e)->Retrieve(tokens, 0, 7, again.Fn()).ok());
  EXPECT_EQ((*e)->Stats().chunks_loaded_cpu, 5u);
  std::filesystem::remove_all(dir);
}

TEST(EngineTest, EvictedFromCpuStillServedFromDisk) {
  const std::string dir = TempDir("kvt-engine");
  auto e = Engine::Create(Options(dir, 8 * kChunkBytes));
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  std::vector<std::vector<int32_t>> prompts;
  for (int r = 0; r < 4; ++r) {
    prompts.push_back(Tokens(6 * kChunk, 5000 * (r + 1)));
    StoreAndWait(**e, prompts.back());
    (*e)->Flush();  // on disk before the next prompt pushes it out of CPU
  }
  EXPECT_GT((*e)->Stats().cpu.evictions, 0u);
  for (const auto& p : prompts) {
    EXPECT_EQ((*e)->Lookup(p), p.size());
    Checker check{p};
    auto n = (*e)->Retrieve(p, 0, 7, check.Fn());
    ASSERT_TRUE(n.ok());
    EXPECT_EQ(*n, p.size());
    EXPECT_EQ(check.bad, 0u);
  }
  EXPECT_GT((*e)->Stats().chunks_loaded_disk, 0u);
  std::filesystem::remove_all(dir);
}

TEST(EngineTest, PrefetchPromotesAndClearEmpties) {
  const std::string dir = TempDir("kvt-engine");
  auto tokens = Tokens(48, 123);
  {
    auto e = Engine::Create(Options(dir));
    ASSERT_TRUE(e.ok());
    StoreAndWait(**e, tokens);
    (*e)->Flush();
  }
  auto e = Engine::Create(Options(dir));
  ASSERT_TRUE(e.ok());
  EXPECT_EQ((*e)->Prefetch(tokens), 3u);
  for (int i = 0; i < 1000 && (*e)->Stats().cpu.entries < 3; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  EXPECT_EQ((*e)->Stats().cpu.entries, 3u);
  EXPECT_EQ((*e)->Pin(tokens), 3u);
  (*e)->Clear();
  EXPECT_EQ((*e)->Lookup(tokens), 48u);  // pinned chunks survive Clear
  EXPECT_EQ((*e)->Unpin(tokens), 3u);
  (*e)->Clear();
  EXPECT_EQ((*e)->Lookup(tokens), 0u);
  EXPECT_EQ((*e)->Stats().catalogue_entries, 0u);
  std::filesystem::remove_all(dir);
}

// Issue 14 item 2: a user pin taken while the chunk was disk-only pinned
// nothing in the CPU tier, so its Unpin must not release anything there. It
// used to drop the pin of the reader's lease mid-scatter; eviction then
// reused the slab under the reader.
TEST(EngineTest, UnpinDuringScatterKeepsTheReadersLease) {
  const std::string dir = TempDir("kvt-pin-lease");
  const auto prefix = Tokens(2 * kChunk, 31337);
  {
    auto e = Engine::Create(Options(dir));
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    StoreAndWait(**e, prefix);
  }  // on disk; the next engine starts with an empty CPU tier
  auto e = Engine::Create(Options(dir, 4 * kChunkBytes));
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  ASSERT_EQ((*e)->cpu_tier()->Stats().entries, 0u);
  ASSERT_EQ((*e)->Pin(prefix), 2u);  // disk-only: pins the disk copies

  size_t bad = 0, consumed = 0;
  int round = 0;
  auto n = (*e)->Retrieve(prefix, 0, 7, [&](const ChunkHash& c, std::span<const std::byte> src) -> Status {
    ++consumed;
    if (c.begin == 0) {
      // Mid-scatter: the user drops the pin, and stores push everything
      // evictable out of the 4-chunk CPU tier.
      EXPECT_EQ((*e)->Unpin(prefix), 2u);
      for (int r = 0; r < 4; ++r) {
        const auto other = Tokens(2 * kChunk, 900000 + 1000 * ++round);
        auto h = (*e)->Store(other, 0, 7, BytesFor, Filler(other));
        EXPECT_TRUE(h.ok());
        if (h.ok()) EXPECT_TRUE((*h)->Wait().ok());
        (*e)->Flush();
      }
    }
    for (uint32_t i = 0; i < c.num_tokens; ++i) {
      for (size_t b = 0; b < kBytesPerToken; ++b) bad += src[i * kBytesPerToken + b] != Pattern(prefix, c.begin + i, b);
    }
    return Status();
  });
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_GT((*e)->Stats().cpu.evictions, 0u) << "the test must force eviction";
  EXPECT_EQ(consumed, 2u);
  EXPECT_EQ(*n, 2 * kChunk);
  EXPECT_EQ(bad, 0u) << "bytes changed under the reader";
  e->reset();
  std::filesystem::remove_all(dir);
}

// Issue 14 item 7: a FillFn that throws used to reach std::terminate on the
// copy thread. Now the handle says kInternal and the engine keeps working.
TEST(EngineTest, ThrowingFillIsAnInternalErrorNotACrash) {
  auto e = Engine::Create(Options());
  ASSERT_TRUE(e.ok());
  const auto tokens = Tokens(3 * kChunk, 555);
  auto good = Filler(tokens);
  // Chunk 1 throws; chunks 0 and 2 are filled.
  auto h = (*e)->Store(tokens, 0, 7, BytesFor, [&](const ChunkHash& c, std::span<std::byte> dst) -> Status {
    if (c.begin == kChunk) throw std::runtime_error("binding blew up");
    return good(c, dst);
  });
  ASSERT_TRUE(h.ok());
  testing::internal::CaptureStderr();
  const Status s = (*h)->Wait();
  (*e)->Flush();
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(s.code(), StatusCode::kInternal) << s.ToString();
  EXPECT_NE(s.message().find("binding blew up"), std::string_view::npos) << s.ToString();
  EXPECT_EQ((*h)->chunks_stored(), 2u);
  EngineStats st = (*e)->Stats();
  EXPECT_EQ(st.internal_errors, 1u);
  EXPECT_EQ(st.store_errors, 1u);
  EXPECT_EQ(st.catalogue_entries, 2u);  // the failed chunk left no entry
  EXPECT_EQ((*e)->Lookup(tokens), kChunk);
  // The next store of the same tokens files the missing chunk; all is served.
  StoreAndWait(**e, tokens);
  EXPECT_EQ((*e)->Lookup(tokens), tokens.size());
  Checker check{tokens};
  auto n = (*e)->Retrieve(tokens, 0, 7, check.Fn());
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, tokens.size());
  EXPECT_EQ(check.bad, 0u);
}

// Issue 14 item 7: an exception on the write-behind thread used to end the
// process. Now the batch is given up (CPU-only, not held) and the thread goes on.
TEST(EngineTest, ThrowOnTheWriteBehindThreadIsCaught) {
  const std::string dir = TempDir("kvt-wb-throw");
  EngineOptions o = Options(dir, 8 * kChunkBytes);
  auto throwing = std::make_shared<std::atomic<bool>>(true);
  o.test_disk_write_results = [throwing](std::span<Status>) {
    if (throwing->load()) throw std::bad_alloc();
  };
  auto e = Engine::Create(o);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  const auto first = Tokens(3 * kChunk, 700);
  testing::internal::CaptureStderr();
  StoreAndWait(**e, first);
  (*e)->Flush();  // returns: the thread survived its batches
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("write-behind"), std::string::npos) << err;
  EngineStats st = (*e)->Stats();
  EXPECT_GE(st.internal_errors, 1u);
  EXPECT_EQ(st.write_behind_failed, 3u);
  EXPECT_EQ(st.write_behind_written, 0u);
  // Not held any more: other stores can push them out of the 8-chunk CPU tier.
  throwing->store(false);
  for (int r = 0; r < 4; ++r) {
    StoreAndWait(**e, Tokens(4 * kChunk, 10000 * (r + 1)));
    (*e)->Flush();
  }
  st = (*e)->Stats();
  EXPECT_EQ(st.write_behind_written, 16u);
  EXPECT_GT(st.cpu.evictions, 0u);
  // Whatever is still promised is served byte-exact (the thrown batch had
  // reached the disk; the catalogue says so).
  Checker check{first};
  const size_t promised = (*e)->Lookup(first);
  auto n = (*e)->Retrieve(first, 0, 7, check.Fn());
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, promised);
  EXPECT_EQ(check.bad, 0u);
  e->reset();
  std::filesystem::remove_all(dir);
}

// Issue 14 item 7: the engine's threads start through StartThread, so a
// refused thread is an error from Create, not std::terminate.
TEST(EngineTest, RefusedThreadFailsCreate) {
  EngineOptions o = Options();
  o.copy_threads = 3;
  thread_guard_internal::FailThreadStarts(/*skip=*/1, /*n=*/1);  // the second copy worker
  auto e = Engine::Create(o);
  EXPECT_EQ(e.status().code(), StatusCode::kResourceExhausted) << e.status().ToString();
  const std::string dir = TempDir("kvt-thread");
  thread_guard_internal::FailThreadStarts(/*skip=*/0, /*n=*/1);  // the write-behind thread
  e = Engine::Create(Options(dir));
  EXPECT_EQ(e.status().code(), StatusCode::kResourceExhausted) << e.status().ToString();
  EXPECT_NE(e.status().message().find("write-behind"), std::string_view::npos) << e.status().ToString();
  e = Engine::Create(Options(dir));  // nothing injected any more; the directory was released
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  e->reset();
  std::filesystem::remove_all(dir);
}

// Issue 14 item 8: a disk error that cannot succeed on retry (a chunk larger
// than a segment is kInvalidArgument) used to be retried five times with
// the chunk held in CPU, then dropped without a word. Now it fails at once,
// releases the chunk and logs one line; transient errors are still retried.
TEST(EngineTest, PermanentDiskErrorsAreNotRetried) {
  const std::string dir = TempDir("kvt-wb-perm");
  EngineOptions o = Options(dir);
  o.write_behind_backoff_ms = 1;
  auto code = std::make_shared<std::atomic<int>>(static_cast<int>(StatusCode::kInvalidArgument));
  auto transient_left = std::make_shared<std::atomic<int>>(2);  // failing disk writes before EIO clears
  o.test_disk_write_results = [code, transient_left](std::span<Status> results) {
    const auto c = static_cast<StatusCode>(code->load());
    if (c == StatusCode::kIoError && transient_left->fetch_sub(1) <= 0) return;
    for (Status& r : results) r = Status(c, "injected");
  };
  auto e = Engine::Create(o);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  testing::internal::CaptureStderr();
  StoreAndWait(**e, Tokens(3 * kChunk, 900));
  (*e)->Flush();
  StoreAndWait(**e, Tokens(3 * kChunk, 901));
  (*e)->Flush();
  const std::string err = testing::internal::GetCapturedStderr();
  EngineStats st = (*e)->Stats();
  EXPECT_EQ(st.write_behind_retries, 0u);
  EXPECT_EQ(st.write_behind_failed, 6u);
  size_t lines = 0;
  for (size_t pos = 0; (pos = err.find("cannot be written to the disk tier", pos)) != std::string::npos; ++pos) ++lines;
  EXPECT_EQ(lines, 1u) << err;
  EXPECT_NE(err.find(std::to_string(kChunkBytes) + " bytes"), std::string::npos) << err;
  (*e)->Clear();  // released at once, not held through backoffs
  EXPECT_EQ((*e)->cpu_tier()->Stats().entries, 0u);

  // A transient error is retried until it passes (the first two disk
  // writes fail with EIO, then the disk recovers).
  code->store(static_cast<int>(StatusCode::kIoError));
  const auto tokens = Tokens(2 * kChunk, 902);
  StoreAndWait(**e, tokens);
  (*e)->Flush();  // waits for the retries too: they stay queued
  st = (*e)->Stats();
  EXPECT_GE(st.write_behind_retries, 2u);
  EXPECT_EQ(st.write_behind_written, 2u);
  EXPECT_EQ(st.write_behind_failed, 6u);
  e->reset();
  std::filesystem::remove_all(dir);
}

// Issue 14 item 9: write_behind=false used to write nothing to disk. Now it
// writes through: the handle completes once the disk has every chunk.
TEST(EngineTest, WriteThroughFilesBeforeTheHandleCompletes) {
  const std::string dir = TempDir("kvt-wt");
  EngineOptions o = Options(dir);
  o.write_behind = false;
  auto fail = std::make_shared<std::atomic<bool>>(false);
  o.test_disk_write_results = [fail](std::span<Status> results) {
    if (fail->load()) for (Status& r : results) r = IoError("injected EIO");
  };
  auto e = Engine::Create(o);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  const auto tokens = Tokens(5 * kChunk + 3, 1200);
  StoreAndWait(**e, tokens);
  // No Flush: the handle's completion is the guarantee.
  std::vector<ChunkHash> chunks;
  (*e)->hasher().Hash(tokens, &chunks);
  ASSERT_EQ(chunks.size(), 6u);
  for (const ChunkHash& c : chunks) EXPECT_TRUE((*e)->disk_tier()->Contains(c.key)) << c.begin;
  EngineStats st = (*e)->Stats();
  EXPECT_EQ(st.write_behind_written, 6u);
  EXPECT_EQ(st.disk.entries, 6u);
  (*e)->Clear();  // not held after the write: CPU copies go, disk ones too
  EXPECT_EQ((*e)->cpu_tier()->Stats().entries, 0u);

  // A failed disk write: reported in the handle, the chunk stays in CPU.
  fail->store(true);
  const auto other = Tokens(2 * kChunk, 1300);
  auto h = (*e)->Store(other, 0, 7, BytesFor, Filler(other));
  ASSERT_TRUE(h.ok());
  const Status s = (*h)->Wait();
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  EXPECT_EQ((*h)->chunks_stored(), 2u);
  EXPECT_EQ((*e)->Lookup(other), other.size());
  EXPECT_EQ((*e)->Stats().write_behind_failed, 2u);
  Checker check{other};
  auto n = (*e)->Retrieve(other, 0, 7, check.Fn());
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, other.size());
  EXPECT_EQ(check.bad, 0u);
  e->reset();
  std::filesystem::remove_all(dir);
}

TEST(EngineTest, ConcurrentStoresAndRetrievesOfSharedPrefixes) {
  const std::string dir = TempDir("kvt-engine");
  auto e = Engine::Create(Options(dir, 24 * kChunkBytes));
  ASSERT_TRUE(e.ok());
  // Prompts share a system prefix and differ after it, like chat sessions.
  std::vector<std::vector<int32_t>> prompts;
  for (int p = 0; p < 8; ++p) {
    auto t = Tokens(5 * kChunk, 1);
    auto tail = Tokens(3 * kChunk + p, 100000 * (p + 1));
    t.insert(t.end(), tail.begin(), tail.end());
    prompts.push_back(t);
  }
  std::atomic<size_t> bad{0}, short_reads{0};
  std::vector<std::thread> threads;
  for (int th = 0; th < 4; ++th) {
    threads.emplace_back([&, th] {
      std::mt19937 rng(th);
      for (int it = 0; it < 60; ++it) {
        const auto& p = prompts[rng() % prompts.size()];
        if (rng() % 2) {
          auto h = (*e)->Store(p, 0, 7, BytesFor, Filler(p));
          if (h.ok()) (void)(*h)->Wait();
        } else {
          size_t promised = (*e)->Lookup(p);
          Checker check{p};
          auto n = (*e)->Retrieve(p, 0, 7, check.Fn());
          if (n.ok() && *n < promised) short_reads.fetch_add(1);  // evicted in between: allowed, counted
          bad.fetch_add(check.bad);
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  (*e)->Flush();
  EXPECT_EQ(bad.load(), 0u);
  EngineStats s = (*e)->Stats();
  EXPECT_GT(s.chunks_stored, 0u);
  EXPECT_EQ(s.store_errors, 0u) << "cpu evictions " << s.cpu.evictions << " wb dropped " << s.write_behind_dropped;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kvtier
