// Embedding kvtier in a C++ server with no Python: one store / lookup /
// retrieve round over synthetic KV, then what each tier did.
//
//   bazel run //cc/engine:example_embed -- /var/tmp/kvtier-example
#include <cstdio>
#include <cstring>
#include <numeric>
#include <vector>

#include "cc/engine/engine.h"

int main(int argc, char** argv) {
  using namespace kvtier;
  EngineOptions opts;
  opts.hash_namespace.model = "example-model";
  opts.hash_namespace.dtype = "float16";
  opts.chunk_tokens = 256;
  opts.cpu.capacity_bytes = 64 << 20;
  opts.cpu.chunk_bytes = 256 * 1024;  // bytes of KV per 256-token chunk in this example
  if (argc > 1) {
    opts.disk.path = argv[1];
    opts.disk.capacity_bytes = 256 << 20;
  }
  auto engine_or = Engine::Create(opts);
  if (!engine_or.ok()) {
    std::fprintf(stderr, "engine: %s\n", engine_or.status().ToString().c_str());
    return 1;
  }
  Engine& engine = **engine_or;

  // A 1000-token prompt: three full chunks and a 232-token tail.
  std::vector<int32_t> tokens(1000);
  std::iota(tokens.begin(), tokens.end(), 100);
  auto bytes_for = [](uint32_t n) { return static_cast<size_t>(n) * 1024; };
  // "KV" of token t is 1 KiB filled with (t & 0xff).
  auto fill = [&](const ChunkHash& c, std::span<std::byte> dst) -> Status {
    for (uint32_t i = 0; i < c.num_tokens; ++i) {
      std::memset(dst.data() + size_t{i} * 1024, (tokens[c.begin + i] & 0xff), 1024);
    }
    return Status();
  };
  std::printf("lookup before store: %zu tokens\n", engine.Lookup(tokens));
  auto handle = engine.Store(tokens, 0, /*layout_id=*/1, bytes_for, fill);
  if (!handle.ok() || !(*handle)->Wait().ok()) {
    std::fprintf(stderr, "store failed\n");
    return 1;
  }
  engine.Flush();
  std::printf("stored %zu chunks\n", (*handle)->chunks_stored());
  std::printf("lookup after store: %zu tokens\n", engine.Lookup(tokens));

  size_t bad = 0;
  auto loaded = engine.Retrieve(tokens, 0, 1, [&](const ChunkHash& c, std::span<const std::byte> src) -> Status {
    for (uint32_t i = 0; i < c.num_tokens; ++i) {
      if (src[size_t{i} * 1024] != static_cast<std::byte>(tokens[c.begin + i] & 0xff)) ++bad;
    }
    return Status();
  });
  if (!loaded.ok()) {
    std::fprintf(stderr, "retrieve: %s\n", loaded.status().ToString().c_str());
    return 1;
  }
  std::printf("retrieved %zu tokens, %zu mismatching\n", *loaded, bad);
  EngineStats s = engine.Stats();
  std::printf("cpu tier: %llu entries, %llu bytes used\n", (unsigned long long)s.cpu.entries,
              (unsigned long long)s.cpu.used_bytes);
  if (s.has_disk) {
    std::printf("disk tier: %llu entries, %llu chunks written behind\n", (unsigned long long)s.disk.entries,
                (unsigned long long)s.write_behind_written);
  }
  return (*loaded == tokens.size() && bad == 0) ? 0 : 2;
}
