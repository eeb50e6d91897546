// CPU gather/scatter vs memcpy of the same bytes, measured in the same run.
// A chunk is 8 layers x 256 tokens x 8 KV heads x 128 head_size x fp16, K and
// V: 8 MiB. Both sides rotate over kRotate chunks (64 MiB, twice the L3 of
// the benchmark box) so that gather, scatter and the memcpy baseline all move
// cold data from DRAM, as the engine's KV is when a request is stored.
// Layouts: flash_attn (a block run is one memcpy) and vllm_cpu (head-major
// blocks: 256-byte pieces per token and head), at block sizes 16 and 128.
#include <benchmark/benchmark.h>

#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "cc/common/bench_main.h"
#include "cc/datapath/cpu_copy.h"
#include "cc/datapath/paged_test_util.h"

namespace kvtier {
namespace {

constexpr size_t kTokens = 256;
constexpr int kRotate = 8;

struct Fixture {
  std::unique_ptr<testing::PagedKv> kv;
  std::unique_ptr<PagedKvLayout> layout;
  std::vector<std::vector<int64_t>> slots;  // kRotate requests, disjoint blocks
  std::vector<std::vector<std::byte>> chunks;
};

Fixture& Get(KvLayoutKind kind, int64_t block_size) {
  static std::map<std::pair<int, int64_t>, Fixture> cache;
  Fixture& f = cache[{static_cast<int>(kind), block_size}];
  if (f.kv) return f;
  testing::PagedSpec s;
  s.kind = kind;
  s.layers = 8;
  s.block_size = block_size;
  s.blocks = kRotate * static_cast<int64_t>(kTokens) / block_size;
  s.heads = 8;
  s.head_size = 128;
  s.elem_size = 2;
  f.kv = std::make_unique<testing::PagedKv>(s, 1);
  f.layout = std::make_unique<PagedKvLayout>(*PagedKvLayout::Create(f.kv->Descs(), kind));
  // One shuffled mapping over all blocks, cut into kRotate requests.
  const auto all = testing::MakeSlots(s, kTokens * kRotate, 2);
  for (int r = 0; r < kRotate; ++r) {
    f.slots.emplace_back(all.begin() + r * kTokens, all.begin() + (r + 1) * kTokens);
    f.chunks.emplace_back(f.layout->ChunkBytes(kTokens), std::byte{0});
  }
  return f;
}

void BM_Memcpy(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  std::vector<std::vector<std::byte>> a(kRotate), b(kRotate);
  for (int r = 0; r < kRotate; ++r) a[r].assign(n, std::byte{1}), b[r].assign(n, std::byte{0});
  int r = 0;
  for (auto _ : state) {
    std::memcpy(b[r].data(), a[r].data(), n);
    benchmark::DoNotOptimize(b[r].data());
    benchmark::ClobberMemory();
    r = (r + 1) % kRotate;
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}
BENCHMARK(BM_Memcpy)->Arg(8 << 20)->UseRealTime();

template <bool kGather>
void BM_Copy(benchmark::State& state) {
  const auto kind = static_cast<KvLayoutKind>(state.range(0));
  Fixture& f = Get(kind, state.range(1));
  const int threads = static_cast<int>(state.range(2));
  int r = 0;
  for (auto _ : state) {
    Status s = kGather ? GatherCpu(*f.layout, f.slots[r], f.chunks[r], threads)
                       : ScatterCpu(*f.layout, f.slots[r], f.chunks[r], threads);
    if (!s.ok()) state.SkipWithError(s.ToString().c_str());
    benchmark::ClobberMemory();
    r = (r + 1) % kRotate;
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * f.chunks[0].size()));
}
void BM_Gather(benchmark::State& s) { BM_Copy<true>(s); }
void BM_Scatter(benchmark::State& s) { BM_Copy<false>(s); }

void Args(benchmark::internal::Benchmark* b) {
  for (int kind : {static_cast<int>(KvLayoutKind::kFlashAttn),
                   static_cast<int>(KvLayoutKind::kVllmCpu)})
    for (int bs : {16, 128})
      for (int threads : {1, 2}) b->Args({kind, bs, threads});
  b->ArgNames({"kind", "block", "threads"})->UseRealTime();
}
BENCHMARK(BM_Gather)->Apply(Args);
BENCHMARK(BM_Scatter)->Apply(Args);

#define KVT_CMP(op, kind, kname, bs, t)                                                \
  KVTIER_BENCH_COMPARE("cpu_" #op "_" kname "_block" #bs "_t" #t "_vs_memcpy",         \
                       "BM_" #op "/kind:" #kind "/block:" #bs "/threads:" #t "/real_time", \
                       "BM_Memcpy/8388608/real_time", kvtier::bench::Metric::kBytesPerSecond)

KVT_CMP(Gather, 1, "flash_attn", 128, 1);
KVT_CMP(Gather, 1, "flash_attn", 16, 1);
KVT_CMP(Scatter, 1, "flash_attn", 128, 1);
KVT_CMP(Scatter, 1, "flash_attn", 16, 1);
KVT_CMP(Gather, 4, "vllm_cpu", 128, 1);
KVT_CMP(Gather, 4, "vllm_cpu", 16, 1);
KVT_CMP(Scatter, 4, "vllm_cpu", 128, 1);
KVT_CMP(Scatter, 4, "vllm_cpu", 16, 1);
KVT_CMP(Gather, 1, "flash_attn", 128, 2);
KVT_CMP(Scatter, 1, "flash_attn", 128, 2);
KVT_CMP(Gather, 4, "vllm_cpu", 128, 2);
KVT_CMP(Scatter, 4, "vllm_cpu", 128, 2);

}  // namespace
}  // namespace kvtier
