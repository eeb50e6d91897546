// ChunkIndex lookups against std::unordered_map<ChunkKey, ...> measured in
// the same run over the same keys (both tables hold the same random keys and
// are probed in the same shuffled order). Two table sizes: 8Ki entries (a
// 1 MiB index, cache resident: e.g. 16 GB of KV in 2 MB chunks) and 128Ki
// entries (a 16 MiB index, beyond most L2s: memory latency dominates).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <unordered_map>
#include <vector>

#include "cc/common/bench_main.h"
#include "cc/index/chunk_index.h"

namespace kvtier {
namespace {

constexpr int64_t kSmall = int64_t{1} << 13;
constexpr int64_t kLarge = int64_t{1} << 17;
constexpr size_t kPrefix = 128;

struct MapValue {  // what a mutex-guarded map would keep per entry
  uint64_t fingerprint;
  uint32_t num_tokens, size_bytes, tier_mask, pins;
  uint8_t state;
};

struct Tables {
  std::unique_ptr<ChunkIndex> index;
  std::unordered_map<ChunkKey, MapValue, ChunkKeyHash> map;
  std::vector<ChunkKey> keys;  // insertion order = kEntries/kPrefix prompts of kPrefix chunks
  std::vector<uint64_t> fps;
  std::vector<uint32_t> order;  // shuffled probe order for point lookups
};

const Tables& GetTables(size_t kEntries) {
  static std::mutex mu;
  static std::map<size_t, const Tables*> cache;
  std::lock_guard<std::mutex> lock(mu);
  const Tables*& slot = cache[kEntries];
  if (slot == nullptr) slot = [kEntries] {
    auto* t = new Tables;
    t->index = std::move(ChunkIndex::Create(kEntries)).value();
    t->map.reserve(kEntries);
    std::mt19937_64 rng(42);
    for (size_t i = 0; i < kEntries; ++i) {
      ChunkKey k{rng(), rng()};
      const uint64_t fp = rng();
      if (!t->index->Insert(k, fp, 256, 1 << 20).ok() || !t->index->Publish(k).ok()) std::abort();
      t->map.emplace(k, MapValue{fp, 256, 1 << 20, 1, 0, 2});
      t->keys.push_back(k);
      t->fps.push_back(fp);
    }
    t->order.resize(kEntries);
    for (uint32_t i = 0; i < kEntries; ++i) t->order[i] = i;
    std::shuffle(t->order.begin(), t->order.end(), rng);
    return t;
  }();
  return *slot;
}

void BM_IndexFind(benchmark::State& state) {
  const size_t kEntries = static_cast<size_t>(state.range(0));
  const Tables& t = GetTables(kEntries);
  size_t i = static_cast<size_t>(state.thread_index()) * 7919;
  for (auto _ : state) {
    auto e = t.index->Find(t.keys[t.order[i++ & (kEntries - 1)]]);
    benchmark::DoNotOptimize(e);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_IndexFind)->Arg(kSmall)->Arg(kLarge)->UseRealTime()->Threads(1)->Threads(2);

void BM_IndexLookup1(benchmark::State& state) {
  const size_t kEntries = static_cast<size_t>(state.range(0));
  const Tables& t = GetTables(kEntries);
  size_t i = static_cast<size_t>(state.thread_index()) * 7919;
  for (auto _ : state) {
    const size_t j = t.order[i++ & (kEntries - 1)];
    size_t n = t.index->LookupPrefix(std::span(&t.keys[j], 1), std::span(&t.fps[j], 1));
    benchmark::DoNotOptimize(n);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_IndexLookup1)->Arg(kSmall)->Arg(kLarge)->UseRealTime()->Threads(1)->Threads(2);

void BM_UnorderedMapFind(benchmark::State& state) {
  const size_t kEntries = static_cast<size_t>(state.range(0));
  const Tables& t = GetTables(kEntries);
  size_t i = static_cast<size_t>(state.thread_index()) * 7919;
  for (auto _ : state) {
    auto it = t.map.find(t.keys[t.order[i++ & (kEntries - 1)]]);
    benchmark::DoNotOptimize(it);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_UnorderedMapFind)->Arg(kSmall)->Arg(kLarge)->UseRealTime()->Threads(1)->Threads(2);

// 128 chained chunks of one prompt, all present and ready; prompts rotate so
// the working set is the whole table, not one prompt in L1.
void BM_IndexLookupPrefix128(benchmark::State& state) {
  const size_t kEntries = static_cast<size_t>(state.range(0));
  const Tables& t = GetTables(kEntries);
  size_t p = 0;
  size_t total = 0;
  for (auto _ : state) {
    const size_t off = (p++ % (kEntries / kPrefix)) * kPrefix;
    const size_t n = t.index->LookupPrefix(std::span(&t.keys[off], kPrefix),
                                           std::span(&t.fps[off], kPrefix));
    total += n;
    benchmark::DoNotOptimize(n);
  }
  if (total != state.iterations() * kPrefix) state.SkipWithError("prefix not fully found");
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * kPrefix));
}
BENCHMARK(BM_IndexLookupPrefix128)->Arg(kSmall)->Arg(kLarge);

// Baseline: the same prefix walk as 128 finds (with the fingerprint check).
void BM_UnorderedMapPrefix128(benchmark::State& state) {
  const size_t kEntries = static_cast<size_t>(state.range(0));
  const Tables& t = GetTables(kEntries);
  size_t p = 0;
  size_t total = 0;
  for (auto _ : state) {
    const size_t off = (p++ % (kEntries / kPrefix)) * kPrefix;
    size_t n = 0;
    for (; n < kPrefix; ++n) {
      auto it = t.map.find(t.keys[off + n]);
      if (it == t.map.end() || it->second.state != 2 || it->second.fingerprint != t.fps[off + n]) break;
    }
    total += n;
    benchmark::DoNotOptimize(n);
  }
  if (total != state.iterations() * kPrefix) state.SkipWithError("prefix not fully found");
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * kPrefix));
}
BENCHMARK(BM_UnorderedMapPrefix128)->Arg(kSmall)->Arg(kLarge);

KVTIER_BENCH_COMPARE("index_find_vs_unordered_map_1thread_8Ki", "BM_IndexFind/8192/real_time/threads:1",
                     "BM_UnorderedMapFind/8192/real_time/threads:1", kvtier::bench::Metric::kItemsPerSecond);
KVTIER_BENCH_COMPARE("index_find_vs_unordered_map_2threads_8Ki", "BM_IndexFind/8192/real_time/threads:2",
                     "BM_UnorderedMapFind/8192/real_time/threads:2", kvtier::bench::Metric::kItemsPerSecond);
KVTIER_BENCH_COMPARE("index_lookup1_vs_unordered_map_1thread_8Ki", "BM_IndexLookup1/8192/real_time/threads:1",
                     "BM_UnorderedMapFind/8192/real_time/threads:1", kvtier::bench::Metric::kItemsPerSecond);
KVTIER_BENCH_COMPARE("index_lookup_prefix128_vs_unordered_map_8Ki", "BM_IndexLookupPrefix128/8192",
                     "BM_UnorderedMapPrefix128/8192", kvtier::bench::Metric::kRealTimeNs);
KVTIER_BENCH_COMPARE("index_find_vs_unordered_map_1thread_128Ki", "BM_IndexFind/131072/real_time/threads:1",
                     "BM_UnorderedMapFind/131072/real_time/threads:1", kvtier::bench::Metric::kItemsPerSecond);
KVTIER_BENCH_COMPARE("index_find_vs_unordered_map_2threads_128Ki", "BM_IndexFind/131072/real_time/threads:2",
                     "BM_UnorderedMapFind/131072/real_time/threads:2", kvtier::bench::Metric::kItemsPerSecond);
KVTIER_BENCH_COMPARE("index_lookup1_vs_unordered_map_1thread_128Ki", "BM_IndexLookup1/131072/real_time/threads:1",
                     "BM_UnorderedMapFind/131072/real_time/threads:1", kvtier::bench::Metric::kItemsPerSecond);
KVTIER_BENCH_COMPARE("index_lookup_prefix128_vs_unordered_map_128Ki", "BM_IndexLookupPrefix128/131072",
                     "BM_UnorderedMapPrefix128/131072", kvtier::bench::Metric::kRealTimeNs);

}  // namespace
}  // namespace kvtier
