// Baseline numbers for every other benchmark: memcpy bandwidth on this box.
#include <benchmark/benchmark.h>

#include <cstring>
#include <vector>

#include "cc/common/bench_main.h"

static void BM_Memcpy(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  std::vector<char> a(n, 1), b(n);
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), n);
    benchmark::DoNotOptimize(b.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(n));
}
BENCHMARK(BM_Memcpy)->Arg(4096)->Arg(1 << 20);

KVTIER_BENCH_COMPARE("memcpy_1MiB_vs_4KiB", "BM_Memcpy/1048576", "BM_Memcpy/4096",
                     kvtier::bench::Metric::kBytesPerSecond);
