#include "cc/engine/catalogue_view.h"

#include <unistd.h>

#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "cc/engine/engine.h"

namespace kvtier {
namespace {

constexpr uint32_t kChunk = 16;
constexpr size_t kChunkBytes = 4096;

// A deployment name no other test run shares (names are machine-wide).
std::string Deployment(const char* tag) {
  return std::string(tag) + "-" + std::to_string(::getpid()) + "-" + std::to_string(std::random_device{}());
}

HashNamespace RankNs(uint32_t rank, uint32_t world) {
  HashNamespace ns;
  ns.model = "m";
  ns.dtype = "float16";
  ns.rank = rank;
  ns.world_size = world;
  return ns;
}

std::unique_ptr<Engine> RankEngine(const std::string& deployment, uint32_t rank, uint32_t world) {
  EngineOptions o;
  o.hash_namespace = RankNs(rank, world);
  o.chunk_tokens = kChunk;
  o.cpu.capacity_bytes = 1 << 20;
  o.cpu.chunk_bytes = kChunkBytes;
  o.catalogue_shm_name = CatalogueShmName(deployment, rank, world);
  auto e = Engine::Create(o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return e.ok() ? std::move(e).value() : nullptr;
}

std::unique_ptr<CatalogueView> View(const std::string& deployment, uint32_t world, int64_t recheck_ms = 0) {
  CatalogueViewOptions o;
  for (uint32_t r = 0; r < world; ++r) o.ranks.push_back({CatalogueShmName(deployment, r, world), RankNs(r, world)});
  o.chunk_tokens = kChunk;
  o.recheck_ms = recheck_ms;
  auto v = CatalogueView::Create(o);
  EXPECT_TRUE(v.ok()) << v.status().ToString();
  return v.ok() ? std::move(v).value() : nullptr;
}

std::vector<int32_t> Tokens(size_t n, int32_t first) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

void StoreAll(Engine& e, const std::vector<int32_t>& tokens) {
  auto h = e.Store(tokens, 0, 1, [](uint32_t) { return kChunkBytes; },
                   [](const ChunkHash&, std::span<std::byte> dst) {
                     std::fill(dst.begin(), dst.end(), std::byte{7});
                     return Status();
                   });
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  ASSERT_TRUE((*h)->Wait().ok());
}

TEST(CatalogueShmNameTest, StablePerDeploymentAndRank) {
  EXPECT_EQ(CatalogueShmName("a", 0, 2), CatalogueShmName("a", 0, 2));
  EXPECT_NE(CatalogueShmName("a", 0, 2), CatalogueShmName("a", 1, 2));
  EXPECT_NE(CatalogueShmName("a", 0, 2), CatalogueShmName("b", 0, 2));
  const std::string n = CatalogueShmName(std::string(1000, 'x'), 3, 4);
  EXPECT_EQ(n.rfind("/kvtier-", 0), 0u);
  EXPECT_EQ(n.find('/', 1), std::string::npos);
  EXPECT_LT(n.size(), 64u);
}

TEST(CatalogueViewTest, PrefixCountsOnlyWhereEveryRankHoldsIt) {
  const std::string dep = Deployment("view");
  auto r0 = RankEngine(dep, 0, 2);
  auto r1 = RankEngine(dep, 1, 2);
  ASSERT_TRUE(r0 && r1);
  auto view = View(dep, 2);
  ASSERT_TRUE(view);
  EXPECT_EQ(view->ranks_open(), 2u);

  const auto t = Tokens(4 * kChunk, 100);
  EXPECT_EQ(view->Lookup(t), 0u);
  StoreAll(*r0, t);
  // Rank 0 holds the prompt, rank 1 nothing: a miss for the request.
  EXPECT_EQ(view->LookupRank(0, t), t.size());
  EXPECT_EQ(view->LookupRank(1, t), 0u);
  EXPECT_EQ(view->Lookup(t), 0u);
  // Rank 1 holds the first two chunks only: the common prefix is two chunks.
  StoreAll(*r1, Tokens(2 * kChunk, 100));
  EXPECT_EQ(view->Lookup(t), 2 * kChunk);
  StoreAll(*r1, t);
  EXPECT_EQ(view->Lookup(t), t.size());
  // The view answers exactly what each rank's own Lookup answers.
  EXPECT_EQ(view->LookupRank(0, t), r0->Lookup(t));
  EXPECT_EQ(view->LookupRank(1, t), r1->Lookup(t));
}

TEST(CatalogueViewTest, RankNamespacesNeverMix) {
  // Rank 1's view hashes with rank 1's namespace: KV stored by an engine
  // whose namespace says rank 0 under rank 1's shm name is not counted.
  const std::string dep = Deployment("mix");
  EngineOptions o;
  o.hash_namespace = RankNs(0, 2);
  o.chunk_tokens = kChunk;
  o.cpu.capacity_bytes = 1 << 20;
  o.cpu.chunk_bytes = kChunkBytes;
  o.catalogue_shm_name = CatalogueShmName(dep, 1, 2);
  auto wrong = Engine::Create(o);
  ASSERT_TRUE(wrong.ok()) << wrong.status().ToString();
  const auto t = Tokens(2 * kChunk, 5);
  StoreAll(**wrong, t);
  auto view = View(dep, 2);
  EXPECT_EQ(view->LookupRank(1, t), 0u);
}

TEST(CatalogueViewTest, KeyExtrasAreHashedLikeTheEngine) {
  const std::string dep = Deployment("extras");
  auto r0 = RankEngine(dep, 0, 1);
  ASSERT_TRUE(r0);
  auto view = View(dep, 1);
  const auto t = Tokens(3 * kChunk, 9);
  KeyExtras salted;
  salted.salt = IdentityKey("tenant-a");
  auto h = r0->Store(t, 0, 1, [](uint32_t) { return kChunkBytes; },
                     [](const ChunkHash&, std::span<std::byte>) { return Status(); }, &salted);
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE((*h)->Wait().ok());
  EXPECT_EQ(view->Lookup(t, &salted), t.size());
  EXPECT_EQ(view->Lookup(t), 0u);
  KeyExtras other;
  other.salt = IdentityKey("tenant-b");
  EXPECT_EQ(view->Lookup(t, &other), 0u);
  KeyExtras bad;
  bad.spans.push_back({5, 5, IdentityKey("x")});  // empty span: invalid
  EXPECT_EQ(view->Lookup(t, &bad), 0u);
}

TEST(CatalogueViewTest, RanksMayAppearLateAndRestart) {
  const std::string dep = Deployment("late");
  auto view = View(dep, 1, /*recheck_ms=*/0);
  const auto t = Tokens(2 * kChunk, 1);
  EXPECT_EQ(view->ranks_open(), 0u);
  EXPECT_EQ(view->Lookup(t), 0u);
  {
    auto r0 = RankEngine(dep, 0, 1);
    ASSERT_TRUE(r0);
    StoreAll(*r0, t);
    EXPECT_EQ(view->Lookup(t), t.size());
  }
  // The owner is gone (its object unlinked): its frozen contents are not
  // trusted any more.
  EXPECT_EQ(view->Lookup(t), 0u);
  EXPECT_EQ(view->ranks_open(), 0u);
  // A restarted rank under the same name starts empty, and the view follows it.
  auto again = RankEngine(dep, 0, 1);
  ASSERT_TRUE(again);
  EXPECT_EQ(view->Lookup(t), 0u);
  StoreAll(*again, t);
  EXPECT_EQ(view->Lookup(t), t.size());
}

TEST(CatalogueViewTest, BadOptionsAreClearErrors) {
  CatalogueViewOptions o;
  EXPECT_EQ(CatalogueView::Create(o).status().code(), StatusCode::kInvalidArgument);
  o.ranks.push_back({"no-slash", RankNs(0, 1)});
  EXPECT_EQ(CatalogueView::Create(o).status().code(), StatusCode::kInvalidArgument);
  o.ranks[0].shm_name = "/ok";
  o.ranks[0].ns.rank = 3;  // >= world_size
  EXPECT_EQ(CatalogueView::Create(o).status().code(), StatusCode::kInvalidArgument);
  o.ranks[0].ns.rank = 0;
  o.chunk_tokens = 0;
  EXPECT_EQ(CatalogueView::Create(o).status().code(), StatusCode::kInvalidArgument);
}

TEST(EngineSharedCatalogueTest, SecondLiveOwnerOfANameIsRefused) {
  const std::string dep = Deployment("dup");
  auto first = RankEngine(dep, 0, 1);
  ASSERT_TRUE(first);
  EngineOptions o;
  o.hash_namespace = RankNs(0, 1);
  o.chunk_tokens = kChunk;
  o.cpu.capacity_bytes = 1 << 20;
  o.cpu.chunk_bytes = kChunkBytes;
  o.catalogue_shm_name = CatalogueShmName(dep, 0, 1);
  auto second = Engine::Create(o);
  ASSERT_FALSE(second.ok());
  EXPECT_NE(second.status().ToString().find("shared catalogue"), std::string::npos) << second.status().ToString();
}

}  // namespace
}  // namespace kvtier
