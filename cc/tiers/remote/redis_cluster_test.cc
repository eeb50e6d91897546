// RedisClient against a real 3-master Redis Cluster (redis-server 7.0 with
// --cluster-enabled, made by `redis-cli --cluster create`): slot routing, a
// slot migrated while the client runs (ASK, then MOVED), and a master
// restarted on another port (topology refresh).
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "cc/tiers/remote/redis_client.h"
#include "cc/tiers/remote/redis_test_server.h"

namespace kvtier::remote {
namespace {

using namespace std::chrono_literals;
using testing::RedisCluster;
using Clock = RedisClient::Clock;

std::string ValueFor(const std::string& key, size_t n) {
  std::string v(n, '\0');
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<char>((i * 131 + key.size() * 7 + key.back()) & 0xff);
  return v;
}

std::unique_ptr<RedisClient> MustCreate(const std::string& url, RedisClientOptions o = {}) {
  auto c = RedisClient::Create(url, std::move(o));
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? std::move(c).value() : nullptr;
}

// Retries `f` until it returns true, waiting for the client's backoff (not a
// stand-in for synchronization: the cluster converges on its own schedule).
template <typename F>
bool Eventually(RedisClient& c, F f, Clock::duration limit = 30s) {
  const Clock::time_point give_up = Clock::now() + limit;
  while (Clock::now() < give_up) {
    if (f()) return true;
    std::this_thread::sleep_until(std::max(c.NextReconnectAttempt(), Clock::now() + 20ms));
  }
  return false;
}

class RedisClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    cluster_ = RedisCluster::Start(3);
    ASSERT_NE(cluster_, nullptr);
  }
  std::unique_ptr<RedisCluster> cluster_;
};

TEST_F(RedisClusterTest, KeysSpreadOverThreeMastersRoundTrip) {
  auto client = MustCreate(cluster_->url());
  ASSERT_NE(client, nullptr);
  std::vector<std::string> keys;
  for (int i = 0; i < 300; ++i) keys.push_back("kvtier:chunk:" + std::to_string(i));
  keys.push_back("{doc7}.a");
  keys.push_back("{doc7}.b");
  std::vector<std::string> values;
  std::vector<KeyValue> items;
  for (const auto& k : keys) values.push_back(ValueFor(k, 1000 + k.size()));
  for (size_t i = 0; i < keys.size(); ++i) items.push_back({keys[i], values[i]});
  std::vector<KeyResult> r;
  Status s = client->SetNxMany(items, 0s, &r);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(r, std::vector<KeyResult>(keys.size(), KeyResult::kHit));

  // Our slot function agrees with the server's, and every master got keys.
  for (int i = 0; i < 20; ++i) {
    EXPECT_EQ(std::to_string(HashSlot(keys[i])), cluster_->node(0).Cli({"cluster", "keyslot", keys[i]}));
  }
  EXPECT_EQ(HashSlot("{doc7}.a"), HashSlot("{doc7}.b"));
  for (int n = 0; n < 3; ++n) EXPECT_GT(std::stoi(cluster_->node(n).Cli({"dbsize"})), 50) << n;

  std::vector<std::string_view> views(keys.begin(), keys.end());
  views.push_back("kvtier:absent");
  std::vector<std::optional<std::string>> got;
  s = client->GetMany(views, &got, &r);
  ASSERT_TRUE(s.ok()) << s.ToString();
  for (size_t i = 0; i < keys.size(); ++i) {
    ASSERT_EQ(r[i], KeyResult::kHit) << keys[i];
    EXPECT_TRUE(*got[i] == values[i]) << keys[i];
  }
  EXPECT_EQ(r.back(), KeyResult::kMiss);
  EXPECT_EQ(client->stats().moved, 0u);
  EXPECT_EQ(client->stats().topology_refreshes, 1u);
  EXPECT_EQ(client->stats().connects, 3u);  // one connection per master
}

TEST_F(RedisClusterTest, SlotMigratedWhileRunningFollowsAskThenMoved) {
  auto client = MustCreate(cluster_->url());
  ASSERT_NE(client, nullptr);
  std::vector<std::string> keys;
  for (int i = 0; i < 10; ++i) keys.push_back("{mig}:" + std::to_string(i));
  const int slot = HashSlot(keys[0]);
  std::vector<std::string> values;
  std::vector<KeyValue> items;
  for (const auto& k : keys) values.push_back(ValueFor(k, 4096));
  for (size_t i = 0; i < keys.size(); ++i) items.push_back({keys[i], values[i]});
  std::vector<KeyResult> r;
  ASSERT_TRUE(client->SetNxMany(items, 0s, &r).ok());

  const int src = cluster_->OwnerOf(slot);
  ASSERT_GE(src, 0);
  const int dst = (src + 1) % 3;
  auto& from = cluster_->node(src);
  auto& to = cluster_->node(dst);
  const std::string slot_text = std::to_string(slot);
  ASSERT_EQ(to.Cli({"cluster", "setslot", slot_text, "importing", cluster_->NodeId(src)}), "OK");
  ASSERT_EQ(from.Cli({"cluster", "setslot", slot_text, "migrating", cluster_->NodeId(dst)}), "OK");
  auto migrate = [&](size_t lo, size_t hi) {
    std::vector<std::string> args = {"migrate", "127.0.0.1", std::to_string(to.port()), "", "0", "5000", "KEYS"};
    for (size_t i = lo; i < hi; ++i) args.push_back(keys[i]);
    return from.Cli(args);
  };
  ASSERT_EQ(migrate(0, 5), "OK");

  // Half the keys moved: the source answers ASK for them.
  std::vector<std::string_view> views(keys.begin(), keys.end());
  std::vector<std::optional<std::string>> got;
  Status s = client->GetMany(views, &got, &r);
  ASSERT_TRUE(s.ok()) << s.ToString();
  for (size_t i = 0; i < keys.size(); ++i) {
    ASSERT_EQ(r[i], KeyResult::kHit) << keys[i];
    EXPECT_TRUE(*got[i] == values[i]) << keys[i];
  }
  EXPECT_EQ(client->stats().ask, 5u);
  // A new key in a migrating slot is created on the importing node (ASK).
  const std::string fresh_value = ValueFor("{mig}:new", 100);
  const KeyValue fresh[] = {{"{mig}:new", fresh_value}};
  s = client->SetNxMany(fresh, 0s, &r);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(r[0], KeyResult::kHit);
  EXPECT_EQ(client->stats().ask, 6u);

  // Finish the migration: everyone learns the new owner; the client's next
  // request to the old owner gets MOVED, and it remaps the slot.
  ASSERT_EQ(migrate(5, 10), "OK");
  for (int n = 0; n < 3; ++n) {
    ASSERT_EQ(cluster_->node(n).Cli({"cluster", "setslot", slot_text, "node", cluster_->NodeId(dst)}), "OK");
  }
  views.push_back("{mig}:new");
  s = client->GetMany(views, &got, &r);
  ASSERT_TRUE(s.ok()) << s.ToString();
  for (size_t i = 0; i < keys.size(); ++i) {
    ASSERT_EQ(r[i], KeyResult::kHit) << keys[i];
    EXPECT_TRUE(*got[i] == values[i]) << keys[i];
  }
  ASSERT_EQ(r.back(), KeyResult::kHit);
  EXPECT_TRUE(*got.back() == fresh_value);
  const uint64_t moved = client->stats().moved;
  EXPECT_GE(moved, 1u);
  EXPECT_EQ(std::stoi(to.Cli({"cluster", "countkeysinslot", slot_text})), 11);
  // The map is fixed now: no more redirects.
  s = client->GetMany(views, &got, &r);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(client->stats().moved, moved);
}

TEST_F(RedisClusterTest, MasterRestartedOnAnotherPortRefreshesTheTopology) {
  RedisClientOptions o;
  o.reconnect_backoff_initial = 20ms;
  o.reconnect_backoff_max = 200ms;
  o.command_timeout = 2000ms;
  auto client = MustCreate(cluster_->url(), o);
  ASSERT_NE(client, nullptr);
  std::vector<std::string> keys;
  for (int i = 0; i < 60; ++i) keys.push_back("restart:" + std::to_string(i));
  std::vector<KeyValue> items;
  for (const auto& k : keys) items.push_back({k, k});
  std::vector<KeyResult> r;
  ASSERT_TRUE(client->SetNxMany(items, 0s, &r).ok());
  const int victim = 2;
  std::vector<bool> on_victim;
  for (const auto& k : keys) on_victim.push_back(cluster_->OwnerOf(HashSlot(k)) == victim);
  ASSERT_GT(std::count(on_victim.begin(), on_victim.end(), true), 0);

  cluster_->node(victim).Kill();
  std::vector<std::string_view> views(keys.begin(), keys.end());
  std::vector<std::optional<std::string>> got;
  Status s = client->GetMany(views, &got, &r);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  for (size_t i = 0; i < keys.size(); ++i) {
    // The other masters still serve their keys.
    EXPECT_EQ(r[i], on_victim[i] ? KeyResult::kError : KeyResult::kHit) << keys[i];
  }

  const uint64_t refreshes = client->stats().topology_refreshes;
  const int new_port = testing::PickFreePort();
  ASSERT_TRUE(cluster_->node(victim).Restart(new_port));
  // The restarted master keeps its node id and slots (nodes.conf) and
  // announces its new address; the client learns it from CLUSTER SLOTS.
  const bool recovered = Eventually(*client, [&] {
    return client->GetMany(views, &got, &r).ok();
  });
  ASSERT_TRUE(recovered) << "client did not reach the restarted master";
  for (size_t i = 0; i < keys.size(); ++i) {
    // Restarted empty (--save ''): its keys are misses now, the rest hits.
    EXPECT_EQ(r[i], on_victim[i] ? KeyResult::kMiss : KeyResult::kHit) << keys[i];
  }
  EXPECT_GT(client->stats().topology_refreshes, refreshes);
  // Writes reach it too.
  s = client->SetNxMany(items, 0s, &r);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_GT(std::stoi(cluster_->node(victim).Cli({"dbsize"})), 0);
}

}  // namespace
}  // namespace kvtier::remote
