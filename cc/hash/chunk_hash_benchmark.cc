// Hashing a 32K-token prompt into 128 chunk keys (256 tokens per chunk),
// against memcpy of the same 128 KiB measured in the same run.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cc/common/bench_main.h"
#include "cc/hash/chunk_hash.h"

namespace kvtier {
namespace {

constexpr size_t kPromptTokens = 32 * 1024;
constexpr uint32_t kChunkTokens = 256;

std::vector<int32_t> Prompt() {
  std::vector<int32_t> t(kPromptTokens);
  uint64_t x = 0x243f6a8885a308d3ull;
  for (auto& v : t) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    v = static_cast<int32_t>((x >> 33) % 128000);
  }
  return t;
}

void BM_HashPrompt32K(benchmark::State& state) {
  HashNamespace ns{"meta-llama/Llama-3.1-8B", "bfloat16", "vllm-paged-v1", 0, 1};
  auto hasher = ChunkHasher::Create(ns, kChunkTokens, PartialChunkPolicy::kDrop);
  if (!hasher.ok()) {
    state.SkipWithError(hasher.status().ToString().c_str());
    return;
  }
  const std::vector<int32_t> tokens = Prompt();
  std::vector<ChunkHash> out;
  for (auto _ : state) {
    hasher->Hash(tokens, &out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  if (out.size() != kPromptTokens / kChunkTokens) state.SkipWithError("wrong chunk count");
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * kPromptTokens * 4);
  state.counters["chunks"] = static_cast<double>(out.size());
}
BENCHMARK(BM_HashPrompt32K);

void BM_Memcpy128KiB(benchmark::State& state) {
  const std::vector<int32_t> src = Prompt();
  std::vector<int32_t> dst(src.size());
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), src.size() * sizeof(int32_t));
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * kPromptTokens * 4);
}
BENCHMARK(BM_Memcpy128KiB);

KVTIER_BENCH_COMPARE("hash_32k_prompt_vs_memcpy_128KiB", "BM_HashPrompt32K", "BM_Memcpy128KiB",
                     kvtier::bench::Metric::kRealTimeNs);

}  // namespace
}  // namespace kvtier
