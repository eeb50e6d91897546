#include "cc/tiers/remote/redis_url.h"

#include <gtest/gtest.h>

#include <set>
#include <string>

namespace kvtier::remote {
namespace {

TEST(RedisUrlTest, SingleNodeDefaults) {
  auto u = ParseRedisUrl("redis://cache.local");
  ASSERT_TRUE(u.ok()) << u.status().ToString();
  EXPECT_FALSE(u->cluster);
  EXPECT_FALSE(u->tls);
  ASSERT_EQ(u->nodes.size(), 1u);
  EXPECT_EQ(u->nodes[0].host, "cache.local");
  EXPECT_EQ(u->nodes[0].port, 6379);
  EXPECT_EQ(u->db, 0);
  EXPECT_TRUE(u->password.empty());
}

TEST(RedisUrlTest, CredentialsPortDbAndTls) {
  auto u = ParseRedisUrl("rediss://alice:p%40ss%3Aw@10.0.0.5:6380/3");
  ASSERT_TRUE(u.ok()) << u.status().ToString();
  EXPECT_TRUE(u->tls);
  EXPECT_EQ(u->username, "alice");
  EXPECT_EQ(u->password, "p@ss:w");
  EXPECT_EQ(u->nodes[0].port, 6380);
  EXPECT_EQ(u->db, 3);
  EXPECT_EQ(u->Redacted(), "rediss://alice:***@10.0.0.5:6380/3");

  auto p = ParseRedisUrl("redis://:topsecret@h:1/");
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_TRUE(p->username.empty());
  EXPECT_EQ(p->password, "topsecret");
  EXPECT_EQ(p->Redacted().find("topsecret"), std::string::npos);
}

TEST(RedisUrlTest, Ipv6) {
  auto u = ParseRedisUrl("redis://[::1]:7000");
  ASSERT_TRUE(u.ok()) << u.status().ToString();
  EXPECT_EQ(u->nodes[0].host, "::1");
  EXPECT_EQ(u->nodes[0].port, 7000);
  EXPECT_EQ(u->nodes[0].ToString(), "[::1]:7000");
}

TEST(RedisUrlTest, ClusterSeeds) {
  auto u = ParseRedisUrl("redis+cluster://:pw@a:7000,b:7001,[::1]:7002");
  ASSERT_TRUE(u.ok()) << u.status().ToString();
  EXPECT_TRUE(u->cluster);
  EXPECT_FALSE(u->tls);
  ASSERT_EQ(u->nodes.size(), 3u);
  EXPECT_EQ(u->nodes[1].host, "b");
  EXPECT_EQ(u->nodes[2].port, 7002);
  EXPECT_EQ(u->Redacted(), "redis+cluster://:***@a:7000,b:7001,[::1]:7002");
  auto t = ParseRedisUrl("rediss+cluster://a:1/0");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_TRUE(t->tls && t->cluster);
}

TEST(RedisUrlTest, RejectsMalformedWithoutLeakingThePassword) {
  const char* bad[] = {
      "",
      "cache:6379",                       // no scheme
      "http://h:1",                       // wrong scheme
      "redis://",                         // no host
      "redis://:6379",                    // empty host
      "redis://h:0",                      // port out of range
      "redis://h:65536",
      "redis://h:12ab",
      "redis://h:1/x",                    // db not a number
      "redis://h:1/-1",
      "redis://h:1?timeout=3",            // query strings unsupported
      "redis://h:1#frag",
      "redis://a:1,b:2",                  // several hosts without +cluster
      "redis+cluster://a:1,,b:2",         // empty host in the list
      "redis+cluster://a:1/2",            // cluster has only db 0
      "redis://hunter2@h:1",              // userinfo without ':'
      "redis://user:@h:1",                // empty password
      "redis://u:hunter2%zz@h:1",         // bad escape
      "redis://u:hunter2@[::1:1",         // unterminated bracket
  };
  for (const char* url : bad) {
    auto u = ParseRedisUrl(url);
    ASSERT_FALSE(u.ok()) << url;
    EXPECT_EQ(u.status().code(), StatusCode::kInvalidArgument) << url;
    EXPECT_EQ(std::string(u.status().message()).find("hunter2"), std::string::npos)
        << u.status().ToString();
  }
  auto u = ParseRedisUrl("redis://u:hunter2@h:99999");
  EXPECT_NE(std::string(u.status().message()).find("u:***@h:99999"), std::string::npos)
      << u.status().ToString();
}

TEST(HashSlotTest, MatchesTheClusterSpecification) {
  // Reference values: CRC16-XMODEM check value, and slots printed by
  // `redis-cli CLUSTER KEYSLOT` on Redis 7.0.
  EXPECT_EQ(Crc16("123456789"), 0x31C3);
  EXPECT_EQ(HashSlot("foo"), 12182);
  EXPECT_EQ(HashSlot("bar"), 5061);
  EXPECT_EQ(HashSlot("hello"), 866);
  // Hash tags: only the first non-empty {...} counts.
  EXPECT_EQ(HashSlot("{user1000}.following"), HashSlot("{user1000}.followers"));
  EXPECT_EQ(HashSlot("{user1000}.following"), HashSlot("user1000"));
  EXPECT_EQ(HashSlot("foo{}{bar}"), HashSlot("foo{}{bar}"));
  EXPECT_NE(HashSlot("foo{}{bar}"), HashSlot("bar"));  // "{}" is empty: whole key
  EXPECT_EQ(HashSlot("foo{{bar}}zap"), HashSlot("{bar"));
  EXPECT_EQ(HashSlot("foo{bar}{zap}"), HashSlot("bar"));
  std::string binary("a\0b", 3);
  EXPECT_LT(HashSlot(binary), kClusterSlots);
}

TEST(ReconnectBackoffTest, DoublesWithJitterUpToTheCapAndResets) {
  using namespace std::chrono_literals;
  using Clock = ReconnectBackoff::Clock;
  ReconnectBackoff b(100ms, 1s, 42);
  const Clock::time_point t0 = Clock::now();
  EXPECT_TRUE(b.Due(t0));
  Clock::duration want = 100ms;
  std::set<Clock::rep> delays;
  for (int i = 1; i <= 8; ++i) {
    b.RecordFailure(t0);
    const Clock::duration d = b.next_attempt() - t0;
    EXPECT_GE(d, want / 2) << i;
    EXPECT_LE(d, want) << i;
    EXPECT_FALSE(b.Due(t0 + d - 1ns));
    EXPECT_TRUE(b.Due(t0 + d));
    delays.insert(d.count());
    want = std::min<Clock::duration>(want * 2, 1s);
  }
  EXPECT_EQ(b.failures(), 8);
  EXPECT_GT(delays.size(), 4u);  // jittered, not a fixed schedule
  b.RecordSuccess();
  EXPECT_TRUE(b.Due(t0));
  b.RecordFailure(t0);
  EXPECT_LE(b.next_attempt() - t0, 100ms);
}

}  // namespace
}  // namespace kvtier::remote
