// GPU gather/scatter bandwidth vs plain copies of the same bytes, same run:
//   gather -> mapped pinned host  vs  cudaMemcpyAsync device -> pinned host
//   scatter <- mapped pinned host vs  cudaMemcpyAsync pinned host -> device
//   gather / scatter device<->device vs cudaMemcpyAsync device -> device
// Each iteration moves a batch of 8 chunks (8 layers x 256 tokens x 8 heads x
// 128 x fp16 = 8 MiB each, 64 MiB) in one launch. Timing uses CUDA events;
// the per-iteration event sync exists only to measure.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <map>
#include <memory>
#include <vector>

#include "cc/common/bench_main.h"
#include "cuda/cuda_check.h"
#include "cc/datapath/paged_test_util.h"
#include "cuda/kv_copy.h"

namespace kvtier {
namespace {

constexpr int kChunks = 8;
constexpr size_t kTokens = 256;

struct Fixture {
  std::unique_ptr<CudaKvLayout> layout;
  size_t chunk_bytes = 0;
  std::vector<ChunkCopy> to_pinned, to_device;
};

cudaStream_t Stream() {
  static cudaStream_t s = [] {
    cudaStream_t st;
    KVT_CHECK_CUDA(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    return st;
  }();
  return s;
}

Fixture& Get(KvLayoutKind kind) {
  static std::map<int, Fixture> cache;
  Fixture& f = cache[static_cast<int>(kind)];
  if (f.layout) return f;
  testing::PagedSpec s;
  s.kind = kind, s.layers = 8, s.block_size = 16, s.heads = 8, s.head_size = 128;
  s.elem_size = 2, s.dtype = KvDtype::kFloat16;
  s.blocks = 2 * kChunks * static_cast<int64_t>(kTokens) / s.block_size;
  testing::PagedKv host(s, 1);
  std::byte* dev = nullptr;
  KVT_CHECK_CUDA(cudaMalloc(&dev, host.bytes()));
  KVT_CHECK_CUDA(cudaMemcpy(dev, host.base(), host.bytes(), cudaMemcpyHostToDevice));
  auto lay = PagedKvLayout::Create(host.Descs(dev, DeviceType::kCuda), kind);
  if (!lay.ok()) std::abort();
  auto cl = CudaKvLayout::Create(*lay);
  if (!cl.ok()) {
    std::fprintf(stderr, "%s\n", cl.status().ToString().c_str());
    std::abort();
  }
  f.layout = std::make_unique<CudaKvLayout>(std::move(*cl));
  f.chunk_bytes = lay->ChunkBytes(kTokens);
  const auto all = testing::MakeSlots(s, kTokens * kChunks, 3);
  for (int c = 0; c < kChunks; ++c) {
    int64_t* ds = nullptr;
    KVT_CHECK_CUDA(cudaMalloc(&ds, kTokens * 8));
    KVT_CHECK_CUDA(cudaMemcpy(ds, all.data() + c * kTokens, kTokens * 8, cudaMemcpyHostToDevice));
    std::byte *pinned = nullptr, *mapped = nullptr, *d = nullptr;
    KVT_CHECK_CUDA(cudaHostAlloc(&pinned, f.chunk_bytes, cudaHostAllocMapped));
    KVT_CHECK_CUDA(cudaHostGetDevicePointer(&mapped, pinned, 0));
    KVT_CHECK_CUDA(cudaMalloc(&d, f.chunk_bytes));
    f.to_pinned.push_back({ds, static_cast<int64_t>(kTokens), mapped, f.chunk_bytes});
    f.to_device.push_back({ds, static_cast<int64_t>(kTokens), d, f.chunk_bytes});
  }
  return f;
}

template <typename Fn>
void TimeWithEvents(benchmark::State& state, size_t bytes, Fn&& fn) {
  cudaEvent_t a, b;
  KVT_CHECK_CUDA(cudaEventCreate(&a));
  KVT_CHECK_CUDA(cudaEventCreate(&b));
  fn();  // warm-up
  KVT_CHECK_CUDA(cudaStreamSynchronize(Stream()));
  for (auto _ : state) {
    KVT_CHECK_CUDA(cudaEventRecord(a, Stream()));
    fn();
    KVT_CHECK_CUDA(cudaEventRecord(b, Stream()));
    KVT_CHECK_CUDA(cudaEventSynchronize(b));  // measurement only
    float ms = 0;
    KVT_CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    state.SetIterationTime(ms / 1e3);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
}

enum Mode { kGatherPinned = 0, kScatterPinned = 1, kGatherDevice = 2, kScatterDevice = 3 };

void BM_KvCopy(benchmark::State& state) {
  Fixture& f = Get(static_cast<KvLayoutKind>(state.range(0)));
  const auto mode = static_cast<Mode>(state.range(1));
  const auto& batch = (mode == kGatherPinned || mode == kScatterPinned) ? f.to_pinned : f.to_device;
  const bool gather = mode == kGatherPinned || mode == kGatherDevice;
  TimeWithEvents(state, f.chunk_bytes * kChunks, [&] {
    Status s = gather ? GatherCuda(*f.layout, batch, Stream()) : ScatterCuda(*f.layout, batch, Stream());
    if (!s.ok()) state.SkipWithError(s.ToString().c_str());
  });
}
BENCHMARK(BM_KvCopy)
    ->ArgNames({"kind", "mode"})
    ->ArgsProduct({{static_cast<int>(KvLayoutKind::kFlashAttn), static_cast<int>(KvLayoutKind::kPackedKv)},
                   {kGatherPinned, kScatterPinned, kGatherDevice, kScatterDevice}})
    ->UseManualTime();

// Baselines: one contiguous copy of the same number of bytes.
void BM_Memcpy(benchmark::State& state) {
  const auto kind = static_cast<cudaMemcpyKind>(state.range(0));
  const size_t bytes = Get(KvLayoutKind::kFlashAttn).chunk_bytes * kChunks;
  static std::map<int, std::pair<void*, void*>> bufs;
  auto& [dst, src] = bufs[state.range(0)];
  if (dst == nullptr) {
    const bool dst_host = kind == cudaMemcpyDeviceToHost;
    const bool src_host = kind == cudaMemcpyHostToDevice;
    KVT_CHECK_CUDA(dst_host ? cudaMallocHost(&dst, bytes) : cudaMalloc(&dst, bytes));
    KVT_CHECK_CUDA(src_host ? cudaMallocHost(&src, bytes) : cudaMalloc(&src, bytes));
  }
  TimeWithEvents(state, bytes,
                 [&] { KVT_CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, kind, Stream())); });
}
BENCHMARK(BM_Memcpy)
    ->ArgName("kind")
    ->Arg(cudaMemcpyDeviceToHost)
    ->Arg(cudaMemcpyHostToDevice)
    ->Arg(cudaMemcpyDeviceToDevice)
    ->UseManualTime();

#define KVT_GPU_CMP(name, kind, mode, base)                                                 \
  KVTIER_BENCH_COMPARE(name, "BM_KvCopy/kind:" #kind "/mode:" #mode "/manual_time",        \
                       "BM_Memcpy/kind:" #base "/manual_time", kvtier::bench::Metric::kBytesPerSecond)

// cudaMemcpyHostToDevice = 1, DeviceToHost = 2, DeviceToDevice = 3.
KVT_GPU_CMP("gpu_gather_pinned_flash_attn_vs_memcpy_d2h", 1, 0, 2);
KVT_GPU_CMP("gpu_scatter_pinned_flash_attn_vs_memcpy_h2d", 1, 1, 1);
KVT_GPU_CMP("gpu_gather_device_flash_attn_vs_memcpy_d2d", 1, 2, 3);
KVT_GPU_CMP("gpu_scatter_device_flash_attn_vs_memcpy_d2d", 1, 3, 3);
KVT_GPU_CMP("gpu_gather_pinned_packed_kv_vs_memcpy_d2h", 3, 0, 2);
KVT_GPU_CMP("gpu_scatter_pinned_packed_kv_vs_memcpy_h2d", 3, 1, 1);
KVT_GPU_CMP("gpu_gather_device_packed_kv_vs_memcpy_d2d", 3, 2, 3);
KVT_GPU_CMP("gpu_scatter_device_packed_kv_vs_memcpy_d2d", 3, 3, 3);

}  // namespace
}  // namespace kvtier
