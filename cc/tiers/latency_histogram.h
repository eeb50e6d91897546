// LatencyHistogram: a fixed-bucket histogram of durations in microseconds for
// the hot paths (per-tier loads and stores), safe to record from any thread.
//
// Contract
// - Bucket bounds are fixed and log-spaced (1-2-5 per decade, 10 us .. 10 s;
//   kBounds). Bucket i counts samples v with kBounds[i-1] < v <= kBounds[i]
//   (bucket 0: v <= 10 us); the last bucket (index kBounds.size()) is +Inf.
//   Counts are NON-cumulative (each sample is in exactly one bucket); an
//   exporter that wants Prometheus' cumulative `le` buckets sums them.
// - Record() is lock-free: one relaxed fetch_add per counter, no mutex, no
//   allocation. A Snapshot() taken while samples arrive may see a sample in
//   `count` but not yet in its bucket (or the reverse); each field is exact
//   at rest.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>

namespace kvtier {

class LatencyHistogram {
 public:
  static constexpr std::array<uint64_t, 19> kBounds = {
      10,     20,     50,      100,     200,     500,       1'000,     2'000,     5'000,     10'000,
      20'000, 50'000, 100'000, 200'000, 500'000, 1'000'000, 2'000'000, 5'000'000, 10'000'000};
  static constexpr size_t kBuckets = kBounds.size() + 1;

  struct Snapshot {
    std::array<uint64_t, kBuckets> counts{};
    uint64_t sum_us = 0;
    uint64_t count = 0;
  };

  void Record(uint64_t us) {
    const size_t i = static_cast<size_t>(std::lower_bound(kBounds.begin(), kBounds.end(), us) - kBounds.begin());
    counts_[i].fetch_add(1, std::memory_order_relaxed);
    sum_us_.fetch_add(us, std::memory_order_relaxed);
    count_.fetch_add(1, std::memory_order_relaxed);
  }

  Snapshot Get() const {
    Snapshot s;
    for (size_t i = 0; i < kBuckets; ++i) s.counts[i] = counts_[i].load(std::memory_order_relaxed);
    s.sum_us = sum_us_.load(std::memory_order_relaxed);
    s.count = count_.load(std::memory_order_relaxed);
    return s;
  }

 private:
  std::array<std::atomic<uint64_t>, kBuckets> counts_{};
  std::atomic<uint64_t> sum_us_{0};
  std::atomic<uint64_t> count_{0};
};

}  // namespace kvtier
