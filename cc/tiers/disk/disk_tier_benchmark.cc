// Disk tier throughput against raw O_DIRECT on the same file system, and
// restart (rebuild) time.
//
//   bazel run -c opt //cc/tiers/disk:disk_tier_benchmark  (or --config=opt)
//   KVTIER_BENCH_DIR=/mnt/nvme/x  picks the directory (default
//   /var/tmp/kvtier_disk_bench; never a tmpfs: O_DIRECT numbers would lie).
//   KVTIER_BENCH_REBUILD_CHUNKS=N scales the rebuild benchmark (default 100000).
//
// Baselines, measured in the same run on a plain file in the same directory:
// BM_RawODirectWrite/Read: pwrite/pread with O_DIRECT, one chunk per call,
// sequential over a preallocated, already-written 256 MiB file. The tier's
// runs move the same bytes per chunk through PutBatch/GetBatch (headers and
// checksums included in the tier's cost, not in its byte count).
#include <fcntl.h>
#include <unistd.h>

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "cc/common/bench_main.h"
#include "cc/tiers/disk/disk_test_util.h"
#include "cc/tiers/disk/disk_tier.h"

namespace kvtier {
namespace {

using disk_test::Buffer;

constexpr uint64_t kRawFileBytes = 256ull << 20;
constexpr uint64_t kTierCapacity = 256ull << 20;
constexpr uint64_t kTierSegment = 32ull << 20;

std::string BenchDir() {
  const char* d = std::getenv("KVTIER_BENCH_DIR");
  return d != nullptr && *d != '\0' ? d : "/var/tmp/kvtier_disk_bench";
}

std::string Fresh(const std::string& name) {
  const std::string p = BenchDir() + "/" + name;
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

// ---- raw O_DIRECT baseline --------------------------------------------------

struct RawFile {
  int fd = -1;
  RawFile() {
    const std::string p = Fresh("raw") + "/raw.bin";
    fd = open(p.c_str(), O_RDWR | O_CREAT | O_DIRECT, 0644);
    if (fd < 0 || fallocate(fd, 0, 0, kRawFileBytes) != 0) {
      std::perror("raw baseline file");
      std::abort();
    }
    // Write it once so the measured passes overwrite written extents, as the
    // tier does once its segments have been used.
    Buffer b(8 << 20);
    std::memset(b.span().data(), 0x5a, b.span().size());
    for (uint64_t off = 0; off < kRawFileBytes; off += b.span().size()) {
      if (pwrite(fd, b.span().data(), b.span().size(), off) < 0) std::abort();
    }
  }
};
RawFile& Raw() {
  static RawFile* r = new RawFile();
  return *r;
}

void BM_RawODirectWrite(benchmark::State& state) {
  const size_t chunk = static_cast<size_t>(state.range(0));
  RawFile& raw = Raw();
  Buffer b(chunk);
  disk_test::FillFor(1, b.span());
  uint64_t off = 0;
  for (auto _ : state) {
    if (off + chunk > kRawFileBytes) off = 0;
    if (pwrite(raw.fd, b.span().data(), chunk, off) != static_cast<ssize_t>(chunk)) {
      state.SkipWithError("pwrite failed");
      break;
    }
    off += chunk;
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * chunk));
}

void BM_RawODirectRead(benchmark::State& state) {
  const size_t chunk = static_cast<size_t>(state.range(0));
  RawFile& raw = Raw();
  Buffer b(chunk);
  uint64_t off = 0;
  for (auto _ : state) {
    if (off + chunk > kRawFileBytes) off = 0;
    if (pread(raw.fd, b.span().data(), chunk, off) != static_cast<ssize_t>(chunk)) {
      state.SkipWithError("pread failed");
      break;
    }
    off += chunk;
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * chunk));
}

// ---- tier ----------------------------------------------------------------

struct TierFixture {
  std::unique_ptr<DiskTier> tier;
  uint64_t next_key = 1;
  TierFixture() {
    DiskTierOptions o;
    o.path = Fresh("tier");
    o.capacity_bytes = kTierCapacity;
    o.segment_bytes = kTierSegment;
    o.queue_depth = 64;
    auto t = DiskTier::Open(o);
    if (!t.ok()) {
      std::fprintf(stderr, "%s\n", t.status().ToString().c_str());
      std::abort();
    }
    tier = std::move(t).value();
    // One pass over the whole capacity first: later passes recycle written
    // segments, like the raw baseline's overwrites.
    Buffer b(4 << 20);
    for (uint64_t done = 0; done < kTierCapacity; done += 4 << 20) {
      (void)tier->Put(disk_test::MetaFor(next_key++), b.cspan());
    }
  }
};
TierFixture& Tier() {
  static TierFixture* f = new TierFixture();
  return *f;
}

struct Batch {
  std::vector<std::unique_ptr<Buffer>> bufs;
  std::vector<ChunkMeta> metas;
  std::vector<std::span<const std::byte>> datas;
  std::vector<std::span<std::byte>> dsts;
  std::vector<ChunkKey> keys;
  std::vector<uint64_t> fps;
  Batch(size_t n, size_t chunk) {
    for (size_t i = 0; i < n; ++i) {
      bufs.push_back(std::make_unique<Buffer>(chunk));
      disk_test::FillFor(i, bufs.back()->span());
      datas.push_back(bufs.back()->cspan());
      dsts.push_back(bufs.back()->span());
    }
    metas.resize(n);
    keys.resize(n);
    fps.resize(n);
  }
};

void BM_DiskTierPutBatch(benchmark::State& state) {
  const size_t chunk = static_cast<size_t>(state.range(0));
  const size_t n = static_cast<size_t>(state.range(1));
  TierFixture& f = Tier();
  Batch b(n, chunk);
  for (auto _ : state) {
    for (size_t i = 0; i < n; ++i) b.metas[i] = disk_test::MetaFor(f.next_key++);
    for (const Status& s : f.tier->PutBatch(b.metas, b.datas)) {
      if (!s.ok()) state.SkipWithError(s.ToString().c_str());
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n * chunk));
}

void BM_DiskTierGetBatch(benchmark::State& state) {
  const size_t chunk = static_cast<size_t>(state.range(0));
  const size_t n = static_cast<size_t>(state.range(1));
  TierFixture& f = Tier();
  // 128 MiB of this size, read round-robin (far more than any disk cache).
  const size_t stored = std::max<size_t>(n, (128ull << 20) / chunk);
  Batch b(n, chunk);
  const uint64_t first = f.next_key;
  for (size_t done = 0; done < stored; done += n) {
    for (size_t i = 0; i < n; ++i) b.metas[i] = disk_test::MetaFor(f.next_key++);
    for (const Status& s : f.tier->PutBatch(b.metas, b.datas)) {
      if (!s.ok()) state.SkipWithError(s.ToString().c_str());
    }
  }
  const uint64_t count = f.next_key - first;
  uint64_t k = 0;
  for (auto _ : state) {
    for (size_t i = 0; i < n; ++i) {
      const uint64_t idx = first + (k++ % count);
      b.keys[i] = disk_test::KeyFor(idx);
      b.fps[i] = disk_test::FingerprintFor(idx);
    }
    for (const Status& s : f.tier->GetBatch(b.keys, b.fps, b.dsts)) {
      if (!s.ok()) state.SkipWithError(s.ToString().c_str());
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n * chunk));
}

// ---- restart ------------------------------------------------------------

// Writes N small chunks once, then times Open() (map rebuilt from the
// records, every payload CRC checked). Counter rebuild_s_per_100k scales the
// time to 100k chunks.
void BM_DiskTierRebuild(benchmark::State& state) {
  const size_t chunk = static_cast<size_t>(state.range(0));
  const char* env = std::getenv("KVTIER_BENCH_REBUILD_CHUNKS");
  const uint64_t chunks = env != nullptr ? std::strtoull(env, nullptr, 10) : 100000;
  DiskTierOptions o;
  o.path = Fresh("rebuild");
  o.segment_bytes = 64ull << 20;
  o.capacity_bytes = ((chunks * (chunk + 8192) / o.segment_bytes) + 2) * o.segment_bytes;
  o.rebuild_threads = 2;
  {
    auto t = DiskTier::Open(o);
    if (!t.ok()) {
      state.SkipWithError(t.status().ToString().c_str());
      return;
    }
    constexpr size_t kBatch = 64;
    Batch b(kBatch, chunk);
    for (uint64_t i = 0; i < chunks; i += kBatch) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(kBatch, chunks - i));
      for (size_t k = 0; k < n; ++k) b.metas[k] = disk_test::MetaFor(i + k + 1);
      (void)(*t)->PutBatch(std::span(b.metas).first(n), std::span(b.datas).first(n));
    }
  }
  double secs = 0;
  uint64_t got = 0;
  for (auto _ : state) {
    auto t = DiskTier::Open(o);
    if (!t.ok()) {
      state.SkipWithError(t.status().ToString().c_str());
      return;
    }
    secs += (*t)->rebuild_stats().seconds;
    got = (*t)->rebuild_stats().chunks;
  }
  if (got != chunks) state.SkipWithError("rebuild recovered a different number of chunks");
  const double per = secs / static_cast<double>(state.iterations());
  state.counters["chunks"] = static_cast<double>(got);
  state.counters["rebuild_s"] = per;
  state.counters["rebuild_s_per_100k"] = per * 100000.0 / static_cast<double>(chunks);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * got));
  std::filesystem::remove_all(o.path);
}

constexpr int64_t k1M = 1 << 20, k4M = 4 << 20;

BENCHMARK(BM_RawODirectWrite)->Arg(k1M)->Arg(k4M)->UseRealTime();
BENCHMARK(BM_RawODirectRead)->Arg(k1M)->Arg(k4M)->UseRealTime();
BENCHMARK(BM_DiskTierPutBatch)->Args({k1M, 1})->Args({k1M, 8})->Args({k4M, 1})->Args({k4M, 4})->UseRealTime();
BENCHMARK(BM_DiskTierGetBatch)->Args({k1M, 1})->Args({k1M, 8})->Args({k4M, 1})->Args({k4M, 4})->UseRealTime();
BENCHMARK(BM_DiskTierRebuild)->Arg(4096)->Iterations(3)->UseRealTime()->Unit(benchmark::kMillisecond);

using bench::Metric;
KVTIER_BENCH_COMPARE("disk_put_1MiB_batch8_vs_raw_odirect_write", "BM_DiskTierPutBatch/1048576/8/real_time",
                     "BM_RawODirectWrite/1048576/real_time", Metric::kBytesPerSecond);
KVTIER_BENCH_COMPARE("disk_put_4MiB_batch4_vs_raw_odirect_write", "BM_DiskTierPutBatch/4194304/4/real_time",
                     "BM_RawODirectWrite/4194304/real_time", Metric::kBytesPerSecond);
KVTIER_BENCH_COMPARE("disk_put_4MiB_single_vs_raw_odirect_write", "BM_DiskTierPutBatch/4194304/1/real_time",
                     "BM_RawODirectWrite/4194304/real_time", Metric::kBytesPerSecond);
KVTIER_BENCH_COMPARE("disk_get_1MiB_batch8_vs_raw_odirect_read", "BM_DiskTierGetBatch/1048576/8/real_time",
                     "BM_RawODirectRead/1048576/real_time", Metric::kBytesPerSecond);
KVTIER_BENCH_COMPARE("disk_get_4MiB_batch4_vs_raw_odirect_read", "BM_DiskTierGetBatch/4194304/4/real_time",
                     "BM_RawODirectRead/4194304/real_time", Metric::kBytesPerSecond);
KVTIER_BENCH_COMPARE("disk_get_4MiB_single_vs_raw_odirect_read", "BM_DiskTierGetBatch/4194304/1/real_time",
                     "BM_RawODirectRead/4194304/real_time", Metric::kBytesPerSecond);

}  // namespace
}  // namespace kvtier
