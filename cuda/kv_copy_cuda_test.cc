// CUDA gather/scatter against the CPU reference (GatherCpu / ScatterCpu),
// byte for byte, over layouts x dtypes x block sizes x token counts, with
// padding slots, many layers, batches of chunks, and chunks in both device
// memory and mapped pinned host memory. Needs a GPU (tags: requires-gpu).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "cc/datapath/cpu_copy.h"
#include "cc/datapath/paged_test_util.h"
#include "cuda/kv_copy.h"

namespace kvtier {
namespace {

using testing::MakeSlots;
using testing::PagedKv;
using testing::PagedSpec;

#define CUDA_OK(x) ASSERT_EQ((x), cudaSuccess) << #x << ": " << cudaGetErrorString(x)

class CudaKvCopy : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CudaRuntimeAvailable()) {
      // On the GPU machine a silent skip would read as a pass.
      int n = 0;
      const cudaError_t e = cudaGetDeviceCount(&n);
      if (std::getenv("KVTIER_REQUIRE_GPU") != nullptr) {
        FAIL() << "KVTIER_REQUIRE_GPU is set but no CUDA device is usable: "
               << cudaGetErrorString(e);
      }
      GTEST_SKIP() << "no CUDA device: " << cudaGetErrorString(e);
    }
    CUDA_OK(cudaStreamCreate(&stream_));
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  cudaStream_t stream_ = nullptr;
};

struct Variant {
  const char* name;
  PagedSpec spec;
};

std::vector<Variant> Variants(int64_t bs, int es, int layers) {
  const KvDtype dt = es == 4 ? KvDtype::kFloat32 : es == 2 ? KvDtype::kBFloat16 : KvDtype::kFloat8E4M3;
  auto spec = [&](KvLayoutKind k, int64_t heads, int64_t head) {
    PagedSpec s;
    s.kind = k, s.layers = layers, s.block_size = bs, s.blocks = (700 + bs - 1) / bs + 4;
    s.heads = heads, s.head_size = head, s.elem_size = es, s.dtype = dt;
    return s;
  };
  std::vector<Variant> v;
  v.push_back({"flash_attn", spec(KvLayoutKind::kFlashAttn, 4, 64)});
  auto s = spec(KvLayoutKind::kFlashAttn, 3, 24);  // odd sizes: narrower vectors
  s.pad_axis = 1, s.pad = 3;
  v.push_back({"flash_attn_odd_padded", s});
  v.push_back({"flash_infer", spec(KvLayoutKind::kFlashInfer, 2, 128)});
  v.push_back({"packed_lbhnc", spec(KvLayoutKind::kPackedKv, 4, 64)});
  s = spec(KvLayoutKind::kPackedKv, 4, 64);
  s.order = {0, 4, 2, 1, 3};
  v.push_back({"packed_blnhc_shared", s});
  v.push_back({"vllm_cpu_style", spec(KvLayoutKind::kVllmCpu, 2, 64)});
  v.push_back({"mla", spec(KvLayoutKind::kMla, 1, 576)});
  return v;
}

TEST_F(CudaKvCopy, MatchesCpuReferenceOverGrid) {
  int cases = 0;
  for (int64_t bs : {16, 32, 128}) {
    for (int es : {1, 2, 4}) {
      for (const Variant& var : Variants(bs, es, es == 2 ? 12 : 3)) {
        SCOPED_TRACE(::testing::Message() << var.name << " bs=" << bs << " es=" << es);
        PagedKv host(var.spec, 7 + cases);
        std::byte* dev = nullptr;
        CUDA_OK(cudaMalloc(&dev, host.bytes()));
        CUDA_OK(cudaMemcpy(dev, host.base(), host.bytes(), cudaMemcpyHostToDevice));
        auto cpu_lay = PagedKvLayout::Create(host.Descs(), var.spec.kind);
        auto gpu_lay = PagedKvLayout::Create(host.Descs(dev, DeviceType::kCuda), var.spec.kind);
        ASSERT_TRUE(cpu_lay.ok() && gpu_lay.ok()) << gpu_lay.status().ToString();
        ASSERT_EQ(cpu_lay->layout_id(), gpu_lay->layout_id()) << "ids ignore the device";
        auto cl = CudaKvLayout::Create(*gpu_lay);
        ASSERT_TRUE(cl.ok()) << cl.status().ToString();

        // A batch of chunks: token counts not multiples of block or chunk,
        // mid-block starts, padding; half device, half mapped pinned host.
        const std::vector<size_t> ns = {1, 45, 256, 300};
        std::vector<std::vector<int64_t>> slots;
        std::vector<int64_t*> dslots;
        std::vector<std::byte*> bufs;
        std::vector<bool> pinned;
        std::vector<ChunkCopy> batch;
        for (size_t i = 0; i < ns.size(); ++i) {
          slots.push_back(MakeSlots(var.spec, ns[i], 11 * i + cases, static_cast<int64_t>(i * 5),
                                    i % 2 ? 7 : 0));
          int64_t* ds = nullptr;
          CUDA_OK(cudaMalloc(&ds, ns[i] * 8));
          CUDA_OK(cudaMemcpy(ds, slots[i].data(), ns[i] * 8, cudaMemcpyHostToDevice));
          dslots.push_back(ds);
          const size_t bytes = cpu_lay->ChunkBytes(static_cast<int64_t>(ns[i]));
          std::byte* b = nullptr;
          if (i % 2) {
            CUDA_OK(cudaHostAlloc(&b, bytes, cudaHostAllocMapped));
            std::memset(b, 0x5A, bytes);
            std::byte* mapped = nullptr;
            CUDA_OK(cudaHostGetDevicePointer(&mapped, b, 0));
            batch.push_back({ds, static_cast<int64_t>(ns[i]), mapped, bytes});
          } else {
            CUDA_OK(cudaMalloc(&b, bytes));
            CUDA_OK(cudaMemset(b, 0x5A, bytes));
            batch.push_back({ds, static_cast<int64_t>(ns[i]), b, bytes});
          }
          bufs.push_back(b);
          pinned.push_back(i % 2);
        }
        int* bad = nullptr;
        CUDA_OK(cudaMalloc(&bad, sizeof(int)));
        CUDA_OK(cudaMemset(bad, 0, sizeof(int)));
        ASSERT_TRUE(GatherCuda(*cl, batch, stream_, bad).ok());
        CUDA_OK(cudaStreamSynchronize(stream_));
        int bad_host = -1;
        CUDA_OK(cudaMemcpy(&bad_host, bad, sizeof(int), cudaMemcpyDeviceToHost));
        EXPECT_EQ(bad_host, 0);
        for (size_t i = 0; i < ns.size(); ++i) {
          const size_t bytes = batch[i].chunk_bytes;
          std::vector<std::byte> want(bytes, std::byte{0x5A}), got(bytes);
          ASSERT_TRUE(GatherCpu(*cpu_lay, slots[i], want, 1).ok());
          if (pinned[i]) {
            std::memcpy(got.data(), bufs[i], bytes);
          } else {
            CUDA_OK(cudaMemcpy(got.data(), bufs[i], bytes, cudaMemcpyDeviceToHost));
          }
          ASSERT_EQ(got, want) << "gather chunk " << i << " n=" << ns[i];
        }

        // Scatter new bytes, one chunk per launch in stream order: chunks of
        // this batch may share slots, and the CPU applies them in the same
        // order.
        for (size_t i = 0; i < ns.size(); ++i) {
          const size_t bytes = batch[i].chunk_bytes;
          std::vector<std::byte> src(bytes);
          std::mt19937_64 rng(i + 100 * cases);
          for (size_t b = 0; b < bytes; b += 8) {
            const uint64_t r = rng();
            std::memcpy(src.data() + b, &r, std::min<size_t>(8, bytes - b));
          }
          if (pinned[i]) {
            std::memcpy(bufs[i], src.data(), bytes);
          } else {
            CUDA_OK(cudaMemcpy(bufs[i], src.data(), bytes, cudaMemcpyHostToDevice));
          }
          ASSERT_TRUE(ScatterCuda(*cl, std::span<const ChunkCopy>(&batch[i], 1), stream_).ok());
          ASSERT_TRUE(ScatterCpu(*cpu_lay, slots[i], src, 1).ok());
        }
        CUDA_OK(cudaStreamSynchronize(stream_));
        std::vector<std::byte> dev_now(host.bytes());
        CUDA_OK(cudaMemcpy(dev_now.data(), dev, host.bytes(), cudaMemcpyDeviceToHost));
        ASSERT_EQ(0, std::memcmp(dev_now.data(), host.base(), host.bytes())) << "scatter";

        for (size_t i = 0; i < ns.size(); ++i) {
          cudaFree(dslots[i]);
          if (pinned[i]) cudaFreeHost(bufs[i]); else cudaFree(bufs[i]);
        }
        cudaFree(bad);
        cudaFree(dev);
        ++cases;
      }
    }
  }
  EXPECT_EQ(cases, 3 * 3 * 7);
}

// The layer-range launchers (layer-wise transfer) against GatherCpuLayers /
// ScatterCpuLayers: only the range's slice of the chunk and only those
// layers of the paged KV change, byte for byte as on the CPU.
TEST_F(CudaKvCopy, LayerRangesMatchCpuReference) {
  int cases = 0;
  for (int es : {1, 2}) {
    for (const Variant& var : Variants(16, es, 6)) {
      SCOPED_TRACE(::testing::Message() << var.name << " es=" << es);
      PagedKv host(var.spec, 31 + cases);
      std::byte* dev = nullptr;
      CUDA_OK(cudaMalloc(&dev, host.bytes()));
      CUDA_OK(cudaMemcpy(dev, host.base(), host.bytes(), cudaMemcpyHostToDevice));
      auto cpu_lay = PagedKvLayout::Create(host.Descs(), var.spec.kind);
      auto gpu_lay = PagedKvLayout::Create(host.Descs(dev, DeviceType::kCuda), var.spec.kind);
      ASSERT_TRUE(cpu_lay.ok() && gpu_lay.ok()) << gpu_lay.status().ToString();
      auto cl = CudaKvLayout::Create(*gpu_lay);
      ASSERT_TRUE(cl.ok()) << cl.status().ToString();
      const size_t n = 77;
      const std::vector<int64_t> slots = MakeSlots(var.spec, n, 5 + cases, 3, 4);
      int64_t* ds = nullptr;
      CUDA_OK(cudaMalloc(&ds, n * 8));
      CUDA_OK(cudaMemcpy(ds, slots.data(), n * 8, cudaMemcpyHostToDevice));
      const size_t bytes = cpu_lay->ChunkBytes(static_cast<int64_t>(n));
      std::byte* buf = nullptr;
      CUDA_OK(cudaMalloc(&buf, bytes));
      const ChunkCopy c{ds, static_cast<int64_t>(n), buf, bytes};
      const int L = var.spec.layers;
      const std::vector<std::pair<int, int>> ranges = {{0, 1}, {2, 5}, {L - 1, L}, {3, 3}, {0, L}};
      for (auto [b, e] : ranges) {
        SCOPED_TRACE(::testing::Message() << "layers [" << b << ", " << e << ")");
        std::vector<std::byte> want(bytes, std::byte{0x5A}), got(bytes);
        CUDA_OK(cudaMemset(buf, 0x5A, bytes));
        ASSERT_TRUE(GatherCudaLayers(*cl, {&c, 1}, b, e, stream_).ok());
        CUDA_OK(cudaStreamSynchronize(stream_));
        ASSERT_TRUE(GatherCpuLayers(*cpu_lay, slots, want, b, e, 1).ok());
        CUDA_OK(cudaMemcpy(got.data(), buf, bytes, cudaMemcpyDeviceToHost));
        ASSERT_EQ(got, want) << "gather";

        std::vector<std::byte> src(bytes);
        std::mt19937_64 rng(b * 100 + e + cases);
        for (size_t i = 0; i < bytes; ++i) src[i] = static_cast<std::byte>(rng());
        CUDA_OK(cudaMemcpy(buf, src.data(), bytes, cudaMemcpyHostToDevice));
        ASSERT_TRUE(ScatterCudaLayers(*cl, {&c, 1}, b, e, stream_).ok());
        ASSERT_TRUE(ScatterCpuLayers(*cpu_lay, slots, src, b, e, 1).ok());
        CUDA_OK(cudaStreamSynchronize(stream_));
        std::vector<std::byte> dev_now(host.bytes());
        CUDA_OK(cudaMemcpy(dev_now.data(), dev, host.bytes(), cudaMemcpyDeviceToHost));
        ASSERT_EQ(0, std::memcmp(dev_now.data(), host.base(), host.bytes())) << "scatter";
      }
      for (auto [b, e] : std::vector<std::pair<int, int>>{{-1, 1}, {2, 1}, {0, L + 1}}) {
        EXPECT_EQ(GatherCudaLayers(*cl, {&c, 1}, b, e, stream_).code(), StatusCode::kInvalidArgument);
        EXPECT_EQ(ScatterCudaLayers(*cl, {&c, 1}, b, e, stream_).code(), StatusCode::kInvalidArgument);
      }
      cudaFree(buf);
      cudaFree(ds);
      cudaFree(dev);
      ++cases;
    }
  }
  EXPECT_EQ(cases, 2 * 7);
}

TEST_F(CudaKvCopy, OutOfRangeSlotIsSkippedAndFlagged) {
  PagedSpec s;
  s.kind = KvLayoutKind::kFlashAttn, s.layers = 2, s.blocks = 4, s.block_size = 16;
  PagedKv host(s, 1);
  std::byte* dev = nullptr;
  CUDA_OK(cudaMalloc(&dev, host.bytes()));
  CUDA_OK(cudaMemcpy(dev, host.base(), host.bytes(), cudaMemcpyHostToDevice));
  auto lay = PagedKvLayout::Create(host.Descs(dev, DeviceType::kCuda));
  ASSERT_TRUE(lay.ok());
  auto cl = CudaKvLayout::Create(*lay);
  ASSERT_TRUE(cl.ok());
  const std::vector<int64_t> slots = {1, 64, 2};
  int64_t* ds = nullptr;
  CUDA_OK(cudaMalloc(&ds, 24));
  CUDA_OK(cudaMemcpy(ds, slots.data(), 24, cudaMemcpyHostToDevice));
  std::byte* out = nullptr;
  const size_t bytes = lay->ChunkBytes(3);
  CUDA_OK(cudaMalloc(&out, bytes));
  int* bad = nullptr;
  CUDA_OK(cudaMalloc(&bad, 4));
  CUDA_OK(cudaMemset(bad, 0, 4));
  ChunkCopy c{ds, 3, out, bytes};
  ASSERT_TRUE(GatherCuda(*cl, {&c, 1}, stream_, bad).ok());
  CUDA_OK(cudaStreamSynchronize(stream_));
  int flag = 0;
  CUDA_OK(cudaMemcpy(&flag, bad, 4, cudaMemcpyDeviceToHost));
  EXPECT_EQ(flag, 1);
  ChunkCopy wrong{ds, 3, out, bytes - 2};
  Status st = GatherCuda(*cl, {&wrong, 1}, stream_);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("chunk 0"), std::string_view::npos) << st.ToString();
  cudaFree(bad);
  cudaFree(out);
  cudaFree(ds);
  cudaFree(dev);
}

}  // namespace
}  // namespace kvtier
