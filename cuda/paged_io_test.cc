// CudaPagedIo end to end on a GPU: paged KV in device memory -> engine (CPU
// tier registered with CUDA) -> back into zeroed device KV, checked byte for
// byte against the CPU reference over the same host copy of the KV. Tagged
// requires-gpu; tools/device_check.sh runs it on a lent GPU machine.
#include "cuda/paged_io.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <optional>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>

#include "cc/datapath/cpu_copy.h"
#include "cc/datapath/paged_test_util.h"
#include "cuda/layerwise_io.h"

namespace kvtier {
namespace {

constexpr uint32_t kChunkTokens = 256;

class CudaPagedIoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
      if (std::getenv("KVTIER_REQUIRE_GPU") != nullptr) {
        FAIL() << "KVTIER_REQUIRE_GPU is set but no CUDA device is usable: " << cudaGetErrorString(e);
      }
      GTEST_SKIP() << "no CUDA device";
    }
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), cudaSuccess);
  }
  void TearDown() override {
    io_.reset();
    if (dev_ != nullptr) cudaFree(dev_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  // Paged KV of `spec` (random bytes) on the device, an engine sized for it
  // and a CudaPagedIo over both.
  void Build(const testing::PagedSpec& spec, size_t cpu_bytes = 256 << 20) {
    host_ = std::make_unique<testing::PagedKv>(spec, 11);
    ASSERT_EQ(cudaMalloc(&dev_, host_->bytes()), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(dev_, host_->base(), host_->bytes(), cudaMemcpyHostToDevice), cudaSuccess);
    auto lay = PagedKvLayout::Create(host_->Descs(dev_, DeviceType::kCuda), spec.kind);
    ASSERT_TRUE(lay.ok()) << lay.status().ToString();
    layout_opt_ = *lay;
    auto host_lay = PagedKvLayout::Create(host_->Descs(), spec.kind);
    ASSERT_TRUE(host_lay.ok());
    host_layout_opt_ = *host_lay;
    EngineOptions o;
    o.hash_namespace.model = "cuda-paged-io-test";
    o.chunk_tokens = kChunkTokens;
    o.cpu.capacity_bytes = cpu_bytes;
    o.cpu.chunk_bytes = layout().ChunkBytes(kChunkTokens);
    auto eng = Engine::Create(o);
    ASSERT_TRUE(eng.ok()) << eng.status().ToString();
    engine_ = std::shared_ptr<Engine>(std::move(*eng));
    auto io = CudaPagedIo::Create(engine_, layout());
    ASSERT_TRUE(io.ok()) << io.status().ToString();
    io_ = *io;
  }

  // The device KV, downloaded.
  std::vector<std::byte> Download() {
    std::vector<std::byte> out(host_->bytes());
    EXPECT_EQ(cudaMemcpy(out.data(), dev_, out.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }

  // Gathers `slots` out of a host image of the KV with the CPU reference.
  std::vector<std::byte> GatherHost(std::byte* image, const std::vector<int64_t>& slots) {
    auto lay = PagedKvLayout::Create(host_->Descs(image), host_->spec().kind);
    EXPECT_TRUE(lay.ok());
    std::vector<std::byte> out(lay->ChunkBytes(static_cast<int64_t>(slots.size())), std::byte{0});
    EXPECT_TRUE(GatherCpu(*lay, slots, out, 1).ok());
    return out;
  }

  std::unique_ptr<testing::PagedKv> host_;
  std::byte* dev_ = nullptr;
  std::optional<PagedKvLayout> layout_opt_, host_layout_opt_;
  const PagedKvLayout& layout() const { return *layout_opt_; }
  std::shared_ptr<Engine> engine_;
  std::shared_ptr<CudaPagedIo> io_;
  cudaStream_t stream_ = nullptr;
};

std::vector<int32_t> Tokens(size_t n, int32_t first) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

testing::PagedSpec Spec(KvLayoutKind kind, int elem_size, int64_t block_size) {
  testing::PagedSpec s;
  s.kind = kind;
  s.layers = 4;
  s.block_size = block_size;
  s.heads = 4;
  s.head_size = 64;
  s.elem_size = elem_size;
  s.dtype = elem_size == 1 ? KvDtype::kUInt8 : elem_size == 2 ? KvDtype::kFloat16 : KvDtype::kFloat32;
  s.blocks = 2048 / block_size;
  return s;
}

class RoundTrip : public CudaPagedIoTest,
                  public ::testing::WithParamInterface<std::tuple<KvLayoutKind, int, int64_t>> {};

TEST_P(RoundTrip, StoreZeroRetrieveIsByteExact) {
  const auto [kind, elem, block] = GetParam();
  Build(Spec(kind, elem, block));
  const size_t n = 700;  // two full chunks and a 188-token tail
  auto tokens = Tokens(n, 100);
  auto slots = testing::MakeSlots(host_->spec(), n, 5);
  const auto want = GatherHost(host_->base(), slots);

  auto h = io_->Store(tokens, slots, 0, stream_);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  ASSERT_TRUE((*h)->Wait().ok()) << (*h)->Wait().ToString();
  EXPECT_EQ(engine_->Stats().chunks_stored, 3u);
  EXPECT_EQ(engine_->Lookup(tokens), n);

  // What reached the CPU tier is the CPU reference's gather, chunk by chunk.
  auto prefix = engine_->AcquirePrefix(tokens, 0, layout().layout_id());
  ASSERT_TRUE(prefix.ok());
  ASSERT_EQ(prefix->chunks.size(), 3u);
  for (size_t i = 0; i < prefix->chunks.size(); ++i) {
    const ChunkHash& c = prefix->chunks[i];
    std::vector<int64_t> s(slots.begin() + c.begin, slots.begin() + c.begin + c.num_tokens);
    auto ref = GatherHost(host_->base(), s);
    auto got = prefix->leases[i].data();
    ASSERT_EQ(got.size(), ref.size());
    EXPECT_EQ(std::memcmp(got.data(), ref.data(), ref.size()), 0) << "chunk " << i;
  }
  prefix->leases.clear();

  ASSERT_EQ(cudaMemset(dev_, 0, host_->bytes()), cudaSuccess);
  auto load = io_->Retrieve(tokens, slots, 0, stream_);
  ASSERT_TRUE(load.ok()) << load.status().ToString();
  EXPECT_EQ((*load)->valid_tokens(), n);
  EXPECT_EQ((*load)->chunks(), 3u);
  ASSERT_TRUE((*load)->Wait().ok());
  EXPECT_TRUE((*load)->done());
  auto image = Download();
  EXPECT_EQ(GatherHost(image.data(), slots), want);
  // Nothing but the request's slots was written.
  std::vector<int64_t> others;
  std::vector<bool> used(static_cast<size_t>(layout().num_slots()), false);
  for (int64_t s : slots) used[static_cast<size_t>(s)] = true;
  for (int64_t s = 0; s < layout().num_slots(); ++s)
    if (!used[static_cast<size_t>(s)]) others.push_back(s);
  const auto rest = GatherHost(image.data(), others);
  EXPECT_TRUE(std::all_of(rest.begin(), rest.end(), [](std::byte b) { return b == std::byte{0}; }));
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, RoundTrip,
    ::testing::Values(std::make_tuple(KvLayoutKind::kFlashAttn, 2, int64_t{16}),
                      std::make_tuple(KvLayoutKind::kFlashInfer, 2, int64_t{32}),
                      std::make_tuple(KvLayoutKind::kPackedKv, 1, int64_t{16}),
                      std::make_tuple(KvLayoutKind::kMla, 2, int64_t{128}),
                      std::make_tuple(KvLayoutKind::kFlashAttn, 4, int64_t{128})));

// Key extras reach the engine: a salted store is invisible without the salt
// and under another salt, and a retrieve under another salt loads nothing.
TEST_F(CudaPagedIoTest, KeyExtrasSeparateStoresAndLoads) {
  Build(Spec(KvLayoutKind::kFlashAttn, 2, 16));
  const size_t n = 512;
  auto tokens = Tokens(n, 11);
  auto slots = testing::MakeSlots(host_->spec(), n, 3);
  KeyExtras a, b;
  a.salt = IdentityKey("lora:a");
  b.salt = IdentityKey("lora:b");
  auto h = io_->Store(tokens, slots, 0, stream_, &a);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  ASSERT_TRUE((*h)->Wait().ok());
  EXPECT_EQ(engine_->Lookup(tokens, &a), n);
  EXPECT_EQ(engine_->Lookup(tokens), 0u);
  EXPECT_EQ(engine_->Lookup(tokens, &b), 0u);
  auto miss = io_->Retrieve(tokens, slots, 0, stream_, &b);
  ASSERT_TRUE(miss.ok());
  EXPECT_EQ((*miss)->valid_tokens(), 0u);
  auto hit = io_->Retrieve(tokens, slots, 0, stream_, &a);
  ASSERT_TRUE(hit.ok());
  EXPECT_EQ((*hit)->valid_tokens(), n);
  ASSERT_TRUE((*hit)->Wait().ok());
  KeyExtras bad;
  bad.spans = {{5, 5, IdentityKey("x")}};
  EXPECT_EQ(io_->Store(tokens, slots, 0, stream_, &bad).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(io_->Retrieve(tokens, slots, 0, stream_, &bad).status().code(), StatusCode::kInvalidArgument);
}

TEST_F(CudaPagedIoTest, SkipTokensAreNotWrittenAndPaddingIsSkipped) {
  Build(Spec(KvLayoutKind::kFlashAttn, 2, 16));
  const size_t n = 512;
  auto tokens = Tokens(n, 7);
  auto slots = testing::MakeSlots(host_->spec(), n, 9);
  auto h = io_->Store(tokens, slots, 0, stream_);
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE((*h)->Wait().ok());
  ASSERT_EQ(cudaMemset(dev_, 0, host_->bytes()), cudaSuccess);
  auto dst = slots;
  dst[300] = -1;  // padding: left alone
  auto load = io_->Retrieve(tokens, dst, /*skip_tokens=*/256, stream_);
  ASSERT_TRUE(load.ok());
  EXPECT_EQ((*load)->valid_tokens(), n);
  EXPECT_EQ((*load)->chunks(), 1u);  // the first chunk is the caller's
  ASSERT_TRUE((*load)->Wait().ok());
  auto image = Download();
  auto got = GatherHost(image.data(), slots);
  auto want = GatherHost(host_->base(), slots);
  const size_t row = got.size() / (n * 2 * 4);  // bytes per token per plane per layer
  for (int layer = 0; layer < 4; ++layer)
    for (int kv = 0; kv < 2; ++kv)
      for (size_t t = 0; t < n; ++t) {
        const size_t off = ((static_cast<size_t>(layer) * 2 + kv) * n + t) * row;
        const bool loaded = t >= 256 && t != 300;
        for (size_t b = 0; b < row; ++b) {
          const std::byte expect = loaded ? want[off + b] : std::byte{0};
          ASSERT_EQ(got[off + b], expect) << "layer " << layer << " kv " << kv << " token " << t;
        }
      }
}

TEST_F(CudaPagedIoTest, BadInputIsRefusedBeforeAnythingMoves) {
  Build(Spec(KvLayoutKind::kFlashAttn, 2, 16));
  auto tokens = Tokens(300, 1);
  auto slots = testing::MakeSlots(host_->spec(), 300, 2);

  auto short_slots = std::vector<int64_t>(slots.begin(), slots.end() - 1);
  auto h = io_->Store(tokens, short_slots, 0, stream_);
  EXPECT_EQ(h.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(h.status().message().find("one slot per token"), std::string::npos) << h.status().ToString();

  auto out_of_range = slots;
  out_of_range[17] = layout().num_slots();
  h = io_->Store(tokens, out_of_range, 0, stream_);
  EXPECT_EQ(h.status().code(), StatusCode::kInvalidArgument) << h.status().ToString();
  auto load = io_->Retrieve(tokens, out_of_range, 0, stream_);
  EXPECT_EQ(load.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->Stats().store_requests, 0u);

  // Padding in a chunk to store: that chunk fails, the handle says why.
  auto padded = slots;
  padded[10] = -1;
  h = io_->Store(tokens, padded, 0, stream_);
  ASSERT_TRUE(h.ok());
  Status s = (*h)->Wait();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("padding"), std::string::npos) << s.ToString();
  EXPECT_EQ(engine_->Lookup(tokens), 0u);  // the first chunk failed: no prefix

  // A CPU layout cannot drive the CUDA path.
  auto cpu_io = CudaPagedIo::Create(engine_, *host_layout_opt_);
  EXPECT_EQ(cpu_io.status().code(), StatusCode::kFailedPrecondition) << cpu_io.status().ToString();
}

// The leases of a load in flight keep its chunks: Clear() right after
// Retrieve() must not take memory the kernels still read.
TEST_F(CudaPagedIoTest, LoadInFlightSurvivesClear) {
  Build(Spec(KvLayoutKind::kFlashInfer, 2, 16));
  const size_t n = 1024;
  auto tokens = Tokens(n, 3);
  auto slots = testing::MakeSlots(host_->spec(), n, 4);
  auto want = GatherHost(host_->base(), slots);
  auto h = io_->Store(tokens, slots, 0, stream_);
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE((*h)->Wait().ok());
  ASSERT_EQ(cudaMemset(dev_, 0, host_->bytes()), cudaSuccess);
  auto load = io_->Retrieve(tokens, slots, 0, stream_);
  ASSERT_TRUE(load.ok());
  engine_->Clear();
  EXPECT_EQ(engine_->cpu_tier()->Stats().entries, 4u);  // leased until Wait/done/destruction
  ASSERT_TRUE((*load)->Wait().ok());
  auto image = Download();
  EXPECT_EQ(GatherHost(image.data(), slots), want);
  load->reset();
  engine_->Clear();
  EXPECT_EQ(engine_->cpu_tier()->Stats().entries, 0u);
}

// The caller may drop the engine and the data path as soon as a store's
// handle is done: the copy threads hold neither, so the engine is never
// destroyed on one of its own threads (which would have to join itself).
TEST_F(CudaPagedIoTest, DroppingEverythingRightAfterAStoreIsSafe) {
  Build(Spec(KvLayoutKind::kFlashAttn, 2, 16));
  auto tokens = Tokens(1024, 5);
  auto slots = testing::MakeSlots(host_->spec(), 1024, 6);
  for (int round = 0; round < 20; ++round) {
    EngineOptions o;
    o.hash_namespace.model = "drop-test";
    o.chunk_tokens = kChunkTokens;
    o.cpu.capacity_bytes = 64 << 20;
    o.cpu.chunk_bytes = layout().ChunkBytes(kChunkTokens);
    o.copy_threads = 4;
    auto eng = Engine::Create(o);
    ASSERT_TRUE(eng.ok());
    std::shared_ptr<Engine> engine(std::move(*eng));
    auto io = CudaPagedIo::Create(engine, layout());
    ASSERT_TRUE(io.ok());
    auto h = (*io)->Store(tokens, slots, 0, stream_);
    ASSERT_TRUE(h.ok());
    ASSERT_TRUE((*h)->Wait().ok());
    io->reset();
    engine.reset();  // the last reference, on this thread
  }
}

// Many threads, each with its own stream, store and load their own prompts
// (sharing a common prefix) at once.
TEST_F(CudaPagedIoTest, ConcurrentStoresAndLoads) {
  Build(Spec(KvLayoutKind::kFlashAttn, 2, 16), 512 << 20);
  const int kThreads = 4;
  // Per thread 512 tokens: chunk 0 is the same prompt prefix in the same
  // slots for everyone (same tokens, same KV, as in an engine's prefix
  // cache), chunk 1 is the thread's own, in slots of its own.
  const size_t n = 512;
  auto all_slots = testing::MakeSlots(host_->spec(), 256 * (kThreads + 1), 8);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  std::mutex mu;
  std::vector<std::string> why;
  auto fail = [&](const char* what, const Status& s) {
    failures++;
    std::lock_guard<std::mutex> lock(mu);
    why.push_back(std::string(what) + ": " + s.ToString());
  };
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      cudaSetDevice(0);
      cudaStream_t st;
      cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
      auto tokens = Tokens(n, 0);
      for (size_t i = 256; i < n; ++i) tokens[i] = static_cast<int32_t>(100000 * (t + 1) + i);
      std::vector<int64_t> slots(all_slots.begin(), all_slots.begin() + 256);
      slots.insert(slots.end(), all_slots.begin() + 256 * (t + 1), all_slots.begin() + 256 * (t + 2));
      for (int round = 0; round < 5; ++round) {
        auto h = io_->Store(tokens, slots, 0, st);
        if (!h.ok() || !(*h)->Wait().ok()) {
          fail("store", h.ok() ? (*h)->Wait() : h.status());
          continue;
        }
        // A chunk another thread is still writing was skipped by this store
        // (its handle is done at once); it is ready once that writer commits.
        for (int i = 0; i < 5000 && engine_->Lookup(tokens) != n; ++i) {
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        auto load = io_->Retrieve(tokens, slots, 0, st);
        if (!load.ok()) {
          fail("retrieve", load.status());
        } else if ((*load)->valid_tokens() != n) {
          fail("retrieve", Internal("valid_tokens " + std::to_string((*load)->valid_tokens())));
        } else if (Status w = (*load)->Wait(); !w.ok()) {
          fail("wait", w);
        }
      }
      cudaStreamDestroy(st);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0) << (why.empty() ? "" : why.front());
  // Every thread reloaded its own KV into its own slots, unchanged.
  auto image = Download();
  EXPECT_EQ(GatherHost(image.data(), all_slots), GatherHost(host_->base(), all_slots));
  // The shared first chunk was stored once, or skipped as present after.
  const EngineStats s = engine_->Stats();
  EXPECT_EQ(s.chunks_stored, 1u + kThreads);
  EXPECT_EQ(s.load_errors, 0u);
}


// ---------------------------------------------------------------------------
// Layer-wise transfer (cuda/layerwise_io.h).

// Holds a stream at a host function until Open(): what the stream has after
// it does not run before. (cudaLaunchHostFunc may block; it must not call
// CUDA.)
class StreamGate {
 public:
  explicit StreamGate(cudaStream_t s) {
    EXPECT_EQ(cudaLaunchHostFunc(s, &StreamGate::Hold, this), cudaSuccess);
  }
  ~StreamGate() { Open(); }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  static void Hold(void* self) {
    auto* g = static_cast<StreamGate*>(self);
    std::unique_lock<std::mutex> lock(g->mu_);
    g->cv_.wait(lock, [g] { return g->open_; });
  }
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

// The bytes of layer `layer` (every plane, every token) of a chunk buffer:
// the format is layer-major, so one contiguous slice.
std::vector<std::byte> LayerSlice(const std::vector<std::byte>& chunk, int layers, int layer) {
  const size_t per_layer = chunk.size() / static_cast<size_t>(layers);
  return {chunk.begin() + static_cast<ptrdiff_t>(per_layer * static_cast<size_t>(layer)),
          chunk.begin() + static_cast<ptrdiff_t>(per_layer * static_cast<size_t>(layer + 1))};
}

// Each layer is gathered only after the work the pass enqueued before its
// LayerReady has run: the new KV is written on the pass's stream behind a
// closed gate, the layers are reported in reverse order, and what is stored
// is the new KV, never the old.
TEST_F(CudaPagedIoTest, LayerwiseStoreReadsEachLayerAfterItsEvent) {
  Build(Spec(KvLayoutKind::kFlashAttn, 2, 16));
  const size_t n = 700;
  auto tokens = Tokens(n, 40);
  auto slots = testing::MakeSlots(host_->spec(), n, 21);
  // The KV the pass will write: the host image with every byte flipped.
  std::vector<std::byte> next(host_->base(), host_->base() + host_->bytes());
  for (std::byte& b : next) b = ~b;
  std::byte* pinned = nullptr;
  ASSERT_EQ(cudaMallocHost(&pinned, next.size()), cudaSuccess);
  std::memcpy(pinned, next.data(), next.size());

  auto signal = CudaLayerSignal::Create(layout().device_index(), 4, std::chrono::seconds(60));
  ASSERT_TRUE(signal.ok()) << signal.status().ToString();
  auto h = CudaStoreLayerwise(*io_, tokens, slots, 0, *signal);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  {
    StreamGate gate(stream_);
    ASSERT_EQ(cudaMemcpyAsync(dev_, pinned, next.size(), cudaMemcpyHostToDevice, stream_), cudaSuccess);
    for (int l = 3; l >= 0; --l) ASSERT_TRUE((*signal)->LayerReady(l, stream_).ok());
    ASSERT_TRUE((*signal)->LayerReady(2, stream_).ok());  // a repeat is a no-op
    // A store that ignored the events would read the old KV now; give it
    // the time to (this sleep only widens the window for a broken store; a
    // correct one cannot finish before the gate opens).
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    EXPECT_FALSE((*h)->done()) << "the store finished while the pass's stream was held";
    gate.Open();
  }
  ASSERT_TRUE((*h)->Wait().ok()) << (*h)->Wait().ToString();
  EXPECT_EQ(engine_->Lookup(tokens), n);
  auto prefix = engine_->AcquirePrefix(tokens, 0, layout().layout_id());
  ASSERT_TRUE(prefix.ok());
  ASSERT_EQ(prefix->chunks.size(), 3u);
  for (size_t i = 0; i < prefix->chunks.size(); ++i) {
    const ChunkHash& c = prefix->chunks[i];
    std::vector<int64_t> s(slots.begin() + c.begin, slots.begin() + c.begin + c.num_tokens);
    auto ref = GatherHost(next.data(), s);
    auto got = prefix->leases[i].data();
    ASSERT_EQ(got.size(), ref.size());
    EXPECT_EQ(std::memcmp(got.data(), ref.data(), ref.size()), 0) << "chunk " << i;
  }
  cudaFreeHost(pinned);
}

TEST_F(CudaPagedIoTest, LayerwiseStoreOfAnAbortedPassStoresNothing) {
  Build(Spec(KvLayoutKind::kFlashAttn, 2, 16));
  const size_t n = 512;
  auto tokens = Tokens(n, 3);
  auto slots = testing::MakeSlots(host_->spec(), n, 4);
  auto signal = CudaLayerSignal::Create(layout().device_index(), 4, std::chrono::seconds(60));
  ASSERT_TRUE(signal.ok());
  auto h = CudaStoreLayerwise(*io_, tokens, slots, 0, *signal);
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE((*signal)->LayerReady(0, stream_).ok());
  ASSERT_TRUE((*signal)->LayerReady(1, stream_).ok());
  (*signal)->Abort();
  EXPECT_EQ((*h)->Wait().code(), StatusCode::kUnavailable);
  EXPECT_EQ(engine_->Lookup(tokens), 0u);
  EXPECT_EQ(engine_->Stats().chunks_stored, 0u);

  // AllReady reports (and records) every layer not reported yet.
  auto all = CudaLayerSignal::Create(layout().device_index(), 4, std::chrono::seconds(60));
  ASSERT_TRUE(all.ok());
  auto h2 = CudaStoreLayerwise(*io_, tokens, slots, 0, *all);
  ASSERT_TRUE(h2.ok());
  ASSERT_TRUE((*all)->LayerReady(2, stream_).ok());
  ASSERT_TRUE((*all)->AllReady(stream_).ok());
  ASSERT_TRUE((*h2)->Wait().ok()) << (*h2)->Wait().ToString();
  EXPECT_EQ(engine_->Lookup(tokens), n);
}

TEST_F(CudaPagedIoTest, LayerwiseBadInputIsRefused) {
  Build(Spec(KvLayoutKind::kFlashAttn, 2, 16));
  auto tokens = Tokens(300, 1);
  auto slots = testing::MakeSlots(host_->spec(), 300, 2);
  auto three = CudaLayerSignal::Create(layout().device_index(), 3, std::chrono::seconds(1));
  ASSERT_TRUE(three.ok());
  EXPECT_EQ(CudaStoreLayerwise(*io_, tokens, slots, 0, *three).status().code(), StatusCode::kInvalidArgument);
  auto four = CudaLayerSignal::Create(layout().device_index(), 4, std::chrono::seconds(1));
  ASSERT_TRUE(four.ok());
  EXPECT_EQ((*four)->LayerReady(4, stream_).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*four)->LayerReady(-1, stream_).code(), StatusCode::kInvalidArgument);
  auto short_slots = slots;
  short_slots.pop_back();
  EXPECT_EQ(CudaStoreLayerwise(*io_, tokens, short_slots, 0, *four).status().code(), StatusCode::kInvalidArgument);
  auto far = slots;
  far[5] = layout().num_slots();
  EXPECT_EQ(CudaStoreLayerwise(*io_, tokens, far, 0, *four).status().code(), StatusCode::kInvalidArgument);
  std::vector<LayerwiseRequest> reqs(1);
  reqs[0].tokens = tokens;
  reqs[0].slots = far;
  EXPECT_EQ(CudaLayerwiseLoad::Start(io_, reqs, stream_).status().code(), StatusCode::kInvalidArgument);
  reqs[0].slots = short_slots;
  EXPECT_EQ(CudaLayerwiseLoad::Start(io_, reqs, stream_).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->Stats().chunks_stored, 0u);
}

// Two requests loaded layer by layer: each layer is in place for work a
// second stream enqueues after WaitLayer, skip_tokens are never written, a
// request with nothing cached loads nothing, and the end state equals the
// whole-chunk load's.
TEST_F(CudaPagedIoTest, LayerwiseLoadPutsEachLayerInPlaceForTheWaitingStream) {
  Build(Spec(KvLayoutKind::kFlashAttn, 2, 16));
  const size_t n = 600;
  auto ta = Tokens(n, 1000), tb = Tokens(n, 5000), tc = Tokens(300, 9000);
  auto all = testing::MakeSlots(host_->spec(), 2 * n + 300, 8);
  std::vector<int64_t> sa(all.begin(), all.begin() + n), sb(all.begin() + n, all.begin() + 2 * n),
      sc(all.begin() + 2 * n, all.end());
  for (auto [t, s] : {std::pair{&ta, &sa}, std::pair{&tb, &sb}}) {
    auto h = io_->Store(*t, *s, 0, stream_);
    ASSERT_TRUE(h.ok());
    ASSERT_TRUE((*h)->Wait().ok());
  }
  const auto want_a = GatherHost(host_->base(), sa);
  const auto want_b = GatherHost(host_->base(), sb);
  ASSERT_EQ(cudaMemset(dev_, 0, host_->bytes()), cudaSuccess);

  std::vector<LayerwiseRequest> reqs(3);
  reqs[0].tokens = ta, reqs[0].slots = sa;
  reqs[1].tokens = tb, reqs[1].slots = sb, reqs[1].skip_tokens = 256;
  reqs[2].tokens = tc, reqs[2].slots = sc;  // never stored
  cudaStream_t other = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking), cudaSuccess);
  auto load = CudaLayerwiseLoad::Start(io_, reqs, stream_);
  ASSERT_TRUE(load.ok()) << load.status().ToString();
  EXPECT_EQ((*load)->valid_tokens(0), n);
  EXPECT_EQ((*load)->valid_tokens(1), n);
  EXPECT_EQ((*load)->valid_tokens(2), 0u);
  EXPECT_EQ((*load)->chunks(), 3u + 2u);  // b's first chunk is the caller's
  // After WaitLayer(l) on `other`, a download there sees layers <= l.
  std::vector<std::byte*> snaps(4, nullptr);
  for (int l = 0; l < 4; ++l) {
    ASSERT_TRUE((*load)->WaitLayer(l, other).ok());
    ASSERT_EQ(cudaMallocHost(&snaps[static_cast<size_t>(l)], host_->bytes()), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(snaps[static_cast<size_t>(l)], dev_, host_->bytes(), cudaMemcpyDeviceToHost, other),
              cudaSuccess);
  }
  ASSERT_EQ(cudaStreamSynchronize(other), cudaSuccess);
  for (int l = 0; l < 4; ++l) {
    auto got_a = GatherHost(snaps[static_cast<size_t>(l)], sa);
    for (int k = 0; k <= l; ++k) {
      EXPECT_EQ(LayerSlice(got_a, 4, k), LayerSlice(want_a, 4, k)) << "snapshot " << l << " layer " << k;
    }
  }
  ASSERT_TRUE((*load)->Wait().ok());
  EXPECT_TRUE((*load)->done());
  EXPECT_TRUE((*load)->WaitLayer(3, other).ok());  // after done: nothing to wait for
  EXPECT_EQ((*load)->WaitLayer(4, other).code(), StatusCode::kInvalidArgument);

  auto image = Download();
  EXPECT_EQ(GatherHost(image.data(), sa), want_a);
  auto got_b = GatherHost(image.data(), sb);
  const size_t row = got_b.size() / (n * 2 * 4);
  for (int lp = 0; lp < 8; ++lp)
    for (size_t t = 0; t < n; ++t) {
      const size_t off = (static_cast<size_t>(lp) * n + t) * row;
      for (size_t b = 0; b < row; ++b) {
        ASSERT_EQ(got_b[off + b], t >= 256 ? want_b[off + b] : std::byte{0}) << "b: token " << t;
      }
    }
  auto got_c = GatherHost(image.data(), sc);
  EXPECT_TRUE(std::all_of(got_c.begin(), got_c.end(), [](std::byte b) { return b == std::byte{0}; }));
  for (std::byte* p : snaps) cudaFreeHost(p);
  cudaStreamDestroy(other);
}

// The load waits for the work already on the caller's stream: a kernel that
// still writes a destination block when the load starts does not overwrite
// the loaded KV afterwards.
TEST_F(CudaPagedIoTest, LayerwiseLoadStartsAfterTheCallersEarlierWork) {
  Build(Spec(KvLayoutKind::kFlashAttn, 2, 16));
  const size_t n = 512;
  auto tokens = Tokens(n, 77);
  auto slots = testing::MakeSlots(host_->spec(), n, 13);
  auto h = io_->Store(tokens, slots, 0, stream_);
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE((*h)->Wait().ok());
  const auto want = GatherHost(host_->base(), slots);
  std::unique_ptr<CudaLayerwiseLoad> load;
  {
    StreamGate gate(stream_);
    // Earlier work on the caller's stream: it zeroes the whole KV, after
    // the gate.
    ASSERT_EQ(cudaMemsetAsync(dev_, 0, host_->bytes(), stream_), cudaSuccess);
    std::vector<LayerwiseRequest> reqs(1);
    reqs[0].tokens = tokens, reqs[0].slots = slots;
    auto l = CudaLayerwiseLoad::Start(io_, reqs, stream_);
    ASSERT_TRUE(l.ok()) << l.status().ToString();
    load = std::move(*l);
    EXPECT_FALSE(load->done()) << "the load finished while the caller's stream was held";
    gate.Open();
  }
  ASSERT_TRUE(load->Wait().ok());
  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  auto image = Download();
  EXPECT_EQ(GatherHost(image.data(), slots), want);
}

}  // namespace
}  // namespace kvtier
