// PeerTransport over real UCX endpoints on loopback (whatever UCX_TLS the
// environment sets; tools run it with tcp and with shm). Two engines in one
// process stand for producer and consumer: the transfer still goes through
// UCX's sockaddr connection, active messages and RMA gets.
#include "cc/transport/peer_transport.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "cc/transport/wire.h"

namespace kvtier::transport {
namespace {

// Under TSan, UCX's memory-event hooks (it patches mmap/munmap) and its
// fatal-signal handlers make the process exit silently; these tests need
// neither. The environment still wins (no overwrite).
const bool kUcxTestEnv [[maybe_unused]] = [] {
  setenv("UCX_MEM_EVENTS", "no", 0);
  setenv("UCX_HANDLE_ERRORS", "none", 0);
  return true;
}();

constexpr uint32_t kChunk = 16;
constexpr size_t kChunkBytes = 64 * 1024;
constexpr uint64_t kLayout = 7;

EngineOptions Options(size_t cpu_bytes = 16 << 20) {
  EngineOptions o;
  o.hash_namespace.model = "transport-test";
  o.hash_namespace.dtype = "float16";
  o.chunk_tokens = kChunk;
  o.cpu.capacity_bytes = cpu_bytes;
  o.cpu.chunk_bytes = kChunkBytes;
  return o;
}

std::unique_ptr<Engine> MakeEngine(size_t cpu_bytes = 16 << 20) {
  auto e = Engine::Create(Options(cpu_bytes));
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return std::move(e).value();
}

std::unique_ptr<PeerTransport> MakeTransport(Engine* e, bool serve, uint32_t timeout_ms = 5000,
                                             int port = 0) {
  TransportOptions o;
  if (serve) o.listen_host = "127.0.0.1";
  o.listen_port = port;
  o.timeout_ms = timeout_ms;
  auto t = PeerTransport::Create(e, o);
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return t.ok() ? std::move(t).value() : nullptr;
}

std::vector<int32_t> Tokens(size_t n, int32_t first) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

// Chunk bytes derived from the tokens, so each chunk's content is distinct.
std::vector<std::vector<std::byte>> ChunkData(const std::vector<int32_t>& tokens, size_t bytes = kChunkBytes) {
  std::vector<std::vector<std::byte>> out;
  for (size_t c = 0; c * kChunk < tokens.size(); ++c) {
    std::vector<std::byte> d(bytes);
    for (size_t i = 0; i < d.size(); ++i) d[i] = static_cast<std::byte>((tokens[c * kChunk] * 131 + i * 7) & 0xff);
    out.push_back(std::move(d));
  }
  return out;
}

void Store(Engine& e, const std::vector<int32_t>& tokens, const std::vector<std::vector<std::byte>>& data) {
  std::vector<std::span<const std::byte>> spans(data.begin(), data.end());
  auto h = e.StoreBuffers(tokens, kLayout, spans);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  ASSERT_TRUE((*h)->Wait().ok());
}

// The consumer's copy, chunk by chunk, through the engine's checked retrieve.
std::vector<std::vector<std::byte>> Retrieved(Engine& e, const std::vector<int32_t>& tokens) {
  std::vector<std::vector<std::byte>> out;
  auto n = e.Retrieve(tokens, 0, kLayout, [&](const ChunkHash&, std::span<const std::byte> src) {
    out.emplace_back(src.begin(), src.end());
    return Status::Ok();
  });
  EXPECT_TRUE(n.ok());
  return out;
}

TEST(PeerTransportTest, PullsManyChunksByteForByte) {
  auto producer = MakeEngine(), consumer = MakeEngine();
  auto server = MakeTransport(producer.get(), /*serve=*/true);
  auto client = MakeTransport(consumer.get(), /*serve=*/false);
  ASSERT_TRUE(server && client);
  EXPECT_FALSE(server->address().empty());
  EXPECT_TRUE(client->address().empty());

  auto tokens = Tokens(100 * kChunk + 5, 11);  // 100 full chunks and a partial tail
  auto data = ChunkData(tokens);
  Store(*producer, tokens, data);
  ASSERT_EQ(consumer->SetChunkBytes(kChunkBytes).code(), StatusCode::kOk);
  EXPECT_EQ(consumer->Lookup(tokens), 0u);

  EXPECT_EQ(client->Pull(server->address(), tokens, kLayout), tokens.size());
  EXPECT_EQ(consumer->Lookup(tokens), tokens.size());
  EXPECT_EQ(Retrieved(*consumer, tokens), data);

  const TransportStats cs = client->Stats(), ss = server->Stats();
  EXPECT_EQ(cs.pulls, 1u);
  EXPECT_EQ(cs.chunks_pulled, data.size());
  EXPECT_EQ(cs.bytes_pulled, data.size() * kChunkBytes);
  EXPECT_EQ(cs.misses + cs.corrupt + cs.timeouts + cs.errors, 0u);
  EXPECT_EQ(ss.chunks_served, data.size());
  // A second pull finds everything local and sends nothing.
  EXPECT_EQ(client->Pull(server->address(), tokens, kLayout), tokens.size());
  EXPECT_EQ(client->Stats().chunks_pulled, data.size());
}

TEST(PeerTransportTest, PullsOnlyPastTheLocalPrefixAndStopsAtTheProducersEnd) {
  auto producer = MakeEngine(), consumer = MakeEngine();
  auto server = MakeTransport(producer.get(), true);
  auto client = MakeTransport(consumer.get(), false);
  ASSERT_TRUE(server && client);
  auto tokens = Tokens(8 * kChunk, 500);
  auto data = ChunkData(tokens);
  // The producer holds the first 6 chunks, the consumer already the first 2.
  std::vector<int32_t> six(tokens.begin(), tokens.begin() + 6 * kChunk), two(tokens.begin(), tokens.begin() + 2 * kChunk);
  Store(*producer, six, {data.begin(), data.begin() + 6});
  Store(*consumer, two, {data.begin(), data.begin() + 2});
  EXPECT_EQ(client->Pull(server->address(), tokens, kLayout), 6 * kChunk);
  EXPECT_EQ(client->Stats().chunks_pulled, 4u);
  EXPECT_EQ(client->Stats().misses, 1u);  // ended before the prompt's end
  auto got = Retrieved(*consumer, tokens);
  ASSERT_EQ(got.size(), 6u);
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(got[i], data[i]) << i;
}

TEST(PeerTransportTest, LayoutMismatchIsAMiss) {
  auto producer = MakeEngine(), consumer = MakeEngine();
  auto server = MakeTransport(producer.get(), true);
  auto client = MakeTransport(consumer.get(), false);
  ASSERT_TRUE(server && client);
  auto tokens = Tokens(2 * kChunk, 1);
  Store(*producer, tokens, ChunkData(tokens));
  ASSERT_TRUE(consumer->SetChunkBytes(kChunkBytes).ok());
  EXPECT_EQ(client->Pull(server->address(), tokens, kLayout + 1), 0u);
  EXPECT_EQ(consumer->Lookup(tokens), 0u);
}

TEST(PeerTransportTest, ConnectionRefusedIsAMissNotAHang) {
  auto consumer = MakeEngine();
  ASSERT_TRUE(consumer->SetChunkBytes(kChunkBytes).ok());
  auto client = MakeTransport(consumer.get(), false, /*timeout_ms=*/3000);
  ASSERT_TRUE(client);
  // A port nothing listens on: bind one, learn it, close it.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  socklen_t len = sizeof(a);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  close(fd);
  const std::string addr = "127.0.0.1:" + std::to_string(ntohs(a.sin_port));
  auto tokens = Tokens(3 * kChunk, 9);
  EXPECT_EQ(client->Pull(addr, tokens, kLayout), 0u);
  const auto s = client->Stats();
  EXPECT_EQ(s.misses, 1u);
  EXPECT_GE(s.errors + s.timeouts, 1u);
  EXPECT_EQ(client->Pull("not an address", tokens, kLayout), 0u);
  EXPECT_EQ(client->Pull("no-such-host.invalid:1", tokens, kLayout), 0u);
}

TEST(PeerTransportTest, ProducerRestartAtTheSamePort) {
  auto producer = MakeEngine(), consumer = MakeEngine();
  auto server = MakeTransport(producer.get(), true);
  auto client = MakeTransport(consumer.get(), false);
  ASSERT_TRUE(server && client);
  const std::string addr = server->address();
  const int port = std::stoi(addr.substr(addr.rfind(':') + 1));
  auto first = Tokens(4 * kChunk, 100), second = Tokens(4 * kChunk, 900);
  Store(*producer, first, ChunkData(first));
  Store(*producer, second, ChunkData(second));
  EXPECT_EQ(client->Pull(addr, first, kLayout), first.size());

  // The producer goes away with the consumer's endpoint still open to it...
  server.reset();
  producer.reset();
  EXPECT_EQ(client->Pull(addr, second, kLayout), 0u);
  // ...and comes back at the same address with the same chunks.
  producer = MakeEngine();
  Store(*producer, second, ChunkData(second));
  server = MakeTransport(producer.get(), true, 5000, port);
  ASSERT_TRUE(server);
  ASSERT_EQ(server->address(), addr);
  // The first pull after the restart may still meet the old endpoint's
  // failure; the one after that reconnects.
  size_t got = client->Pull(addr, second, kLayout);
  if (got == 0) got = client->Pull(addr, second, kLayout);
  EXPECT_EQ(got, second.size());
  EXPECT_EQ(Retrieved(*consumer, second), ChunkData(second));
}

TEST(PeerTransportTest, ConcurrentConsumersAndConcurrentPullsOfOneConsumer) {
  auto producer = MakeEngine(64 << 20);
  auto server = MakeTransport(producer.get(), true);
  ASSERT_TRUE(server);
  constexpr int kPrompts = 4;
  std::vector<std::vector<int32_t>> prompts;
  for (int p = 0; p < kPrompts; ++p) {
    prompts.push_back(Tokens(40 * kChunk, 10000 * (p + 1)));
    Store(*producer, prompts.back(), ChunkData(prompts.back()));
  }
  // Three consumers, each pulling every prompt from its own thread per prompt.
  constexpr int kConsumers = 3;
  std::vector<std::unique_ptr<Engine>> engines;
  std::vector<std::unique_ptr<PeerTransport>> clients;
  for (int c = 0; c < kConsumers; ++c) {
    engines.push_back(MakeEngine(64 << 20));
    ASSERT_TRUE(engines.back()->SetChunkBytes(kChunkBytes).ok());
    clients.push_back(MakeTransport(engines.back().get(), false));
    ASSERT_TRUE(clients.back());
  }
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int c = 0; c < kConsumers; ++c) {
    for (int p = 0; p < kPrompts; ++p) {
      threads.emplace_back([&, c, p] {
        if (clients[c]->Pull(server->address(), prompts[p], kLayout) != prompts[p].size()) wrong.fetch_add(1);
      });
    }
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0);
  for (int c = 0; c < kConsumers; ++c) {
    for (int p = 0; p < kPrompts; ++p) EXPECT_EQ(Retrieved(*engines[c], prompts[p]), ChunkData(prompts[p])) << c << p;
    const auto s = clients[c]->Stats();
    EXPECT_EQ(s.chunks_pulled, size_t{kPrompts} * 40);
    EXPECT_EQ(s.errors + s.timeouts + s.corrupt + s.misses, 0u);
  }
  EXPECT_EQ(server->Stats().chunks_served, size_t{kConsumers} * kPrompts * 40);
}

// Malformed kvtier messages sent over a real UCX endpoint (the consumer's
// hook rewrites its own PULL): the producer answers or drops each, never
// crashes, and serves the next good PULL.
TEST(PeerTransportTest, MalformedRequestsAreRefusedAndTheProducerGoesOn) {
  auto producer = MakeEngine(), consumer = MakeEngine();
  auto server = MakeTransport(producer.get(), true);
  auto client = MakeTransport(consumer.get(), false, /*timeout_ms=*/2000);
  ASSERT_TRUE(server && client);
  auto tokens = Tokens(3 * kChunk, 77);
  Store(*producer, tokens, ChunkData(tokens));
  ASSERT_TRUE(consumer->SetChunkBytes(kChunkBytes).ok());

  auto poke = [](size_t off, uint32_t v) {
    return [off, v](std::vector<std::byte>* m) {
      if (m->size() >= off + sizeof(v)) std::memcpy(m->data() + off, &v, sizeof(v));
      return true;
    };
  };
  struct Case {
    const char* name;
    std::function<bool(std::vector<std::byte>*)> rewrite;
    bool answered;  // the producer replies (the consumer does not wait out its timeout)
  };
  // Offset 4 holds {version, kind}: version + 1, kind PULL.
  const uint32_t v2 = uint32_t{wire::kWireVersion + 1u} | (uint32_t{static_cast<uint16_t>(wire::Kind::kPull)} << 16);
  std::vector<Case> cases = {
      {"bad version", poke(4, v2), true},
      {"huge count", poke(12, 0xffffffffu), true},
      {"count beyond the message", poke(12, 4), true},
      {"zero count", poke(12, 0), true},
      {"unknown flags", poke(8, 0x100), true},
      {"truncated", [](std::vector<std::byte>* m) { m->resize(m->size() - 5); return true; }, true},
      {"unknown keys",
       [](std::vector<std::byte>* m) {
         for (size_t off = sizeof(wire::PullHeader); off + 8 <= m->size(); off += sizeof(wire::PullEntry)) {
           (*m)[off] ^= std::byte{0xff};
         }
         return true;
       },
       true},
      {"another namespace", poke(24, 0x12345678), true},
      // Too broken to say which request it was: not answered.
      {"bad magic", poke(0, 0xdeadbeef), true},
      {"three bytes", [](std::vector<std::byte>* m) { m->resize(3); return true; }, false},
  };
  uint64_t timeouts = 0;
  for (const Case& c : cases) {
    TransportHooks h;
    h.before_send_pull = c.rewrite;
    client->SetHooks(h);
    EXPECT_EQ(client->Pull(server->address(), tokens, kLayout), 0u) << c.name;
    const uint64_t now = client->Stats().timeouts;
    if (c.answered) EXPECT_EQ(now, timeouts) << c.name << ": the producer did not answer";
    timeouts = now;
  }
  EXPECT_EQ(consumer->Lookup(tokens), 0u);
  EXPECT_GE(server->Stats().errors, 7u);
  EXPECT_EQ(server->Stats().chunks_served, 0u);
  client->SetHooks({});
  EXPECT_EQ(client->Pull(server->address(), tokens, kLayout), tokens.size());
  EXPECT_EQ(Retrieved(*consumer, tokens), ChunkData(tokens));
}

TEST(PeerTransportTest, DamagedTransfersAreMissesAndNeverFiled) {
  auto producer = MakeEngine(), consumer = MakeEngine();
  auto server = MakeTransport(producer.get(), true);
  auto client = MakeTransport(consumer.get(), false);
  // drop ends in a timeout: a short one (a second transport of the engine).
  auto impatient = MakeTransport(consumer.get(), false, /*timeout_ms=*/300);
  ASSERT_TRUE(server && client && impatient);
  auto tokens = Tokens(6 * kChunk, 3);
  Store(*producer, tokens, ChunkData(tokens));
  ASSERT_TRUE(consumer->SetChunkBytes(kChunkBytes).ok());

  // Chunk 3 damaged: chunks 0-2 count, 3 and after do not.
  TransportHooks corrupt_third;
  corrupt_third.after_get = [](size_t i, std::span<std::byte> d) {
    if (i == 3) d[100] ^= std::byte{1};
  };
  // A damaged chunk ends the pull while the later chunks' gets may still be
  // moving; their slots stay reserved until the progress thread reaps them,
  // and a pull meanwhile is a plain miss. Wait for that between pulls.
  auto reaped = [&] {
    for (int i = 0; i < 1000 && client->Stats().orphaned_pulls != 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return client->Stats().orphaned_pulls == 0;
  };
  client->SetHooks(corrupt_third);
  EXPECT_EQ(client->Pull(server->address(), tokens, kLayout), 3 * kChunk);
  EXPECT_EQ(client->Stats().corrupt, 1u);
  EXPECT_EQ(consumer->Lookup(tokens), 3 * kChunk);

  for (const char* fault : {"truncate", "corrupt"}) {
    ASSERT_TRUE(reaped()) << fault;
    client->SetHooks(ParseFault(fault).value());
    EXPECT_EQ(client->Pull(server->address(), tokens, kLayout), 3 * kChunk) << fault;
    EXPECT_EQ(consumer->Lookup(tokens), 3 * kChunk) << fault;
  }
  const auto s = client->Stats();
  EXPECT_EQ(s.corrupt, 3u);
  EXPECT_EQ(s.misses, 3u);
  EXPECT_EQ(s.timeouts + s.errors, 0u);
  ASSERT_TRUE(reaped());
  impatient->SetHooks(ParseFault("drop").value());
  EXPECT_EQ(impatient->Pull(server->address(), tokens, kLayout), 3 * kChunk);
  EXPECT_EQ(impatient->Stats().timeouts, 1u);
  EXPECT_EQ(consumer->Lookup(tokens), 3 * kChunk);
  EXPECT_EQ(Retrieved(*consumer, tokens).size(), 3u);
  client->SetHooks({});
  ASSERT_TRUE(reaped());
  EXPECT_EQ(client->Pull(server->address(), tokens, kLayout), tokens.size());
  EXPECT_EQ(Retrieved(*consumer, tokens), ChunkData(tokens));
  EXPECT_FALSE(ParseFault("explode").ok());
  EXPECT_FALSE(ParseFault("delay:").ok());
  EXPECT_TRUE(ParseFault("delay:5").ok());
}

TEST(PeerTransportTest, HeldChunksSurviveEvictionUntilPulled) {
  // A producer CPU tier of 8 chunks: without the hold, storing 16 other
  // chunks would evict the prompt before the consumer asks.
  auto producer = MakeEngine(8 * kChunkBytes), consumer = MakeEngine();
  auto server = MakeTransport(producer.get(), true);
  auto client = MakeTransport(consumer.get(), false);
  ASSERT_TRUE(server && client);
  auto tokens = Tokens(3 * kChunk, 5), unheld = Tokens(3 * kChunk, 7000);
  Store(*producer, tokens, ChunkData(tokens));
  Store(*producer, unheld, ChunkData(unheld));
  EXPECT_EQ(server->Hold(tokens, nullptr, 600), 3u);
  EXPECT_EQ(server->Stats().holds, 3u);
  for (int r = 0; r < 4; ++r) {
    auto other = Tokens(4 * kChunk, 50000 + 1000 * r);
    Store(*producer, other, ChunkData(other));
  }
  EXPECT_LT(producer->Lookup(unheld), unheld.size());  // the pressure is real
  EXPECT_EQ(producer->Lookup(tokens), tokens.size());
  EXPECT_EQ(client->Pull(server->address(), tokens, kLayout), tokens.size());
  EXPECT_EQ(server->Stats().holds, 0u);  // the pull took them
  EXPECT_EQ(Retrieved(*consumer, tokens), ChunkData(tokens));
  EXPECT_EQ(server->Hold(Tokens(kChunk, 999999), nullptr, 600), 0u);  // nothing cached: nothing held
}

}  // namespace
}  // namespace kvtier::transport
