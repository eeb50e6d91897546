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
#include <cstring>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "cc/transport/wire.h"

namespace kvtier::transport {
namespace {

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

}  // namespace
}  // namespace kvtier::transport
