// Engine-level GPU store and load (CudaPagedIo) against cudaMemcpyAsync of
// the same bytes between device memory and pinned host memory, same run.
// A request of 2048 tokens (8 chunks of 256) of a 32-layer model with 8 KV
// heads of 128 in fp16: 128 KiB per token, 256 MiB per request.
//   store:  Store() .. handle Wait()   (hash, catalogue, gather into slabs)
//   load:   Retrieve() .. Wait()       (lease, upload slots, scatter)
//   layerwise load:  CudaLayerwiseLoad::Start .. Wait (32 layers, one launch
//                    and one event each, on the load's own stream)
//   layerwise store: CudaStoreLayerwise with every layer reported at once
// The layer-wise rows against the whole-chunk ones give the cost of moving
// a layer at a time (more launches, smaller copies); the overlap they buy
// with a model's compute is `kvtier bench gpu-layerwise`.
// Wall-clock times (manual), since the store runs on the engine's threads.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <numeric>

#include "cc/common/bench_main.h"
#include "cuda/cuda_check.h"
#include "cc/datapath/paged_test_util.h"
#include "cuda/layerwise_io.h"
#include "cuda/paged_io.h"

namespace kvtier {
namespace {

constexpr size_t kTokens = 2048;

struct Setup {
  std::shared_ptr<Engine> engine;
  std::shared_ptr<CudaPagedIo> io;
  std::vector<int32_t> tokens;
  std::vector<int64_t> slots;
  cudaStream_t stream = nullptr;
  size_t bytes = 0;
};

// One engine per number of copy threads (the store's parallelism).
Setup& Get(int copy_threads = 2) {
  // Leaked on purpose: no CUDA teardown after the runtime's own at exit.
  static auto* cache = new std::map<int, Setup>;
  auto it = cache->find(copy_threads);
  if (it != cache->end()) return it->second;
  Setup& s = (*cache)[copy_threads];
  {
    testing::PagedSpec spec;
    spec.kind = KvLayoutKind::kFlashAttn, spec.layers = 32, spec.block_size = 16, spec.heads = 8;
    spec.head_size = 128, spec.elem_size = 2, spec.dtype = KvDtype::kFloat16;
    spec.blocks = 2 * kTokens / spec.block_size;
    testing::PagedKv host(spec, 1);
    std::byte* dev = nullptr;
    KVT_CHECK_CUDA(cudaMalloc(&dev, host.bytes()));
    KVT_CHECK_CUDA(cudaMemcpy(dev, host.base(), host.bytes(), cudaMemcpyHostToDevice));
    auto lay = PagedKvLayout::Create(host.Descs(dev, DeviceType::kCuda), spec.kind);
    KVT_CHECK_OK(lay);
    EngineOptions o;
    o.hash_namespace.model = "bench";
    o.chunk_tokens = 256;
    o.cpu.capacity_bytes = size_t{1} << 30;
    o.cpu.chunk_bytes = lay->ChunkBytes(256);
    o.copy_threads = static_cast<size_t>(copy_threads);
    auto eng = Engine::Create(o);
    KVT_CHECK_OK(eng);
    s.engine = std::shared_ptr<Engine>(std::move(*eng));
    auto io = CudaPagedIo::Create(s.engine, *lay);
    KVT_CHECK_OK(io);
    s.io = *io;
    s.tokens.resize(kTokens);
    std::iota(s.tokens.begin(), s.tokens.end(), 1);
    s.slots = testing::MakeSlots(spec, kTokens, 3);
    s.bytes = lay->ChunkBytes(kTokens);
    KVT_CHECK_CUDA(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
  }
  return s;
}

double Seconds(std::chrono::steady_clock::time_point a) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
}

void BM_CudaStore(benchmark::State& state) {
  Setup& s = Get(static_cast<int>(state.range(0)));
  for (auto _ : state) {
    s.engine->Clear();
    const auto t0 = std::chrono::steady_clock::now();
    auto h = s.io->Store(s.tokens, s.slots, 0, s.stream);
    KVT_CHECK_OK(h);
    if (!(*h)->Wait().ok() || (*h)->chunks_stored() != kTokens / 256) {
      state.SkipWithError("store failed");
      break;
    }
    state.SetIterationTime(Seconds(t0));
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * s.bytes));
}
BENCHMARK(BM_CudaStore)->ArgName("copy_threads")->Arg(2)->Arg(8)->UseManualTime();

void BM_CudaLoad(benchmark::State& state) {
  Setup& s = Get();
  if (s.engine->Lookup(s.tokens) != kTokens) {
    auto h = s.io->Store(s.tokens, s.slots, 0, s.stream);
    KVT_CHECK_OK(h);
    (void)(*h)->Wait();
  }
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    auto load = s.io->Retrieve(s.tokens, s.slots, 0, s.stream);
    KVT_CHECK_OK(load);
    if (!(*load)->Wait().ok() || (*load)->valid_tokens() != kTokens) {
      state.SkipWithError("load failed");
      break;
    }
    state.SetIterationTime(Seconds(t0));
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * s.bytes));
}
BENCHMARK(BM_CudaLoad)->UseManualTime();

void BM_CudaLayerwiseLoad(benchmark::State& state) {
  Setup& s = Get();
  if (s.engine->Lookup(s.tokens) != kTokens) {
    auto h = s.io->Store(s.tokens, s.slots, 0, s.stream);
    KVT_CHECK_OK(h);
    (void)(*h)->Wait();
  }
  for (auto _ : state) {
    std::vector<LayerwiseRequest> reqs(1);
    reqs[0].tokens = s.tokens;
    reqs[0].slots = s.slots;
    const auto t0 = std::chrono::steady_clock::now();
    auto load = CudaLayerwiseLoad::Start(s.io, std::move(reqs), s.stream);
    KVT_CHECK_OK(load);
    if (!(*load)->Wait().ok() || (*load)->valid_tokens(0) != kTokens) {
      state.SkipWithError("layer-wise load failed");
      break;
    }
    state.SetIterationTime(Seconds(t0));
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * s.bytes));
}
BENCHMARK(BM_CudaLayerwiseLoad)->UseManualTime();

void BM_CudaLayerwiseStore(benchmark::State& state) {
  Setup& s = Get();
  for (auto _ : state) {
    s.engine->Clear();
    auto signal = CudaLayerSignal::Create(s.io->layout().device_index(), s.io->layout().num_layers(),
                                          std::chrono::seconds(60));
    KVT_CHECK_OK(signal);
    const auto t0 = std::chrono::steady_clock::now();
    auto h = CudaStoreLayerwise(*s.io, s.tokens, s.slots, 0, *signal);
    KVT_CHECK_OK(h);
    bool reported = true;
    for (int l = 0; l < (*signal)->num_layers(); ++l) reported = reported && (*signal)->LayerReady(l, s.stream).ok();
    if (!reported || !(*h)->Wait().ok() || (*h)->chunks_stored() != kTokens / 256) {
      state.SkipWithError("layer-wise store failed");
      break;
    }
    state.SetIterationTime(Seconds(t0));
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * s.bytes));
}
BENCHMARK(BM_CudaLayerwiseStore)->UseManualTime();

// What the first GPU store/retrieve costs: registering (pinning) a CPU tier
// of 4 GiB with CUDA. A fresh engine per iteration, so the pages are new.
void BM_RegisterCpuTier(benchmark::State& state) {
  Setup& base = Get();
  const size_t bytes = size_t{4} << 30;
  for (auto _ : state) {
    state.PauseTiming();
    EngineOptions o;
    o.hash_namespace.model = "bench-register";
    o.chunk_tokens = 256;
    o.cpu.capacity_bytes = bytes;
    o.cpu.chunk_bytes = base.io->layout().ChunkBytes(256);
    auto eng = Engine::Create(o);
    KVT_CHECK_OK(eng);
    std::shared_ptr<Engine> engine(std::move(*eng));
    state.ResumeTiming();
    auto io = CudaPagedIo::Create(engine, base.io->layout());
    KVT_CHECK_OK(io);
    state.PauseTiming();
    io->reset();  // unregisters
    engine.reset();
    state.ResumeTiming();
  }
  state.counters["GiB"] = static_cast<double>(bytes >> 30);
}
BENCHMARK(BM_RegisterCpuTier)->Iterations(3)->Unit(benchmark::kMillisecond);

// Baseline: one contiguous cudaMemcpyAsync of the same bytes, pinned host.
void BM_PinnedMemcpy(benchmark::State& state) {
  Setup& s = Get();
  const bool to_host = state.range(0) == 0;
  static void *host = nullptr, *dev = nullptr;
  if (host == nullptr) {
    KVT_CHECK_CUDA(cudaMallocHost(&host, s.bytes));
    KVT_CHECK_CUDA(cudaMalloc(&dev, s.bytes));
  }
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    KVT_CHECK_CUDA(to_host ? cudaMemcpyAsync(host, dev, s.bytes, cudaMemcpyDeviceToHost, s.stream)
                       : cudaMemcpyAsync(dev, host, s.bytes, cudaMemcpyHostToDevice, s.stream));
    KVT_CHECK_CUDA(cudaStreamSynchronize(s.stream));
    state.SetIterationTime(Seconds(t0));
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * s.bytes));
}
BENCHMARK(BM_PinnedMemcpy)->ArgName("d2h0_h2d1")->Arg(0)->Arg(1)->UseManualTime();

KVTIER_BENCH_COMPARE("gpu_engine_store_vs_memcpy_d2h", "BM_CudaStore/copy_threads:2/manual_time",
                     "BM_PinnedMemcpy/d2h0_h2d1:0/manual_time", kvtier::bench::Metric::kBytesPerSecond);
KVTIER_BENCH_COMPARE("gpu_engine_store_8_threads_vs_memcpy_d2h", "BM_CudaStore/copy_threads:8/manual_time",
                     "BM_PinnedMemcpy/d2h0_h2d1:0/manual_time", kvtier::bench::Metric::kBytesPerSecond);
KVTIER_BENCH_COMPARE("gpu_engine_load_vs_memcpy_h2d", "BM_CudaLoad/manual_time",
                     "BM_PinnedMemcpy/d2h0_h2d1:1/manual_time", kvtier::bench::Metric::kBytesPerSecond);
KVTIER_BENCH_COMPARE("gpu_layerwise_load_vs_whole_load", "BM_CudaLayerwiseLoad/manual_time",
                     "BM_CudaLoad/manual_time", kvtier::bench::Metric::kBytesPerSecond);
KVTIER_BENCH_COMPARE("gpu_layerwise_store_vs_whole_store", "BM_CudaLayerwiseStore/manual_time",
                     "BM_CudaStore/copy_threads:2/manual_time", kvtier::bench::Metric::kBytesPerSecond);

}  // namespace
}  // namespace kvtier
