// Replays synthetic KV-cache traces through a chunk-count-limited cache with
// each eviction policy and prints one JSON line per (workload, policy,
// capacity): chunk hit ratio and prefix hit ratio (hits before a request's
// first miss, i.e. what an engine can actually skip).
//
// Workloads (deterministic for a given --seed):
//   chat       multi-round conversations picked with zipf(alpha) popularity;
//              each request re-reads the shared system prompt and the
//              conversation's history, then appends 1-3 new chunks. A
//              conversation that reaches --max_turn_chunks restarts fresh.
//   chat+scan  the same, plus one-off long documents (--scan_chunks chunks
//              read once, never again) on --scan_pct of the requests.
//
//   bazel run -c opt //cc/tiers/eviction:trace_replay -- --requests=40000
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <unordered_set>
#include <vector>

#include "cc/tiers/eviction/eviction_policy.h"

namespace kvtier {
namespace {

struct Params {
  uint64_t requests = 40000;
  uint64_t conversations = 3000;
  double alpha = 0.9;
  uint32_t system_chunks = 4;
  uint32_t max_turn_chunks = 48;
  uint32_t scan_chunks = 256;
  double scan_pct = 5.0;
  uint64_t seed = 42;
};

ChunkKey Mix(uint64_t a, uint64_t b) {
  uint64_t x = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull);
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 29;
  return ChunkKey{x | 1, a ^ (b << 1)};
}

using Request = std::vector<ChunkKey>;

std::vector<Request> MakeTrace(const Params& p, bool scans) {
  std::mt19937_64 rng(p.seed);
  std::vector<double> cdf(p.conversations);
  double sum = 0;
  for (uint64_t i = 0; i < p.conversations; ++i) cdf[i] = (sum += 1.0 / std::pow(static_cast<double>(i + 1), p.alpha));
  std::uniform_real_distribution<double> u(0, sum);
  std::vector<uint32_t> length(p.conversations, 0);
  std::vector<uint64_t> generation(p.conversations, 0);
  std::vector<Request> trace;
  uint64_t docs = 0;
  for (uint64_t r = 0; r < p.requests; ++r) {
    Request req;
    if (scans && std::uniform_real_distribution<double>(0, 100)(rng) < p.scan_pct) {
      const uint64_t doc = ++docs;
      for (uint32_t c = 0; c < p.scan_chunks; ++c) req.push_back(Mix(0xD0C0000000000000ull | doc, c));
      trace.push_back(std::move(req));
      continue;
    }
    const auto conv = static_cast<uint64_t>(std::lower_bound(cdf.begin(), cdf.end(), u(rng)) - cdf.begin());
    for (uint32_t c = 0; c < p.system_chunks; ++c) req.push_back(Mix(0, c));
    const uint32_t add = 1 + static_cast<uint32_t>(rng() % 3);
    if (length[conv] + add > p.max_turn_chunks) {
      length[conv] = 0;
      ++generation[conv];
    }
    length[conv] += add;
    const uint64_t id = (conv + 1) << 20 | generation[conv];
    for (uint32_t c = 0; c < length[conv]; ++c) req.push_back(Mix(id, c));
    trace.push_back(std::move(req));
  }
  return trace;
}

struct Result {
  uint64_t accesses = 0, hits = 0, prefix_hits = 0;
};

Result Replay(const std::vector<Request>& trace, EvictionPolicy* policy, size_t capacity) {
  std::unordered_set<ChunkKey, ChunkKeyHash> present;
  present.reserve(capacity * 2);
  Result res;
  const auto any = [](const ChunkKey&) { return true; };
  for (const Request& req : trace) {
    bool prefix = true;
    for (const ChunkKey& k : req) {
      ++res.accesses;
      if (present.count(k) != 0) {
        ++res.hits;
        if (prefix) ++res.prefix_hits;
        policy->OnAccess(k);
        continue;
      }
      prefix = false;
      while (present.size() >= capacity) {
        auto v = policy->NextVictim(any);
        if (!v) std::abort();  // every key is evictable here
        present.erase(*v);
      }
      present.insert(k);
      policy->OnInsert(k, 1);
    }
  }
  return res;
}

bool Flag(const char* arg, const char* name, double* out) {
  const size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  *out = std::atof(arg + n + 1);
  return true;
}

}  // namespace
}  // namespace kvtier

int main(int argc, char** argv) {
  using namespace kvtier;
  Params p;
  for (int i = 1; i < argc; ++i) {
    double v = 0;
    if (Flag(argv[i], "--requests", &v)) p.requests = static_cast<uint64_t>(v);
    else if (Flag(argv[i], "--conversations", &v)) p.conversations = static_cast<uint64_t>(v);
    else if (Flag(argv[i], "--alpha", &v)) p.alpha = v;
    else if (Flag(argv[i], "--max_turn_chunks", &v)) p.max_turn_chunks = static_cast<uint32_t>(v);
    else if (Flag(argv[i], "--scan_chunks", &v)) p.scan_chunks = static_cast<uint32_t>(v);
    else if (Flag(argv[i], "--scan_pct", &v)) p.scan_pct = v;
    else if (Flag(argv[i], "--seed", &v)) p.seed = static_cast<uint64_t>(v);
    else {
      std::fprintf(stderr, "unknown flag %s\n", argv[i]);
      return 2;
    }
  }
  for (const bool scans : {false, true}) {
    const auto trace = MakeTrace(p, scans);
    std::unordered_set<ChunkKey, ChunkKeyHash> distinct;
    uint64_t accesses = 0;
    for (const auto& r : trace) {
      accesses += r.size();
      distinct.insert(r.begin(), r.end());
    }
    const char* workload = scans ? "chat+scan" : "chat";
    std::printf("{\"workload\": \"%s\", \"requests\": %llu, \"accesses\": %llu, \"distinct_chunks\": %zu}\n", workload,
                static_cast<unsigned long long>(p.requests), static_cast<unsigned long long>(accesses),
                distinct.size());
    for (const size_t capacity : {1000ul, 2000ul, 4000ul, 8000ul, 16000ul}) {
      for (const char* name : {"lru", "s3fifo"}) {
        auto policy = std::move(MakeEvictionPolicy(name)).value();
        const Result r = Replay(trace, policy.get(), capacity);
        std::printf(
            "{\"workload\": \"%s\", \"policy\": \"%s\", \"capacity_chunks\": %zu, \"hit_ratio\": %.4f, "
            "\"prefix_hit_ratio\": %.4f}\n",
            workload, name, capacity, static_cast<double>(r.hits) / static_cast<double>(r.accesses),
            static_cast<double>(r.prefix_hits) / static_cast<double>(r.accesses));
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
