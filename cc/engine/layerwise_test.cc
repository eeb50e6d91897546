#include "cc/engine/layerwise.h"

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <cstring>
#include <numeric>
#include <random>
#include <thread>

#include "cc/datapath/cpu_copy.h"
#include "cc/datapath/paged_test_util.h"

namespace kvtier {
namespace {

using testing::MakeSlots;
using testing::PagedKv;
using testing::PagedSpec;
using namespace std::chrono_literals;

constexpr uint32_t kChunk = 16;

PagedSpec Spec() {
  PagedSpec s;
  s.kind = KvLayoutKind::kFlashInfer;
  s.layers = 4;
  s.blocks = 24;
  s.block_size = 16;
  s.heads = 2;
  s.head_size = 8;
  return s;
}

std::shared_ptr<Engine> MakeEngine(const PagedKvLayout& lay) {
  EngineOptions o;
  o.hash_namespace.model = "layerwise-test";
  o.hash_namespace.dtype = "float16";
  o.chunk_tokens = kChunk;
  o.cpu.capacity_bytes = 4 << 20;
  o.cpu.chunk_bytes = lay.ChunkBytes(kChunk);
  o.copy_threads = 2;
  auto e = Engine::Create(o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return std::shared_ptr<Engine>(std::move(*e));
}

std::vector<int32_t> Tokens(size_t n, int32_t first) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

// Layer l's whole paged memory (the spec's default order: one dense tensor
// per layer, layer outermost).
std::span<std::byte> LayerMemory(PagedKv& kv, int l) {
  const size_t bytes = kv.bytes() / static_cast<size_t>(kv.spec().layers);
  return {kv.base() + bytes * static_cast<size_t>(l), bytes};
}

// What a whole-chunk gather of `slots` from `kv` produces, chunk by chunk.
std::vector<std::byte> Gathered(PagedKv& kv, const std::vector<int64_t>& slots) {
  auto lay = PagedKvLayout::Create(kv.Descs(), kv.spec().kind);
  EXPECT_TRUE(lay.ok());
  std::vector<std::byte> out;
  for (size_t b = 0; b < slots.size(); b += kChunk) {
    const size_t n = std::min<size_t>(kChunk, slots.size() - b);
    std::vector<std::byte> chunk(lay->ChunkBytes(static_cast<int64_t>(n)));
    EXPECT_TRUE(GatherCpu(*lay, std::span(slots).subspan(b, n), chunk).ok());
    out.insert(out.end(), chunk.begin(), chunk.end());
  }
  return out;
}

// Reads back what the engine holds for tokens, into a fresh paged KV at
// `slots`, and returns the gathered bytes.
std::vector<std::byte> ReadBack(Engine& engine, const std::vector<int32_t>& tokens,
                                const std::vector<int64_t>& slots, size_t* valid) {
  PagedKv dst(Spec(), 999);
  auto lay = PagedKvLayout::Create(dst.Descs(), Spec().kind);
  EXPECT_TRUE(lay.ok());
  auto n = engine.Retrieve(tokens, 0, lay->layout_id(), [&](const ChunkHash& c, std::span<const std::byte> src) {
    return ScatterCpu(*lay, std::span(slots).subspan(c.begin, c.num_tokens), src);
  });
  EXPECT_TRUE(n.ok());
  *valid = n.ok() ? *n : 0;
  return Gathered(dst, slots);
}

// The ordering contract: a layer is read only once it is reported final.
// Every layer holds garbage until the moment just before its LayerReady;
// the stored chunks hold the final bytes of every layer. A fill that read a
// layer early would store garbage (and race with the writes under TSAN).
TEST(LayerwiseStore, ReadsEachLayerOnlyAfterItIsReported) {
  for (bool reverse : {false, true}) {
    SCOPED_TRACE(reverse ? "layers reported in reverse" : "layers reported in order");
    PagedKv kv(Spec(), 1);
    PagedKv final_kv(Spec(), 2);  // what the forward pass will have written
    auto lay = PagedKvLayout::Create(kv.Descs(), Spec().kind);
    ASSERT_TRUE(lay.ok());
    auto engine = MakeEngine(*lay);
    const auto tokens = Tokens(5 * kChunk, 100);
    const auto slots = MakeSlots(Spec(), tokens.size(), 3);

    auto signal = std::make_shared<LayerSignal>(lay->num_layers(), 60s);
    auto h = StoreLayerwise(*engine, *lay, tokens, slots, 0, signal);
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    for (int i = 0; i < lay->num_layers(); ++i) {
      const int l = reverse ? lay->num_layers() - 1 - i : i;
      EXPECT_FALSE((*h)->done()) << "a chunk was stored before its layer " << l << " was final";
      auto src = LayerMemory(final_kv, l);
      std::memcpy(LayerMemory(kv, l).data(), src.data(), src.size());
      ASSERT_TRUE(signal->LayerReady(l).ok());
    }
    ASSERT_TRUE((*h)->Wait(10000).ok());
    EXPECT_EQ((*h)->chunks_stored(), 5u);
    size_t valid = 0;
    EXPECT_EQ(ReadBack(*engine, tokens, slots, &valid), Gathered(final_kv, slots));
    EXPECT_EQ(valid, tokens.size());
  }
}

// Deterministic half of the contract: with one layer never reported (and
// no AllReady) nothing may be stored, whatever the timing; a fill that did
// not wait for its layers would store every chunk.
TEST(LayerwiseStore, OneLayerNeverReportedStoresNothing) {
  PagedKv kv(Spec(), 1);
  auto lay = PagedKvLayout::Create(kv.Descs(), Spec().kind);
  ASSERT_TRUE(lay.ok());
  auto engine = MakeEngine(*lay);
  const auto tokens = Tokens(3 * kChunk, 100);
  const auto slots = MakeSlots(Spec(), tokens.size(), 3);
  auto signal = std::make_shared<LayerSignal>(lay->num_layers(), 100ms);
  auto h = StoreLayerwise(*engine, *lay, tokens, slots, 0, signal);
  ASSERT_TRUE(h.ok());
  for (int l = 0; l + 1 < lay->num_layers(); ++l) ASSERT_TRUE(signal->LayerReady(l).ok());
  Status s = (*h)->Wait(-1);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  EXPECT_EQ((*h)->chunks_stored(), 0u);
  EXPECT_EQ(engine->Lookup(tokens), 0u);
}

TEST(LayerwiseStore, AllReadyCoversLayersNeverReported) {
  PagedKv kv(Spec(), 1);
  auto lay = PagedKvLayout::Create(kv.Descs(), Spec().kind);
  ASSERT_TRUE(lay.ok());
  auto engine = MakeEngine(*lay);
  const auto tokens = Tokens(3 * kChunk, 7);
  const auto slots = MakeSlots(Spec(), tokens.size(), 5);
  auto signal = std::make_shared<LayerSignal>(lay->num_layers(), 60s);
  auto h = StoreLayerwise(*engine, *lay, tokens, slots, kChunk, signal);  // skip chunk 0
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(signal->LayerReady(1).ok());
  EXPECT_FALSE(signal->finished());
  signal->AllReady();
  EXPECT_TRUE(signal->finished());
  ASSERT_TRUE((*h)->Wait(10000).ok());
  EXPECT_EQ((*h)->chunks_stored(), 2u);
  // Chunk 0 was not stored (skip), so nothing of the prefix is cached.
  EXPECT_EQ(engine->Lookup(tokens), 0u);
  std::vector<int32_t> tail(tokens);
  size_t valid = 0;
  (void)ReadBack(*engine, tail, slots, &valid);
  EXPECT_EQ(valid, 0u);
}

TEST(LayerwiseStore, AbortedPassStoresNothing) {
  PagedKv kv(Spec(), 1);
  auto lay = PagedKvLayout::Create(kv.Descs(), Spec().kind);
  ASSERT_TRUE(lay.ok());
  auto engine = MakeEngine(*lay);
  const auto tokens = Tokens(4 * kChunk, 1);
  const auto slots = MakeSlots(Spec(), tokens.size(), 9);
  auto signal = std::make_shared<LayerSignal>(lay->num_layers(), 60s);
  auto h = StoreLayerwise(*engine, *lay, tokens, slots, 0, signal);
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(signal->LayerReady(0).ok());
  signal->Abort();
  Status s = (*h)->Wait(10000);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  EXPECT_NE(s.message().find("aborted"), std::string_view::npos) << s.ToString();
  EXPECT_EQ((*h)->chunks_stored(), 0u);
  EXPECT_EQ(engine->Lookup(tokens), 0u);
  EXPECT_EQ(engine->index().size(), 0u);
  EXPECT_EQ(engine->Stats().store_errors, 4u);
  // AllReady after Abort changes nothing: aborted wins.
  signal->AllReady();
  EXPECT_EQ(signal->WaitLayer(0).code(), StatusCode::kUnavailable);
}

TEST(LayerwiseStore, PassThatNeverEndsTimesOut) {
  PagedKv kv(Spec(), 1);
  auto lay = PagedKvLayout::Create(kv.Descs(), Spec().kind);
  ASSERT_TRUE(lay.ok());
  auto engine = MakeEngine(*lay);
  const auto tokens = Tokens(2 * kChunk, 1);
  const auto slots = MakeSlots(Spec(), tokens.size(), 9);
  auto signal = std::make_shared<LayerSignal>(lay->num_layers(), 50ms);
  auto h = StoreLayerwise(*engine, *lay, tokens, slots, 0, signal);
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(signal->LayerReady(0).ok());
  Status s = (*h)->Wait(-1);  // ends: the deadline bounds every fill
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_NE(s.message().find("in time"), std::string_view::npos) << s.ToString();
  EXPECT_EQ(engine->Lookup(tokens), 0u);
}

TEST(LayerwiseStore, RejectsBadArguments) {
  PagedKv kv(Spec(), 1);
  auto lay = PagedKvLayout::Create(kv.Descs(), Spec().kind);
  ASSERT_TRUE(lay.ok());
  auto engine = MakeEngine(*lay);
  const auto tokens = Tokens(2 * kChunk, 1);
  auto slots = MakeSlots(Spec(), tokens.size(), 9);
  auto wrong = std::make_shared<LayerSignal>(lay->num_layers() + 1, 1s);
  EXPECT_EQ(StoreLayerwise(*engine, *lay, tokens, slots, 0, wrong).status().code(), StatusCode::kInvalidArgument);
  auto signal = std::make_shared<LayerSignal>(lay->num_layers(), 1s);
  EXPECT_EQ(signal->LayerReady(lay->num_layers()).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(signal->LayerReady(-1).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(StoreLayerwise(*engine, *lay, tokens, std::span(slots).first(3), 0, signal).status().code(),
            StatusCode::kInvalidArgument);
  slots[5] = lay->num_slots();
  auto bad = StoreLayerwise(*engine, *lay, tokens, slots, 0, signal);
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->index().size(), 0u);
  // Padding inside a stored chunk: that chunk fails, the other is stored.
  slots[5] = -1;
  signal->AllReady();
  auto padded = StoreLayerwise(*engine, *lay, tokens, slots, 0, signal);
  ASSERT_TRUE(padded.ok());
  EXPECT_EQ((*padded)->Wait(10000).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*padded)->chunks_stored(), 1u);
}

// Stores two requests whole, then loads them layer-wise into a paged KV
// whose other contents must survive.
struct LoadFixture {
  PagedKv src{Spec(), 11};
  PagedKv dst{Spec(), 12};
  PagedKvLayout src_lay = *PagedKvLayout::Create(src.Descs(), Spec().kind);
  PagedKvLayout dst_lay = *PagedKvLayout::Create(dst.Descs(), Spec().kind);
  std::shared_ptr<Engine> engine = MakeEngine(src_lay);
  std::vector<int32_t> a = Tokens(4 * kChunk, 1000), b = Tokens(3 * kChunk + 5, 5000);
  // Source slots, and destination slots in blocks of their own.
  std::vector<int64_t> a_src = MakeSlots(Spec(), a.size(), 1), b_src = MakeSlots(Spec(), b.size(), 2);
  std::vector<int64_t> a_dst, b_dst;

  LoadFixture() {
    for (size_t i = 0; i < a.size(); ++i) a_dst.push_back(static_cast<int64_t>(i));
    for (size_t i = 0; i < b.size(); ++i) b_dst.push_back(static_cast<int64_t>(8 * 16 + i));
    for (auto [t, s] : {std::pair{&a, &a_src}, std::pair{&b, &b_src}}) {
      auto signal = std::make_shared<LayerSignal>(src_lay.num_layers(), 60s);
      signal->AllReady();
      auto h = StoreLayerwise(*engine, src_lay, *t, *s, 0, signal);
      EXPECT_TRUE(h.ok() && (*h)->Wait(10000).ok());
    }
  }
};

// Lets the copy thread through layer by layer.
class Gate {
 public:
  void Open(int layer) {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = layer;
    cv_.notify_all();
  }
  void WaitFor(int layer) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return open_ >= layer; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int open_ = -1;
};

TEST(LayerwiseLoad, EachLayerIsInPlaceWhenItsWaitReturns) {
  LoadFixture f;
  std::vector<LayerwiseRequest> reqs(2);
  reqs[0] = {f.a, f.a_dst, kChunk, std::nullopt};  // the first chunk is already there
  reqs[1] = {f.b, f.b_dst, 0, std::nullopt};
  // The copy thread may copy layer l only once the test opened it, so a
  // WaitLayer that returned early finds its layer not yet copied.
  Gate gate;
  gate.Open(0);
  PagedKv original(Spec(), 12);
  auto load = LayerwiseLoad::Start(f.engine, f.dst_lay, reqs, [&gate](int l) { gate.WaitFor(l); });
  ASSERT_TRUE(load.ok()) << load.status().ToString();
  EXPECT_EQ((*load)->valid_tokens(0), f.a.size());
  EXPECT_EQ((*load)->valid_tokens(1), f.b.size());  // the partial tail too (PartialChunkPolicy::kKeep)
  EXPECT_EQ((*load)->chunks(), 3u + 4u);

  // Per layer, what the whole load will have written once every layer is in.
  PagedKv want(Spec(), 12);
  {
    std::vector<int64_t> a_slots(f.a_dst), b_slots(f.b_dst);
    std::fill(a_slots.begin(), a_slots.begin() + kChunk, -1);
    auto wlay = PagedKvLayout::Create(want.Descs(), Spec().kind);
    auto ga = Gathered(f.src, f.a_src), gb = Gathered(f.src, f.b_src);
    // Chunk by chunk (the gathered buffers are per chunk).
    for (auto [g, sl] : {std::pair{&ga, &a_slots}, std::pair{&gb, &b_slots}}) {
      size_t off = 0;
      for (size_t c = 0; c < sl->size(); c += kChunk) {
        const size_t n = std::min<size_t>(kChunk, sl->size() - c);
        const size_t bytes = wlay->ChunkBytes(static_cast<int64_t>(n));
        ASSERT_TRUE(ScatterCpu(*wlay, std::span(*sl).subspan(c, n), std::span(*g).subspan(off, bytes)).ok());
        off += bytes;
      }
    }
  }
  for (int l = 0; l < f.dst_lay.num_layers(); ++l) {
    ASSERT_TRUE((*load)->WaitLayer(l).ok());
    auto got = LayerMemory(f.dst, l), exp = LayerMemory(want, l);
    EXPECT_EQ(0, std::memcmp(got.data(), exp.data(), got.size())) << "layer " << l;
    if (l + 1 < f.dst_lay.num_layers()) {
      // The copy is held before layer l + 1: that layer is still untouched.
      auto next = LayerMemory(f.dst, l + 1), orig = LayerMemory(original, l + 1);
      EXPECT_EQ(0, std::memcmp(next.data(), orig.data(), next.size())) << "layer " << l + 1;
    }
    gate.Open(l + 1);
  }
  ASSERT_TRUE((*load)->Wait().ok());
  EXPECT_TRUE((*load)->done());
  EXPECT_EQ(0, std::memcmp(f.dst.base(), want.base(), f.dst.bytes()));
  // The leases are gone: Clear can drop every chunk.
  f.engine->Clear();
  EXPECT_EQ(f.engine->Lookup(f.a), 0u);
}

TEST(LayerwiseLoad, MissesBadSlotsAndConcurrentWaiters) {
  LoadFixture f;
  const std::vector<std::byte> before(f.dst.base(), f.dst.base() + f.dst.bytes());
  // A bad slot: nothing moves, nothing is leased.
  std::vector<LayerwiseRequest> bad(1);
  bad[0] = {f.a, f.a_dst, 0, std::nullopt};
  bad[0].slots[3] = f.dst_lay.num_slots();
  auto refused = LayerwiseLoad::Start(f.engine, f.dst_lay, bad);
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(0, std::memcmp(before.data(), f.dst.base(), before.size()));

  // A request nothing is cached for loads nothing and does not stop the other.
  std::vector<LayerwiseRequest> reqs(2);
  reqs[0] = {Tokens(2 * kChunk, 77777), std::vector<int64_t>(f.a_dst.begin(), f.a_dst.begin() + 2 * kChunk), 0,
             std::nullopt};
  reqs[1] = {f.b, f.b_dst, 0, std::nullopt};
  auto load = LayerwiseLoad::Start(f.engine, f.dst_lay, reqs);
  ASSERT_TRUE(load.ok());
  EXPECT_EQ((*load)->valid_tokens(0), 0u);
  EXPECT_GT((*load)->valid_tokens(1), 0u);
  EXPECT_EQ((*load)->WaitLayer(f.dst_lay.num_layers()).code(), StatusCode::kInvalidArgument);
  std::vector<std::thread> waiters;
  std::atomic<int> ok{0};
  for (int t = 0; t < 4; ++t) {
    waiters.emplace_back([&, t] {
      for (int l = t % 2; l < f.dst_lay.num_layers(); ++l) ok += (*load)->WaitLayer(l).ok();
    });
  }
  for (auto& w : waiters) w.join();
  EXPECT_EQ(ok.load(), 2 * 4 + 2 * 3);
  // Request 0's destination slots were never written.
  auto g = Gathered(f.dst, reqs[0].slots);
  PagedKv untouched(Spec(), 12);
  EXPECT_EQ(g, Gathered(untouched, reqs[0].slots));
}

}  // namespace
}  // namespace kvtier
