#include "cc/common/bench_main.h"

#include <benchmark/benchmark.h>

#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace kvtier::bench {
namespace {

struct Comparison {
  std::string name, value_run, baseline_run;
  Metric metric;
};

std::vector<Comparison>& Comparisons() {
  static std::vector<Comparison> v;
  return v;
}

// Keeps the console output and remembers every run for the comparisons.
class CapturingReporter : public benchmark::ConsoleReporter {
 public:
  // Plain text: a colour escape left open would glue the first JSON line to
  // it (the --benchmark_color flag only reaches google-benchmark's own
  // default reporter, not one passed in).
  CapturingReporter() : ConsoleReporter(OO_Tabular) {}
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      if (r.run_type == Run::RT_Iteration && r.error_occurred == false) runs_[r.benchmark_name()] = r;
    }
    ConsoleReporter::ReportRuns(runs);
  }
  const std::map<std::string, Run>& runs() const { return runs_; }

 private:
  std::map<std::string, Run> runs_;
};

double Value(const benchmark::BenchmarkReporter::Run& r, Metric m) {
  switch (m) {
    case Metric::kRealTimeNs: return r.GetAdjustedRealTime();
    case Metric::kCpuTimeNs: return r.GetAdjustedCPUTime();
    case Metric::kBytesPerSecond: {
      auto it = r.counters.find("bytes_per_second");
      return it == r.counters.end() ? 0.0 : static_cast<double>(it->second);
    }
    case Metric::kItemsPerSecond: {
      auto it = r.counters.find("items_per_second");
      return it == r.counters.end() ? 0.0 : static_cast<double>(it->second);
    }
  }
  return 0.0;
}

const char* MetricName(Metric m) {
  switch (m) {
    case Metric::kRealTimeNs: return "real_time_ns";
    case Metric::kCpuTimeNs: return "cpu_time_ns";
    case Metric::kBytesPerSecond: return "bytes_per_second";
    case Metric::kItemsPerSecond: return "items_per_second";
  }
  return "?";
}

}  // namespace

bool RegisterComparison(const std::string& name, const std::string& value_run,
                        const std::string& baseline_run, Metric metric) {
  Comparisons().push_back({name, value_run, baseline_run, metric});
  return true;
}

}  // namespace kvtier::bench

int main(int argc, char** argv) {
  using namespace kvtier::bench;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  CapturingReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  int missing = 0;
  for (const Comparison& c : Comparisons()) {
    auto v = reporter.runs().find(c.value_run);
    auto b = reporter.runs().find(c.baseline_run);
    if (v == reporter.runs().end() || b == reporter.runs().end()) {
      ++missing;
      continue;
    }
    const double value = Value(v->second, c.metric);
    const double base = Value(b->second, c.metric);
    const bool higher = c.metric == Metric::kBytesPerSecond || c.metric == Metric::kItemsPerSecond;
    std::printf(
        "{\"name\": \"%s\", \"value\": %.6g, \"baseline\": %.6g, \"ratio\": %.4f, \"metric\": \"%s\", "
        "\"higher_is_better\": %s}\n",
        c.name.c_str(), value, base, base > 0 ? value / base : 0.0, MetricName(c.metric), higher ? "true" : "false");
  }
  if (missing) std::fprintf(stderr, "bench_main: %d comparison(s) skipped (runs filtered out)\n", missing);
  return 0;
}
