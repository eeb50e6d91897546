// Allocator fast path: one Allocate+Free pair, against malloc+free of the
// same size in the same run. The pair stays on one class's free list, which
// is the steady state of a cache that recycles chunks.
#include <benchmark/benchmark.h>

#include <cstdlib>

#include "cc/common/bench_main.h"
#include "cc/memory/memory_region.h"
#include "cc/memory/slab_allocator.h"

namespace kvtier {
namespace {

void BM_SlabAllocFree(benchmark::State& state) {
  const auto bytes = static_cast<size_t>(state.range(0));
  auto region = MemoryRegion::Allocate({.bytes = size_t{64} << 20, .prefault = true});
  if (!region.ok()) return state.SkipWithError(region.status().ToString().c_str());
  auto a = SlabAllocator::Create({(*region)->data(), (*region)->size()}, {.chunk_bytes = size_t{1} << 20});
  if (!a.ok()) return state.SkipWithError(a.status().ToString().c_str());
  for (auto _ : state) {
    auto x = (*a)->Allocate(bytes);
    benchmark::DoNotOptimize(x->ptr);
    (*a)->Free(*x);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_SlabAllocFree)->Arg(64 << 10)->Arg(1 << 20);

void BM_MallocFree(benchmark::State& state) {
  const auto bytes = static_cast<size_t>(state.range(0));
  for (auto _ : state) {
    void* p = std::malloc(bytes);
    benchmark::DoNotOptimize(p);
    std::free(p);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_MallocFree)->Arg(64 << 10)->Arg(1 << 20);

// Contention: every thread allocates and frees on the same class.
void BM_SlabAllocFreeThreads(benchmark::State& state) {
  static std::unique_ptr<MemoryRegion> region;
  static std::unique_ptr<SlabAllocator> a;
  if (state.thread_index() == 0) {
    region = std::move(MemoryRegion::Allocate({.bytes = size_t{64} << 20, .prefault = true})).value();
    a = std::move(SlabAllocator::Create({region->data(), region->size()}, {.chunk_bytes = size_t{1} << 20})).value();
  }
  for (auto _ : state) {
    auto x = a->Allocate(size_t{1} << 20);
    benchmark::DoNotOptimize(x->ptr);
    a->Free(*x);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_SlabAllocFreeThreads)->Threads(1)->Threads(2)->UseRealTime();

}  // namespace
}  // namespace kvtier

KVTIER_BENCH_COMPARE("slab_alloc_free_1MiB_vs_malloc_free", "BM_SlabAllocFree/1048576", "BM_MallocFree/1048576",
                     kvtier::bench::Metric::kRealTimeNs);
KVTIER_BENCH_COMPARE("slab_alloc_free_64KiB_vs_malloc_free", "BM_SlabAllocFree/65536", "BM_MallocFree/65536",
                     kvtier::bench::Metric::kRealTimeNs);
