#include "cc/datapath/cpu_copy.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <thread>

#include "cc/common/thread_guard.h"
#include "cc/datapath/paged_test_util.h"

namespace kvtier {
namespace {

using testing::MakeSlots;
using testing::PagedKv;
using testing::PagedSpec;

struct Variant {
  const char* name;
  PagedSpec spec;
};

// Every kind, and for each a physical order an engine really allocates
// besides the dense one.
std::vector<Variant> Variants(int64_t block_size, int elem_size) {
  const KvDtype dt = elem_size == 4   ? KvDtype::kFloat32
                     : elem_size == 2 ? KvDtype::kFloat16
                                      : KvDtype::kFloat8E4M3;
  auto spec = [&](KvLayoutKind k) {
    PagedSpec s;
    s.kind = k;
    s.layers = 4;
    s.block_size = block_size;
    s.blocks = (133 + 5 + block_size - 1) / block_size + 2;
    s.heads = 3;
    s.head_size = 8;
    s.elem_size = elem_size;
    s.dtype = dt;
    return s;
  };
  std::vector<Variant> v;
  v.push_back({"flash_attn", spec(KvLayoutKind::kFlashAttn)});
  auto s = spec(KvLayoutKind::kFlashAttn);
  s.pad_axis = 1, s.pad = 5;  // padded blocks, KV-first stride kept
  v.push_back({"flash_attn_padded_blocks", s});
  s = spec(KvLayoutKind::kFlashAttn);
  s.order = {5, 1, 0, 3, 2, 4};  // HND inside a block: heads outer, tokens inner
  v.push_back({"flash_attn_hnd", s});
  v.push_back({"flash_infer", spec(KvLayoutKind::kFlashInfer)});
  // vLLM 0.33: [L, B, H, N, C] identity and [B, L, N, H, C] over one buffer.
  v.push_back({"packed_lbhnc", spec(KvLayoutKind::kPackedKv)});
  s = spec(KvLayoutKind::kPackedKv);
  s.order = {0, 4, 2, 1, 3};
  v.push_back({"packed_blnhc_shared", s});
  v.push_back({"vllm_cpu", spec(KvLayoutKind::kVllmCpu)});
  s = spec(KvLayoutKind::kVllmCpu);
  s.order = {0, 4, 1, 2, 3};  // all layers in one buffer, block outermost
  v.push_back({"vllm_cpu_shared", s});
  v.push_back({"mla", spec(KvLayoutKind::kMla)});
  s = spec(KvLayoutKind::kMla);
  s.pad_axis = 1, s.pad = 3;
  v.push_back({"mla_padded_tokens", s});
  return v;
}

TEST(CpuCopy, GatherAndScatterMatchReferenceOverGrid) {
  int cases = 0;
  for (int64_t bs : {16, 32, 128}) {
    for (int es : {1, 2, 4}) {
      for (const Variant& var : Variants(bs, es)) {
        for (size_t n : {size_t{1}, size_t{37}, size_t{133}}) {
          // (block-aligned start, no padding) and (mid-block start, padding).
          for (int64_t start : {int64_t{0}, int64_t{5}}) {
            for (size_t pad : {start == 0 ? size_t{0} : size_t{7}}) {
              for (int threads : {1}) {  // threads: see LargeMultiThreadedRoundTrip
                SCOPED_TRACE(::testing::Message() << var.name << " bs=" << bs << " es=" << es
                                                  << " n=" << n << " start=" << start
                                                  << " pad=" << pad << " threads=" << threads);
                PagedKv kv(var.spec, 17 + cases);
                // Explicit kind: on a CPU device rank 4 auto-detects as vllm_cpu.
                auto lay = PagedKvLayout::Create(kv.Descs(), var.spec.kind);
                ASSERT_TRUE(lay.ok()) << lay.status().ToString();
                const auto slots = MakeSlots(var.spec, n, 99 + cases, start, pad);
                const size_t bytes = lay->ChunkBytes(static_cast<int64_t>(n));
                ASSERT_EQ(bytes, kv.chunk_bytes(n));

                // Gather: padding positions keep their prior bytes.
                std::vector<std::byte> got(bytes, std::byte{0xAB}), want(bytes, std::byte{0xAB});
                ASSERT_TRUE(GatherCpu(*lay, slots, got, threads).ok());
                kv.ReferenceGather(slots, want);
                ASSERT_EQ(got, want);

                // Scatter fresh bytes; compare the whole paged memory with
                // the reference applied to a copy of the original.
                std::vector<std::byte> src(bytes);
                std::mt19937_64 rng(static_cast<unsigned>(cases));
                for (size_t b = 0; b < bytes; b += 8) {
                  const uint64_t r = rng();
                  std::memcpy(src.data() + b, &r, std::min<size_t>(8, bytes - b));
                }
                PagedKv ref(var.spec, 17 + cases);
                ASSERT_TRUE(ScatterCpu(*lay, slots, src, threads).ok());
                ref.ReferenceScatter(slots, src);
                ASSERT_EQ(0, std::memcmp(kv.base(), ref.base(), kv.bytes()));
                ++cases;
              }
            }
          }
        }
      }
    }
  }
  EXPECT_EQ(cases, 3 * 3 * 10 * 3 * 2);
}

TEST(CpuCopy, LargeMultiThreadedRoundTrip) {
  // Big enough that several threads really run (>= 512 KiB each).
  PagedSpec s;
  s.kind = KvLayoutKind::kVllmCpu;
  s.layers = 4, s.block_size = 128, s.blocks = 7, s.heads = 4, s.head_size = 64;
  s.elem_size = 2;
  PagedKv kv(s, 5);
  auto lay = PagedKvLayout::Create(kv.Descs());
  ASSERT_TRUE(lay.ok());
  const auto slots = MakeSlots(s, 600, 3, 17, 11);  // 2.4 MB: 4 threads of >= 512 KiB
  std::vector<std::byte> one(lay->ChunkBytes(600)), many(lay->ChunkBytes(600));
  ASSERT_TRUE(GatherCpu(*lay, slots, one, 1).ok());
  ASSERT_TRUE(GatherCpu(*lay, slots, many, 4).ok());
  EXPECT_EQ(one, many);
  kv.Randomize(77);
  ASSERT_TRUE(ScatterCpu(*lay, slots, many, 4).ok());
  std::vector<std::byte> back(many.size());
  ASSERT_TRUE(GatherCpu(*lay, slots, back, 2).ok());
  // Padding tokens were neither scattered nor gathered: compare real ones.
  std::vector<std::byte> zero_pad = many;
  kv.ReferenceGather(slots, zero_pad);
  EXPECT_EQ(back, zero_pad);
  EXPECT_EQ(back, many);
}

// Layer-wise transfer copies one layer at a time into and out of the
// whole-chunk buffer: layers [b, e) must equal the whole copy's slice, and
// nothing outside them may move, in the buffer or in the paged KV.
TEST(CpuCopy, LayerRangesCopyExactlyTheirSlice) {
  for (const Variant& var : Variants(16, 2)) {
    SCOPED_TRACE(var.name);
    PagedKv kv(var.spec, 41);
    auto lay = PagedKvLayout::Create(kv.Descs(), var.spec.kind);
    ASSERT_TRUE(lay.ok()) << lay.status().ToString();
    const size_t n = 37;
    const auto slots = MakeSlots(var.spec, n, 7, 3, 9);
    const size_t bytes = lay->ChunkBytes(static_cast<int64_t>(n));
    const size_t layer_bytes = lay->LayerBytes(static_cast<int64_t>(n));
    std::vector<std::byte> whole(bytes, std::byte{0x5A});
    ASSERT_TRUE(GatherCpu(*lay, slots, whole, 1).ok());
    for (int b = 0; b <= lay->num_layers(); ++b) {
      for (int e = b; e <= lay->num_layers(); ++e) {
        std::vector<std::byte> part(bytes, std::byte{0x5A});
        ASSERT_TRUE(GatherCpuLayers(*lay, slots, part, b, e, 2).ok());
        for (int l = 0; l < lay->num_layers(); ++l) {
          const auto begin = static_cast<std::ptrdiff_t>(lay->LayerOffset(l, static_cast<int64_t>(n)));
          const bool in = l >= b && l < e;
          std::vector<std::byte> want(layer_bytes, std::byte{0x5A});
          if (in) std::copy(whole.begin() + begin, whole.begin() + begin + layer_bytes, want.begin());
          EXPECT_TRUE(std::equal(want.begin(), want.end(), part.begin() + begin)) << "layer " << l;
        }
      }
    }
    // Scatter of one layer: the paged KV equals the reference scatter of a
    // buffer whose other layers hold what the KV already had.
    std::vector<std::byte> fresh(bytes);
    std::mt19937_64 rng(3);
    for (auto& x : fresh) x = static_cast<std::byte>(rng());
    for (int l = 0; l < lay->num_layers(); ++l) {
      PagedKv got(var.spec, 41), ref(var.spec, 41);
      auto glay = PagedKvLayout::Create(got.Descs(), var.spec.kind);
      ASSERT_TRUE(glay.ok());
      ASSERT_TRUE(ScatterCpuLayers(*glay, slots, fresh, l, l + 1).ok());
      std::vector<std::byte> mixed = whole;  // every layer as the KV holds it ...
      const auto begin = static_cast<std::ptrdiff_t>(lay->LayerOffset(l, static_cast<int64_t>(n)));
      std::copy(fresh.begin() + begin, fresh.begin() + begin + layer_bytes, mixed.begin() + begin);  // ... but l
      ref.ReferenceScatter(slots, mixed);
      EXPECT_EQ(0, std::memcmp(got.base(), ref.base(), got.bytes())) << "layer " << l;
    }
    std::vector<std::byte> buf(bytes);
    EXPECT_EQ(GatherCpuLayers(*lay, slots, buf, 2, 1).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(GatherCpuLayers(*lay, slots, buf, -1, 1).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(ScatterCpuLayers(*lay, slots, buf, 0, lay->num_layers() + 1).code(), StatusCode::kInvalidArgument);
  }
}

// Issue 14 item 7: a refused thread used to throw out of the copy with the
// threads already started still joinable: std::terminate. Now the caller's
// thread copies the refused share and the result is the same.
TEST(CpuCopy, RefusedThreadsStillCopyEverything) {
  PagedSpec s;
  s.kind = KvLayoutKind::kVllmCpu;
  s.layers = 4, s.block_size = 128, s.blocks = 7, s.heads = 4, s.head_size = 64;
  s.elem_size = 2;
  PagedKv kv(s, 6);
  auto lay = PagedKvLayout::Create(kv.Descs());
  ASSERT_TRUE(lay.ok());
  const auto slots = MakeSlots(s, 600, 3, 17, 11);  // 4 threads of >= 512 KiB
  std::vector<std::byte> want(lay->ChunkBytes(600));
  ASSERT_TRUE(GatherCpu(*lay, slots, want, 1).ok());
  for (int skip : {0, 1, 2}) {  // refuse the 1st, 2nd or 3rd extra thread and all after it
    SCOPED_TRACE(skip);
    thread_guard_internal::FailThreadStarts(skip, 100);
    std::vector<std::byte> got(want.size());
    ASSERT_TRUE(GatherCpu(*lay, slots, got, 4).ok());
    EXPECT_EQ(got, want);
    thread_guard_internal::FailThreadStarts(skip, 100);
    kv.Randomize(90 + skip);
    ASSERT_TRUE(ScatterCpu(*lay, slots, want, 4).ok());
    thread_guard_internal::FailThreadStarts(0, 0);
    std::vector<std::byte> back(want.size());
    ASSERT_TRUE(GatherCpu(*lay, slots, back, 1).ok());
    EXPECT_EQ(back, want);
  }
}

TEST(CpuCopy, ConcurrentCallsOnOneLayout) {
  // A layout is shared read-only between threads; disjoint slot sets may be
  // gathered and scattered concurrently.
  PagedSpec s;
  s.kind = KvLayoutKind::kFlashAttn;
  s.layers = 4, s.block_size = 16, s.blocks = 64, s.heads = 2, s.head_size = 32;
  PagedKv kv(s, 9);
  auto lay = PagedKvLayout::Create(kv.Descs());
  ASSERT_TRUE(lay.ok());
  const auto all = MakeSlots(s, 1024, 1);
  std::vector<std::byte> expect(lay->ChunkBytes(1024));
  ASSERT_TRUE(GatherCpu(*lay, all, expect, 1).ok());
  constexpr int kThreads = 4;
  std::vector<std::thread> ts;
  std::vector<int> failures(kThreads, 0);
  for (int t = 0; t < kThreads; ++t) {
    ts.emplace_back([&, t] {
      std::vector<int64_t> mine(all.begin() + t * 256, all.begin() + (t + 1) * 256);
      std::vector<std::byte> buf(lay->ChunkBytes(256));
      for (int it = 0; it < 50; ++it) {
        if (!GatherCpu(*lay, mine, buf, 2).ok()) ++failures[t];
        if (!ScatterCpu(*lay, mine, buf, 2).ok()) ++failures[t];
      }
    });
  }
  for (auto& th : ts) th.join();
  for (int f : failures) EXPECT_EQ(f, 0);
  std::vector<std::byte> after(expect.size());
  ASSERT_TRUE(GatherCpu(*lay, all, after, 1).ok());
  EXPECT_EQ(after, expect);  // round trips left the engine's KV unchanged
}

TEST(CpuCopy, RejectsBadArgumentsWithoutTouchingMemory) {
  PagedSpec s;
  s.kind = KvLayoutKind::kFlashAttn;
  s.layers = 2, s.block_size = 16, s.blocks = 4;
  PagedKv kv(s, 3);
  auto lay = PagedKvLayout::Create(kv.Descs());
  ASSERT_TRUE(lay.ok());
  std::vector<int64_t> slots = {0, 1, 64, 2};
  std::vector<std::byte> buf(lay->ChunkBytes(4), std::byte{1});
  const auto before = buf;
  Status st = GatherCpu(*lay, slots, buf, 1);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("slot_mapping[2] = 64"), std::string_view::npos) << st.ToString();
  EXPECT_EQ(buf, before);
  const std::vector<std::byte> paged(kv.base(), kv.base() + kv.bytes());
  st = ScatterCpu(*lay, slots, buf, 1);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(0, std::memcmp(paged.data(), kv.base(), kv.bytes()));

  slots[2] = 3;
  std::vector<std::byte> small(buf.size() - 1);
  st = GatherCpu(*lay, slots, small, 1);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("need " + std::to_string(buf.size())), std::string_view::npos)
      << st.ToString();
  EXPECT_EQ(GatherCpu(*lay, slots, buf, 0).code(), StatusCode::kInvalidArgument);

  auto descs = kv.Descs(nullptr, DeviceType::kCuda);
  auto gpu = PagedKvLayout::Create(descs, KvLayoutKind::kFlashAttn);
  ASSERT_TRUE(gpu.ok());
  EXPECT_EQ(GatherCpu(*gpu, slots, buf, 1).code(), StatusCode::kFailedPrecondition);

  // Zero tokens is a valid, empty copy.
  EXPECT_TRUE(GatherCpu(*lay, {}, std::span<std::byte>{}, 1).ok());
}

}  // namespace
}  // namespace kvtier
