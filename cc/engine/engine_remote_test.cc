// The engine's remote tier against real redis-server processes (and a real
// 3-master Redis Cluster): two engines -- two instances with their own CPU
// tiers -- share KV through Redis, and every fault the remote can have is a
// miss, never wrong KV and never an error surfaced to the caller.
#include <gtest/gtest.h>

#include <chrono>
#include <numeric>
#include <random>
#include <thread>

#include "cc/engine/catalogue_view.h"
#include "cc/engine/engine.h"
#include "cc/tiers/remote/remote_record.h"
#include "cc/tiers/remote/redis_test_server.h"

namespace kvtier {
namespace {

using remote::testing::RedisCluster;
using remote::testing::RedisServer;
using namespace std::chrono_literals;

constexpr uint32_t kChunk = 16;
constexpr size_t kBytesPerToken = 256;
constexpr size_t kChunkBytes = kChunk * kBytesPerToken;
constexpr uint64_t kLayout = 7;

EngineOptions Options(const std::string& url, size_t queue = 256) {
  EngineOptions o;
  o.hash_namespace.model = "remote-test";
  o.hash_namespace.dtype = "float16";
  o.chunk_tokens = kChunk;
  o.cpu.capacity_bytes = 4 << 20;
  o.cpu.chunk_bytes = kChunkBytes;
  o.copy_threads = 2;
  o.remote.url = url;
  o.remote.timeout = 500ms;
  o.remote.queue = queue;
  return o;
}

std::unique_ptr<Engine> Make(const EngineOptions& o) {
  auto e = Engine::Create(o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return e.ok() ? std::move(*e) : nullptr;
}

std::vector<int32_t> Tokens(size_t n, int32_t first) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

std::byte Pattern(const std::vector<int32_t>& t, size_t pos, size_t b) {
  return static_cast<std::byte>((t[pos] * 131 + pos * 7 + b) & 0xff);
}

void Store(Engine& e, const std::vector<int32_t>& t) {
  auto h = e.Store(
      t, 0, kLayout, [](uint32_t n) { return size_t{n} * kBytesPerToken; },
      [&t](const ChunkHash& c, std::span<std::byte> dst) {
        for (uint32_t i = 0; i < c.num_tokens; ++i)
          for (size_t b = 0; b < kBytesPerToken; ++b) dst[i * kBytesPerToken + b] = Pattern(t, c.begin + i, b);
        return Status();
      });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE((*h)->Wait().ok());
  e.FlushRemote();
}

// Retrieves and counts bytes that differ from the pattern (must be 0).
size_t RetrieveChecked(Engine& e, const std::vector<int32_t>& t, size_t* bad) {
  *bad = 0;
  auto n = e.Retrieve(t, 0, kLayout, [&](const ChunkHash& c, std::span<const std::byte> src) {
    for (uint32_t i = 0; i < c.num_tokens; ++i)
      for (size_t b = 0; b < kBytesPerToken; ++b) *bad += src[i * kBytesPerToken + b] != Pattern(t, c.begin + i, b);
    return Status();
  });
  return n.ok() ? *n : 0;
}

std::string Url(const RedisServer& s) { return "redis://" + s.addr(); }

TEST(EngineRemote, SecondInstanceServesWhatTheFirstStored) {
  auto server = RedisServer::Start({});
  ASSERT_NE(server, nullptr);
  auto a = Make(Options(Url(*server)));
  auto b = Make(Options(Url(*server)));
  const auto t = Tokens(5 * kChunk + 3, 100);
  Store(*a, t);
  EXPECT_EQ(a->Stats().remote.uploads, 6u);  // 5 chunks + the partial tail
  EXPECT_EQ(a->Stats().cpu.gets, 0u);  // uploads read the CPU tier uncounted

  EXPECT_EQ(b->Lookup(t), 0u);  // nothing local
  EXPECT_EQ(b->LookupRemote(t), t.size());
  EXPECT_EQ(b->FetchRemote(t, kLayout), t.size());
  EXPECT_EQ(b->Lookup(t), t.size());  // now local
  size_t bad = 0;
  EXPECT_EQ(RetrieveChecked(*b, t, &bad), t.size());
  EXPECT_EQ(bad, 0u);
  const auto s = b->Stats();
  EXPECT_EQ(s.chunks_fetched_remote, 6u);
  EXPECT_EQ(s.remote.fetch_hits, 6u);
  EXPECT_TRUE(s.remote.connected);

  // SET NX: the second instance uploading the same chunks overwrites nothing.
  Store(*b, t);  // all present locally: nothing is stored again
  auto c = Make(Options(Url(*server)));
  Store(*c, t);
  EXPECT_EQ(c->Stats().remote.uploads, 0u);
  EXPECT_EQ(c->Stats().remote.upload_present, 6u);

  // A prefix that diverges: the shared chunks only.
  auto u = Tokens(3 * kChunk, 100);
  u.push_back(99999);
  auto d = Make(Options(Url(*server)));
  EXPECT_EQ(d->LookupRemote(u), 3 * kChunk);
  // Another layout is a miss, counted, nothing loaded.
  EXPECT_EQ(d->FetchRemote(t, kLayout + 1), 0u);
  EXPECT_EQ(d->Stats().remote.layout_mismatches, 6u);  // every chunk checked, none taken
  EXPECT_EQ(d->Lookup(t), 0u);
}

TEST(EngineRemote, NamespacesDoNotMix) {
  auto server = RedisServer::Start({});
  ASSERT_NE(server, nullptr);
  auto a = Make(Options(Url(*server)));
  EngineOptions other = Options(Url(*server));
  other.hash_namespace.rank = 1;
  other.hash_namespace.world_size = 2;
  auto b = Make(other);
  const auto t = Tokens(4 * kChunk, 5);
  Store(*a, t);
  EXPECT_EQ(b->LookupRemote(t), 0u);
  EXPECT_EQ(b->FetchRemote(t, kLayout), 0u);
}

TEST(EngineRemote, CorruptTruncatedForeignOrHugeValuesAreMisses) {
  auto server = RedisServer::Start({});
  ASSERT_NE(server, nullptr);
  auto a = Make(Options(Url(*server)));
  const auto t = Tokens(4 * kChunk, 300);
  Store(*a, t);
  // Damage chunk 1's value straight in Redis, four ways, one per run.
  std::vector<ChunkHash> chunks;
  a->hasher().Hash(t, &chunks);
  const uint64_t ns = remote::NamespaceDigest(Options("").hash_namespace, kChunk);
  const std::string key = remote::RemoteKey(ns, chunks[1].key);
  const std::string good = server->Cli({"--no-raw", "strlen", key});
  ASSERT_EQ(good, "(integer) " + std::to_string(sizeof(remote::RemoteRecordHeader) + kChunkBytes));
  const std::vector<std::vector<std::string>> damage = {
      {"setrange", key, "200", "XXXX"},                    // payload bytes flipped
      {"set", key, "short"},                               // truncated to nothing useful
      // 100 KB past the end (an argv string is at most 128 KiB).
      {"setrange", key, std::to_string(80 + kChunkBytes), std::string(100000, 'z')},
      {"set", key, std::string(sizeof(remote::RemoteRecordHeader) + kChunkBytes, '0')},  // right size, garbage
  };
  for (size_t k = 0; k < damage.size(); ++k) {
    const auto& d = damage[k];
    SCOPED_TRACE("damage " + std::to_string(k) + ": " + d[0]);
    // Restore (a stores the prompt again; SET NX refills the deleted key
    // only), then damage.
    server->Cli({"del", key});
    a->Clear();
    Store(*a, t);
    ASSERT_EQ(server->Cli({"--no-raw", "strlen", key}), good);
    server->Cli(d);
    auto b = Make(Options(Url(*server)));
    EXPECT_EQ(b->FetchRemote(t, kLayout), kChunk) << "only chunk 0 precedes the damage";
    size_t bad = 0;
    EXPECT_EQ(RetrieveChecked(*b, t, &bad), kChunk);
    EXPECT_EQ(bad, 0u);
    EXPECT_EQ(b->Stats().remote.corrupt, 1u);
  }
}

TEST(EngineRemote, DownAtStartThenBack) {
  const int port = remote::testing::PickFreePort();
  auto e = Make(Options("redis://127.0.0.1:" + std::to_string(port)));
  ASSERT_NE(e, nullptr);  // starts without its remote
  const auto t = Tokens(3 * kChunk, 1);
  Store(*e, t);  // local tiers serve; uploads fail and are counted
  EXPECT_EQ(e->Lookup(t), t.size());
  EXPECT_EQ(e->LookupRemote(t), t.size());  // the local prefix covers it all
  auto other = Make(Options("redis://127.0.0.1:" + std::to_string(port)));
  EXPECT_EQ(other->LookupRemote(t), 0u);
  EXPECT_GE(other->Stats().remote.errors, 1u);
  EXPECT_GE(e->Stats().remote.upload_failed, 1u);

  auto server = RedisServer::Start({}, port);
  ASSERT_NE(server, nullptr);
  // The client waits out its reconnect backoff (100 ms doubling, jittered):
  // poll until it is back, bounded.
  const auto give_up = std::chrono::steady_clock::now() + 30s;
  const auto u = Tokens(2 * kChunk, 5000);
  while (e->Stats().remote.uploads == 0 && std::chrono::steady_clock::now() < give_up) {
    e->Clear();
    Store(*e, u);
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_GE(e->Stats().remote.uploads, 1u) << "uploads resumed once the remote came back";
  // `other` has its own client, in its own backoff: it answers 0 (fast)
  // until its next attempt is due, then reconnects and sees the upload.
  size_t seen = other->LookupRemote(u);
  while (seen != u.size() && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(50ms);
    seen = other->LookupRemote(u);
  }
  EXPECT_EQ(seen, u.size());
}

TEST(EngineRemote, KilledMidRunAndPausedAreMisses) {
  auto server = RedisServer::Start({});
  ASSERT_NE(server, nullptr);
  auto a = Make(Options(Url(*server)));
  auto b = Make(Options(Url(*server)));
  const auto t = Tokens(4 * kChunk, 42);
  Store(*a, t);
  ASSERT_EQ(b->LookupRemote(t), t.size());

  // A stalled server: the lookup ends at the timeout as a miss.
  std::thread pause([&] { server->Cli({"client", "pause", "3000", "all"}); });
  pause.join();
  auto c = Make(Options(Url(*server)));
  EXPECT_EQ(c->LookupRemote(t), 0u);
  EXPECT_EQ(c->FetchRemote(t, kLayout), 0u);
  EXPECT_GE(c->Stats().remote.timeouts, 1u);
  server->Cli({"client", "unpause"});

  server->Kill();
  EXPECT_EQ(b->FetchRemote(t, kLayout), 0u);  // dead: a miss
  EXPECT_GE(b->Stats().remote.errors, 1u);
  Store(*b, Tokens(2 * kChunk, 7));  // stores still succeed locally
  EXPECT_EQ(b->Lookup(Tokens(2 * kChunk, 7)), 2 * kChunk);

  // Restarted empty: misses, no errors surfaced.
  ASSERT_TRUE(server->Restart());
  const auto give_up = std::chrono::steady_clock::now() + 30s;
  auto d = Make(Options(Url(*server)));
  while (!d->Stats().remote.connected && std::chrono::steady_clock::now() < give_up) {
    (void)d->LookupRemote(t);
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_EQ(d->LookupRemote(t), 0u);
  EXPECT_TRUE(d->Stats().remote.connected);
}

TEST(EngineRemote, FullUploadQueueDropsInsteadOfWaiting) {
  auto server = RedisServer::Start({});
  ASSERT_NE(server, nullptr);
  auto a = Make(Options(Url(*server), /*queue=*/2));
  // Writes stall: the uploader sits on its first batch, the queue fills.
  server->Cli({"client", "pause", "2000", "write"});
  const auto t = Tokens(32 * kChunk, 1);
  auto h = a->Store(
      t, 0, kLayout, [](uint32_t n) { return size_t{n} * kBytesPerToken; },
      [](const ChunkHash&, std::span<std::byte> dst) {
        std::fill(dst.begin(), dst.end(), std::byte{1});
        return Status();
      });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE((*h)->Wait().ok());  // the store did not wait for the remote
  EXPECT_EQ(a->Lookup(t), t.size());
  EXPECT_GE(a->Stats().remote.upload_dropped, 32u - 2u - 8u);  // queue 2, one batch of <= 8 in flight
}

TEST(EngineRemote, ClusterSharesAcrossInstances) {
  auto cluster = RedisCluster::Start(3);
  ASSERT_NE(cluster, nullptr);
  auto a = Make(Options(cluster->url()));
  auto b = Make(Options(cluster->url()));
  const auto t = Tokens(40 * kChunk, 900);  // spread over the three masters
  Store(*a, t);
  EXPECT_EQ(a->Stats().remote.uploads, 40u);
  EXPECT_EQ(b->LookupRemote(t), t.size());
  EXPECT_EQ(b->FetchRemote(t, kLayout), t.size());
  size_t bad = 0;
  EXPECT_EQ(RetrieveChecked(*b, t, &bad), t.size());
  EXPECT_EQ(bad, 0u);
}

// A remote that evicts (maxmemory with allkeys-lru): what it dropped is a
// miss, what it kept is served, and nothing is an error.
TEST(EngineRemote, EvictingRemoteIsMissesNotErrors) {
  auto server = RedisServer::Start({"--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"});
  ASSERT_NE(server, nullptr);
  auto a = Make(Options(Url(*server), /*queue=*/4096));  // every chunk uploaded, however slow
  const auto t = Tokens(200 * kChunk, 1);  // ~860 KB of values per 200 chunks ...
  for (int round = 0; round < 4; ++round) {  // ... four prompts: more than fits
    Store(*a, Tokens(200 * kChunk, 1 + round * 100000));
  }
  // Before anything reads (a read makes the keys it touches the most
  // recently used): the newest chunk is there, the store evicted the rest.
  const auto newest = Tokens(200 * kChunk, 1 + 3 * 100000);
  std::vector<ChunkHash> chunks;
  a->hasher().Hash(newest, &chunks);
  const uint64_t ns = remote::NamespaceDigest(Options("").hash_namespace, kChunk);
  EXPECT_EQ(server->Cli({"exists", remote::RemoteKey(ns, chunks.back().key)}), "1");
  auto b = Make(Options(Url(*server)));
  const size_t remote = b->LookupRemote(t);  // the oldest prompt: (partly) evicted
  const size_t fetched = b->FetchRemote(t, kLayout);
  EXPECT_LE(fetched, remote);
  EXPECT_LT(remote, t.size());
  size_t bad = 0;
  EXPECT_EQ(RetrieveChecked(*b, t, &bad), fetched);
  EXPECT_EQ(bad, 0u);
  const long keys = std::stol(server->Cli({"dbsize"}));
  EXPECT_GT(keys, 0);
  EXPECT_LT(keys, 800);  // something was evicted
  EXPECT_EQ(b->Stats().remote.errors, 0u);
  EXPECT_EQ(b->Stats().remote.corrupt, 0u);
  EXPECT_EQ(a->Stats().remote.upload_failed, 0u);  // allkeys-lru makes room: no OOM errors
  EXPECT_EQ(a->Stats().remote.upload_dropped, 0u);
}

// The scheduler's view under `vllm serve`: past the ranks' local prefix, a
// chunk counts only when every rank's copy is in the remote.
TEST(EngineRemote, SchedulerViewNeedsEveryRanksCopy) {
  auto server = RedisServer::Start({});
  ASSERT_NE(server, nullptr);
  // Unique across concurrent runs: in Bazel's sandbox every test is pid 12,
  // and /dev/shm is shared.
  const std::string tag = std::to_string(::getpid()) + "-" + std::to_string(std::random_device{}());
  auto rank_options = [&](uint32_t rank, const std::string& instance) {
    EngineOptions o = Options(Url(*server));
    o.hash_namespace.rank = rank;
    o.hash_namespace.world_size = 2;
    o.catalogue_shm_name = CatalogueShmName(instance + tag, rank, 2);
    return o;
  };
  // Instance A's two ranks store a prompt; instance B's ranks hold nothing.
  auto a0 = Make(rank_options(0, "A")), a1 = Make(rank_options(1, "A"));
  auto b0 = Make(rank_options(0, "B")), b1 = Make(rank_options(1, "B"));
  ASSERT_TRUE(a0 && a1 && b0 && b1);
  const auto t = Tokens(6 * kChunk, 77);
  Store(*a0, t);
  Store(*a1, t);
  CatalogueViewOptions vo;
  vo.chunk_tokens = kChunk;
  for (uint32_t r = 0; r < 2; ++r) vo.ranks.push_back({CatalogueShmName("B" + tag, r, 2), rank_options(r, "B").hash_namespace});
  vo.remote.url = Url(*server);
  vo.remote.timeout = 500ms;
  auto view = CatalogueView::Create(vo);
  ASSERT_TRUE(view.ok()) << view.status().ToString();
  size_t local = 99;
  EXPECT_EQ((*view)->LookupWithRemote(t, nullptr, &local), t.size());
  EXPECT_EQ(local, 0u);
  // Rank 1's copy of chunk 2 goes: the prompt's remote prefix is 2 chunks.
  std::vector<ChunkHash> chunks;
  a1->hasher().Hash(t, &chunks);
  const uint64_t ns1 = remote::NamespaceDigest(rank_options(1, "A").hash_namespace, kChunk);
  ASSERT_EQ(server->Cli({"del", remote::RemoteKey(ns1, chunks[2].key)}), "1");
  EXPECT_EQ((*view)->LookupWithRemote(t), 2 * kChunk);
  // B fetches on both ranks (what its workers do), then its local prefix
  // covers those 2 chunks and the remote adds nothing more.
  EXPECT_EQ(b0->FetchRemote(t, kLayout), t.size());
  EXPECT_EQ(b1->FetchRemote(t, kLayout), 2 * kChunk);
  EXPECT_EQ((*view)->LookupWithRemote(t, nullptr, &local), 2 * kChunk);
  EXPECT_EQ(local, 2 * kChunk);
  // The remote down: the local answer stands.
  server->Kill();
  EXPECT_EQ((*view)->LookupWithRemote(t, nullptr, &local), 2 * kChunk);
}

}  // namespace
}  // namespace kvtier
