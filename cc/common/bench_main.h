// Shared main() for kvtier's google-benchmark programs.
//
// A benchmark program registers its benchmarks as usual and, in addition,
// declares comparisons between two of its runs (the measured thing and the
// baseline measured in the same process, e.g. CPU tier store vs memcpy):
//
//   KVTIER_BENCH_COMPARE("cpu_tier_store_vs_memcpy",
//                        "BM_CpuTierStore/1048576", "BM_Memcpy/1048576",
//                        kvtier::bench::Metric::kBytesPerSecond);
//
// After all benchmarks ran, main() prints one JSON object per comparison on
// its own line, last, prefixed by nothing else:
//   {"name": ..., "value": ..., "baseline": ..., "ratio": value/baseline,
//    "metric": ..., "higher_is_better": ...}
// tools/bench.sh collects these lines. A comparison whose runs were filtered
// out (--benchmark_filter) is skipped, not reported as zero.
#pragma once

#include <string>

namespace kvtier::bench {

enum class Metric {
  kRealTimeNs,      // adjusted real time per iteration, ns (lower is better)
  kCpuTimeNs,       // adjusted CPU time per iteration, ns (lower is better)
  kBytesPerSecond,  // SetBytesProcessed rate (higher is better)
  kItemsPerSecond,  // SetItemsProcessed rate (higher is better)
};

// Run names are google-benchmark's full run names ("BM_Foo/4096/threads:2").
bool RegisterComparison(const std::string& name, const std::string& value_run,
                        const std::string& baseline_run, Metric metric);

}  // namespace kvtier::bench

#define KVTIER_BENCH_CAT_(a, b) a##b
#define KVTIER_BENCH_CAT(a, b) KVTIER_BENCH_CAT_(a, b)
#define KVTIER_BENCH_COMPARE(name, value_run, baseline_run, metric)                        \
  static const bool KVTIER_BENCH_CAT(kvtier_bench_cmp_, __LINE__) [[maybe_unused]] = \
      ::kvtier::bench::RegisterComparison(name, value_run, baseline_run, metric)
