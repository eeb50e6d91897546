#include "cc/datapath/kv_layout.h"

#include <gtest/gtest.h>

#include "cc/datapath/paged_test_util.h"

namespace kvtier {
namespace {

using testing::PagedKv;
using testing::PagedSpec;

PagedSpec Spec(KvLayoutKind kind) {
  PagedSpec s;
  s.kind = kind;
  s.layers = 3;
  s.blocks = 5;
  s.block_size = 16;
  s.heads = 4;
  s.head_size = 8;
  return s;
}

void ExpectInvalid(const StatusOr<PagedKvLayout>& r, const std::string& needle) {
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find(needle), std::string_view::npos) << r.status().ToString();
}

TEST(KvLayout, DetectsEveryKindAndDerivesGeometry) {
  struct Case {
    KvLayoutKind kind;
    DeviceType device;
  };
  for (Case c : {Case{KvLayoutKind::kFlashAttn, DeviceType::kCpu},
                 Case{KvLayoutKind::kFlashInfer, DeviceType::kCpu},
                 Case{KvLayoutKind::kPackedKv, DeviceType::kCuda},
                 Case{KvLayoutKind::kVllmCpu, DeviceType::kCpu},
                 Case{KvLayoutKind::kMla, DeviceType::kCpu}}) {
    PagedKv kv(Spec(c.kind));
    auto descs = kv.Descs(nullptr, c.device);
    auto r = PagedKvLayout::Create(descs);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    const PagedKvLayout& lay = *r;
    EXPECT_EQ(lay.kind(), c.kind) << KvLayoutKindName(c.kind);
    EXPECT_EQ(lay.num_layers(), 3);
    EXPECT_EQ(lay.num_blocks(), 5);
    EXPECT_EQ(lay.block_size(), 16);
    EXPECT_EQ(lay.head_size(), 8);
    const bool mla = c.kind == KvLayoutKind::kMla;
    EXPECT_EQ(lay.num_heads(), mla ? 1 : 4);
    EXPECT_EQ(lay.has_v(), !mla);
    EXPECT_EQ(lay.row_bytes(), (mla ? 1u : 4u) * 8u * 2u);
    EXPECT_EQ(lay.ChunkBytes(7), 3 * 7 * lay.row_bytes() * (mla ? 1 : 2));
    EXPECT_EQ(lay.LayerOffset(2, 7), 2 * lay.LayerBytes(7));
    // The derived addresses agree with the kind's own indexing.
    for (int l = 0; l < 3; ++l)
      for (int v = 0; v < kv.planes(); ++v) {
        std::byte* base = v == 0 ? lay.k_base(l) : lay.v_base(l);
        const int64_t b = 3, off = 11, h = mla ? 0 : 2;
        std::byte* got = base + (b * lay.block_stride() + off * lay.token_stride() +
                                 h * lay.head_stride()) * lay.elem_size();
        EXPECT_EQ(got, kv.base() + kv.Index(l, v, b, off, h) * 2) << KvLayoutKindName(c.kind);
      }
  }
}

TEST(KvLayout, ContiguityFlagsFollowStrides) {
  PagedKv fa(Spec(KvLayoutKind::kFlashAttn));
  auto a = PagedKvLayout::Create(fa.Descs());
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE(a->block_rows_contiguous());
  PagedKv cpu(Spec(KvLayoutKind::kVllmCpu));
  auto b = PagedKvLayout::Create(cpu.Descs());
  ASSERT_TRUE(b.ok());
  EXPECT_FALSE(b->token_rows_contiguous());
  // vLLM 0.33 with block-interior order [N, H, C]: each token row (all heads)
  // is adjacent but K and V interleave, so rows are contiguous, runs are not.
  PagedSpec s = Spec(KvLayoutKind::kPackedKv);
  s.order = {4, 0, 2, 1, 3};
  PagedKv packed(s);
  auto c = PagedKvLayout::Create(packed.Descs(nullptr, DeviceType::kCuda));
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->token_rows_contiguous());
}

TEST(KvLayout, LayoutIdIgnoresPointersAndCapacity) {
  PagedKv a(Spec(KvLayoutKind::kFlashAttn));
  PagedSpec bigger = Spec(KvLayoutKind::kFlashAttn);
  bigger.blocks = 50;
  bigger.pad_axis = 1;
  bigger.pad = 3;
  PagedKv b(bigger);
  auto la = PagedKvLayout::Create(a.Descs());
  auto lb = PagedKvLayout::Create(b.Descs());
  ASSERT_TRUE(la.ok() && lb.ok());
  EXPECT_EQ(la->layout_id(), lb->layout_id());
  EXPECT_TRUE(CheckCompatible(*la, lb->layout_id()).ok());
}

TEST(KvLayout, LayoutIdChangesWithEveryMeaningfulProperty) {
  auto id = [](PagedSpec s) {
    PagedKv kv(s);
    auto r = PagedKvLayout::Create(kv.Descs());
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r->layout_id();
  };
  const PagedSpec base = Spec(KvLayoutKind::kFlashAttn);
  const uint64_t id0 = id(base);
  PagedSpec s = base;
  s.layers = 4;
  EXPECT_NE(id(s), id0);
  s = base, s.block_size = 32;
  EXPECT_NE(id(s), id0);
  s = base, s.heads = 2;
  EXPECT_NE(id(s), id0);
  s = base, s.head_size = 16;
  EXPECT_NE(id(s), id0);
  s = base, s.dtype = KvDtype::kBFloat16;
  EXPECT_NE(id(s), id0);
  s = base, s.elem_size = 4, s.dtype = KvDtype::kFloat32;
  EXPECT_NE(id(s), id0);
  s = base, s.kind = KvLayoutKind::kFlashInfer;
  EXPECT_NE(id(s), id0);
}

TEST(KvLayout, LayoutIdIsStableAcrossBuilds) {
  // Chunks outlive processes (disk, remote): the id of a fixed layout must
  // never drift. If the encoding changes on purpose, bump its version tag.
  PagedSpec s = Spec(KvLayoutKind::kFlashAttn);
  s.layers = 32, s.block_size = 16, s.heads = 8, s.head_size = 128;
  s.blocks = 1;
  PagedKv kv(s);
  auto r = PagedKvLayout::Create(kv.Descs());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->layout_id(), 0x59376609e364ff44ULL) << std::hex << r->layout_id();
}

TEST(KvLayout, CheckCompatibleNamesBothIds) {
  PagedKv kv(Spec(KvLayoutKind::kFlashAttn));
  auto r = PagedKvLayout::Create(kv.Descs());
  ASSERT_TRUE(r.ok());
  Status s = CheckCompatible(*r, 0x1234);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("0000000000001234"), std::string_view::npos) << s.ToString();
  EXPECT_NE(s.message().find("flash_attn"), std::string_view::npos);
}

TEST(KvLayout, RejectsBadInputWithClearMessages) {
  PagedKv kv(Spec(KvLayoutKind::kFlashAttn));
  const auto good = kv.Descs();
  ExpectInvalid(PagedKvLayout::Create(std::span<const TensorDesc>{}), "no layers");

  auto d = good;
  d[1].strides[1] += 1;
  ExpectInvalid(PagedKvLayout::Create(d), "layer 1: strides");

  d = good;
  d[2].shape[1] = 6;
  ExpectInvalid(PagedKvLayout::Create(d), "layer 2: shape");

  d = good;
  d[1].dtype = KvDtype::kBFloat16;
  ExpectInvalid(PagedKvLayout::Create(d), "layer 1: dtype bfloat16");

  d = good;
  d[1].device = DeviceType::kCuda;
  ExpectInvalid(PagedKvLayout::Create(d), "layer 1: device cuda:0 differs from layer 0 cpu");

  d = good;
  for (auto& t : d) t.elem_size = 3, t.dtype = KvDtype::kUnknown;
  ExpectInvalid(PagedKvLayout::Create(d), "element size 3");

  d = good;
  for (auto& t : d) t.dtype = KvDtype::kFloat32;
  ExpectInvalid(PagedKvLayout::Create(d), "dtype float32 is 4 bytes");

  d = good;
  for (auto& t : d) t.shape.pop_back(), t.strides.pop_back();
  ExpectInvalid(PagedKvLayout::Create(d, KvLayoutKind::kFlashAttn), "rank 4");
  ExpectInvalid(PagedKvLayout::Create(d, KvLayoutKind::kMla), "rank 4");

  d = good;
  for (auto& t : d) t.shape.push_back(1), t.strides.push_back(1), t.shape.push_back(1),
                    t.strides.push_back(1);
  ExpectInvalid(PagedKvLayout::Create(d), "rank 7");

  d = good;
  d[0].strides.pop_back();
  ExpectInvalid(PagedKvLayout::Create(d), "strides");

  d = good;
  for (auto& t : d) t.strides[4] = 2;
  ExpectInvalid(PagedKvLayout::Create(d), "innermost (head_size) stride is 2");

  d = good;
  d[0].data = nullptr;
  ExpectInvalid(PagedKvLayout::Create(d), "layer 0: null data pointer");

  d = good;
  for (auto& t : d) t.shape[1] = 2;  // [2, 2, ...]: flash_attn or flash_infer?
  ExpectInvalid(PagedKvLayout::Create(d), "ambiguous");
  EXPECT_TRUE(PagedKvLayout::Create(d, KvLayoutKind::kFlashAttn).ok());

  ExpectInvalid(PagedKvLayout::Create(good, KvLayoutKind::kFlashInfer), "needs dim 1 == 2");

  PagedSpec cs = Spec(KvLayoutKind::kVllmCpu);
  cs.pad_axis = 2;  // padded token rows break vLLM CPU's plane view
  cs.pad = 4;
  PagedKv cpu(cs);
  ExpectInvalid(PagedKvLayout::Create(cpu.Descs()), "vllm_cpu needs a dense");
  // The same strides are fine for the GPU packed layout, which indexes per token.
  EXPECT_TRUE(PagedKvLayout::Create(cpu.Descs(), KvLayoutKind::kPackedKv).ok());

  d = cpu.Descs();
  for (auto& t : d) t.shape[3] = 15;
  ExpectInvalid(PagedKvLayout::Create(d, KvLayoutKind::kPackedKv), "even last dim");
}

TEST(KvLayout, CheckSlotsNamesTheBadSlot) {
  PagedKv kv(Spec(KvLayoutKind::kFlashAttn));
  auto r = PagedKvLayout::Create(kv.Descs());
  ASSERT_TRUE(r.ok());
  std::vector<int64_t> slots = {0, -1, 79, 80, 3};
  Status s = CheckSlots(*r, slots);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("slot_mapping[3] = 80"), std::string_view::npos) << s.ToString();
  slots[3] = -7;
  EXPECT_TRUE(CheckSlots(*r, slots).ok());
}

TEST(KvLayout, CheckNoPaddingNamesTheChunk) {
  std::vector<int64_t> slots = {4, 5, -1, 7};
  Status s = CheckNoPadding(slots, 512);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("chunk at token 512 has padding slots"), std::string_view::npos) << s.ToString();
  slots[2] = 6;
  EXPECT_TRUE(CheckNoPadding(slots, 512).ok());
}

TEST(KvLayout, ParsesNames) {
  EXPECT_EQ(*ParseKvLayoutKind("vllm_cpu"), KvLayoutKind::kVllmCpu);
  EXPECT_EQ(ParseKvLayoutKind("nhd").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(*ParseKvDtype("torch.bfloat16"), KvDtype::kBFloat16);
  EXPECT_EQ(*ParseKvDtype("float8_e4m3fn"), KvDtype::kFloat8E4M3);
  EXPECT_EQ(ParseKvDtype("torch.complex64").status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvtier
