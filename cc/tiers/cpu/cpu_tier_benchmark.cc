// CPU tier store (Put) and retrieve (Get) bandwidth against single-thread
// memcpy of the same bytes, measured in the same run.
//
// The baselines touch memory the way the tier does: the tier writes each new
// chunk to a different place in a 256 MiB region (and reads chunks spread
// over it), so BM_MemcpyToRegion / BM_MemcpyFromRegion copy between one
// fixed buffer and rotating offsets of a 256 MiB buffer. BM_MemcpyHot (one
// fixed pair of buffers, cache-resident for 1 MiB) is printed for reference.
#include <benchmark/benchmark.h>

#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "cc/common/bench_main.h"
#include "cc/memory/memory_region.h"
#include "cc/tiers/cpu/cpu_tier.h"

namespace kvtier {
namespace {

constexpr size_t kRegion = size_t{256} << 20;

std::unique_ptr<MemoryRegion>& Scratch() {
  static auto r = std::move(MemoryRegion::Allocate({.bytes = kRegion, .prefault = true})).value();
  return r;
}

// One tier per chunk size, built once (prefaulting 256 MiB is not free).
CpuTier* TierFor(size_t chunk) {
  static std::map<size_t, std::unique_ptr<CpuTier>> tiers;
  auto& t = tiers[chunk];
  if (!t) {
    CpuTierOptions o;
    o.capacity_bytes = kRegion;
    o.chunk_bytes = chunk;
    o.prefault = true;  // steady state: page faults are a first-touch cost, not the tier's
    t = std::move(CpuTier::Create(o)).value();
  }
  return t.get();
}

ChunkMeta Meta(uint64_t i) { return ChunkMeta{ChunkKey{i, 0xBE4C}, i * 7, 0, 256}; }

void BM_CpuTierStore(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  CpuTier* t = TierFor(n);
  t->Clear();
  std::vector<std::byte> src(n, std::byte{1});
  uint64_t key = 1;
  for (auto _ : state) {
    // Past 90% full every put also evicts one chunk (steady state).
    Status s = t->Put(Meta(key++), src);
    if (!s.ok()) return state.SkipWithError(s.ToString().c_str());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}

void BM_CpuTierRetrieve(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  CpuTier* t = TierFor(n);
  t->Clear();
  std::vector<std::byte> buf(n, std::byte{2});
  const uint64_t count = kRegion * 8 / 10 / n;  // below the high watermark: no eviction
  for (uint64_t k = 1; k <= count; ++k) (void)t->Put(Meta(k), buf);
  uint64_t k = 0;
  for (auto _ : state) {
    const uint64_t key = 1 + (k++ % count);
    Status s = t->Get(Meta(key).key, key * 7, buf);
    if (!s.ok()) return state.SkipWithError(s.ToString().c_str());
    benchmark::DoNotOptimize(buf.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}

void BM_MemcpyToRegion(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  std::byte* region = Scratch()->data();
  std::vector<std::byte> src(n, std::byte{1});
  const size_t slots = kRegion / n;
  size_t i = 0;
  for (auto _ : state) {
    std::memcpy(region + (i++ % slots) * n, src.data(), n);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}

void BM_MemcpyFromRegion(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  const std::byte* region = Scratch()->data();
  std::vector<std::byte> dst(n);
  const size_t slots = kRegion * 8 / 10 / n;
  size_t i = 0;
  for (auto _ : state) {
    std::memcpy(dst.data(), region + (i++ % slots) * n, n);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}

void BM_MemcpyHot(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  std::vector<std::byte> a(n, std::byte{1}), b(n);
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), n);
    benchmark::DoNotOptimize(b.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}

BENCHMARK(BM_MemcpyToRegion)->Arg(1 << 20)->Arg(4 << 20);
BENCHMARK(BM_CpuTierStore)->Arg(1 << 20)->Arg(4 << 20);
BENCHMARK(BM_MemcpyFromRegion)->Arg(1 << 20)->Arg(4 << 20);
BENCHMARK(BM_CpuTierRetrieve)->Arg(1 << 20)->Arg(4 << 20);
BENCHMARK(BM_MemcpyHot)->Arg(1 << 20)->Arg(4 << 20);

}  // namespace
}  // namespace kvtier

KVTIER_BENCH_COMPARE("cpu_tier_store_1MiB_vs_memcpy", "BM_CpuTierStore/1048576", "BM_MemcpyToRegion/1048576",
                     kvtier::bench::Metric::kBytesPerSecond);
KVTIER_BENCH_COMPARE("cpu_tier_store_4MiB_vs_memcpy", "BM_CpuTierStore/4194304", "BM_MemcpyToRegion/4194304",
                     kvtier::bench::Metric::kBytesPerSecond);
KVTIER_BENCH_COMPARE("cpu_tier_retrieve_1MiB_vs_memcpy", "BM_CpuTierRetrieve/1048576", "BM_MemcpyFromRegion/1048576",
                     kvtier::bench::Metric::kBytesPerSecond);
KVTIER_BENCH_COMPARE("cpu_tier_retrieve_4MiB_vs_memcpy", "BM_CpuTierRetrieve/4194304", "BM_MemcpyFromRegion/4194304",
                     kvtier::bench::Metric::kBytesPerSecond);
