// RedisClient against real single redis-server processes (Debian 7.0):
// binary values, SET NX, TTL, SELECT, AUTH (password and ACL user), a server
// killed and restarted, a stalled server (CLIENT PAUSE), TLS, and one client
// shared by several threads.
#include "cc/tiers/remote/redis_client.h"

#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cc/tiers/remote/redis_test_server.h"

namespace kvtier::remote {
namespace {

using namespace std::chrono_literals;
using testing::RedisServer;
using Clock = RedisClient::Clock;

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>(rng() & 0xff);
  // Make sure there are NULs and CR LF in the value (binary safety).
  s[0] = '\0';
  s[n / 2] = '\r';
  s[n / 2 + 1] = '\n';
  s[n - 1] = '\0';
  return s;
}

std::unique_ptr<RedisClient> MustCreate(const std::string& url, RedisClientOptions o = {}) {
  auto c = RedisClient::Create(url, std::move(o));
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? std::move(c).value() : nullptr;
}

std::string Url(const RedisServer& s) { return "redis://" + s.addr(); }

TEST(RedisClientTest, BinaryOneMiBValuesRoundTripAndMissingKeys) {
  auto server = RedisServer::Start({});
  ASSERT_NE(server, nullptr);
  auto client = MustCreate(Url(*server));
  ASSERT_NE(client, nullptr);

  const std::string a = RandomBytes(1 << 20, 1);
  const std::string b = RandomBytes(1 << 20, 2);
  const std::string key_with_nul("k\0ey", 4);
  const KeyValue items[] = {{"a", a}, {key_with_nul, b}};
  std::vector<KeyResult> r;
  ASSERT_TRUE(client->SetNxMany(items, 0s, &r).ok());
  EXPECT_EQ(r, (std::vector<KeyResult>{KeyResult::kHit, KeyResult::kHit}));

  const std::string_view keys[] = {"a", "missing", key_with_nul};
  std::vector<std::optional<std::string>> values;
  Status s = client->GetMany(keys, &values, &r);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(r, (std::vector<KeyResult>{KeyResult::kHit, KeyResult::kMiss, KeyResult::kHit}));
  ASSERT_TRUE(values[0].has_value());
  EXPECT_TRUE(*values[0] == a);
  EXPECT_FALSE(values[1].has_value());
  ASSERT_TRUE(values[2].has_value());
  EXPECT_TRUE(*values[2] == b);
  EXPECT_EQ(client->stats().bytes_in, 2u << 20);

  ASSERT_TRUE(client->ExistsMany(keys, &r).ok());
  EXPECT_EQ(r, (std::vector<KeyResult>{KeyResult::kHit, KeyResult::kMiss, KeyResult::kHit}));
  ASSERT_TRUE(client->DelMany(keys, &r).ok());
  EXPECT_EQ(r, (std::vector<KeyResult>{KeyResult::kHit, KeyResult::kMiss, KeyResult::kHit}));
  ASSERT_TRUE(client->ExistsMany(keys, &r).ok());
  EXPECT_EQ(r, std::vector<KeyResult>(3, KeyResult::kMiss));
}

TEST(RedisClientTest, SetNxNeverOverwritesAndSetsTheTtl) {
  auto server = RedisServer::Start({});
  ASSERT_NE(server, nullptr);
  auto client = MustCreate(Url(*server));
  ASSERT_NE(client, nullptr);
  std::vector<KeyResult> r;
  const KeyValue first[] = {{"k", "first"}, {"t", "ttl"}};
  ASSERT_TRUE(client->SetNxMany(first, 0s, &r).ok());
  const KeyValue second[] = {{"k", "second"}, {"t", "ttl2"}, {"u", "ttl3"}};
  ASSERT_TRUE(client->SetNxMany(second, 100s, &r).ok());
  EXPECT_EQ(r, (std::vector<KeyResult>{KeyResult::kMiss, KeyResult::kMiss, KeyResult::kHit}));
  EXPECT_EQ(server->Cli({"get", "k"}), "first");
  EXPECT_EQ(server->Cli({"ttl", "k"}), "-1");  // no TTL asked the first time
  const int ttl = std::stoi(server->Cli({"ttl", "u"}));
  EXPECT_GT(ttl, 0);
  EXPECT_LE(ttl, 100);
}

TEST(RedisClientTest, SelectsTheDatabaseOfTheUrl) {
  auto server = RedisServer::Start({});
  ASSERT_NE(server, nullptr);
  auto client = MustCreate(Url(*server) + "/2");
  ASSERT_NE(client, nullptr);
  std::vector<KeyResult> r;
  const KeyValue kv[] = {{"in-db-2", "v"}};
  ASSERT_TRUE(client->SetNxMany(kv, 0s, &r).ok());
  EXPECT_EQ(server->Cli({"-n", "2", "exists", "in-db-2"}), "1");
  EXPECT_EQ(server->Cli({"-n", "0", "exists", "in-db-2"}), "0");
}

TEST(RedisClientTest, AuthWithPasswordAndAclUserAndClearErrorsWithoutTheSecret) {
  auto server = RedisServer::Start({"--requirepass", "s3cret-default",  //
                                    "--user", "alice", "on", ">alice-pw-1", "~*", "&*", "+@all"});
  ASSERT_NE(server, nullptr);
  std::vector<KeyResult> r;
  const std::string_view keys[] = {"x"};

  auto by_password = MustCreate("redis://:s3cret-default@" + server->addr());
  EXPECT_TRUE(by_password->ExistsMany(keys, &r).ok());

  auto as_alice = MustCreate("redis://alice:alice-pw-1@" + server->addr());
  EXPECT_TRUE(as_alice->ExistsMany(keys, &r).ok());

  // Credentials from options (e.g. an env var) override the URL.
  RedisClientOptions o;
  o.username = "alice";
  o.password = "alice-pw-1";
  auto from_options = MustCreate(Url(*server), o);
  EXPECT_TRUE(from_options->ExistsMany(keys, &r).ok());

  for (const std::string& url : {"redis://alice:WRONG-pw-42@" + server->addr(),
                                 "redis://:WRONG-pw-42@" + server->addr()}) {
    auto wrong = MustCreate(url);
    Status s = wrong->ExistsMany(keys, &r);
    EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
    EXPECT_NE(s.ToString().find("WRONGPASS"), std::string::npos) << s.ToString();
    EXPECT_EQ(s.ToString().find("WRONG-pw-42"), std::string::npos) << s.ToString();
    EXPECT_EQ(r, std::vector<KeyResult>{KeyResult::kError});
  }

  auto none = MustCreate(Url(*server));
  Status s = none->ExistsMany(keys, &r);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  EXPECT_NE(s.ToString().find("NOAUTH"), std::string::npos) << s.ToString();
}

TEST(RedisClientTest, ServerDownAtStartThenKilledMidRunThenBack) {
  auto server = RedisServer::Start({});
  ASSERT_NE(server, nullptr);
  const int port = server->port();
  server->Kill();

  RedisClientOptions o;
  o.reconnect_backoff_initial = 20ms;
  o.reconnect_backoff_max = 200ms;
  auto client = MustCreate(Url(*server), o);  // creating never needs the server
  ASSERT_NE(client, nullptr);
  std::vector<KeyResult> r;
  const std::string_view keys[] = {"k"};
  Status s = client->ExistsMany(keys, &r);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();

  // In backoff: fails fast, without a connection attempt.
  ASSERT_FALSE(client->ReconnectDue());
  const uint64_t attempts = client->stats().connect_failures;
  s = client->ExistsMany(keys, &r);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_NE(s.ToString().find("next reconnect attempt"), std::string::npos) << s.ToString();
  EXPECT_EQ(client->stats().connect_failures, attempts);
  EXPECT_GE(client->stats().fast_failures, 1u);

  ASSERT_TRUE(server->Restart(port));
  std::this_thread::sleep_until(client->NextReconnectAttempt());  // the backoff, not a sync
  ASSERT_TRUE(client->ReconnectDue());
  const std::string value = RandomBytes(64 << 10, 3);
  const KeyValue kv[] = {{"k", value}};
  s = client->SetNxMany(kv, 0s, &r);
  ASSERT_TRUE(s.ok()) << s.ToString();

  // Killed mid-run: the open connection breaks -> kUnavailable, no crash
  // (SIGPIPE included), then the client reconnects once it is back.
  server->Kill();
  std::vector<std::optional<std::string>> values;
  s = client->GetMany(keys, &values, &r);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  EXPECT_EQ(r, std::vector<KeyResult>{KeyResult::kError});
  s = client->SetNxMany(kv, 0s, &r);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  ASSERT_TRUE(server->Restart(port));
  std::this_thread::sleep_until(client->NextReconnectAttempt());
  s = client->GetMany(keys, &values, &r);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(r, std::vector<KeyResult>{KeyResult::kMiss});  // restarted empty
  EXPECT_GE(client->stats().disconnects, 1u);
  EXPECT_GE(client->stats().connects, 2u);
}

TEST(RedisClientTest, StalledServerGivesDeadlineErrorsNotAHang) {
  auto server = RedisServer::Start({});
  ASSERT_NE(server, nullptr);
  RedisClientOptions o;
  o.command_timeout = 200ms;
  o.reconnect_backoff_initial = 10ms;
  o.reconnect_backoff_max = 50ms;
  auto client = MustCreate(Url(*server), o);
  std::vector<KeyResult> r;
  const std::string_view keys[] = {"k"};
  ASSERT_TRUE(client->ExistsMany(keys, &r).ok());

  // Every client stalls, this test's redis-cli included (CLIENT UNPAUSE
  // would wait too), until the pause ends by itself.
  const Clock::time_point pause_ends = Clock::now() + 5s;
  ASSERT_EQ(server->Cli({"client", "pause", "5000", "all"}), "OK");
  const Clock::time_point start = Clock::now();
  Status s = client->ExistsMany(keys, &r);
  const Clock::duration took = Clock::now() - start;
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  EXPECT_NE(s.ToString().find("deadline exceeded"), std::string::npos) << s.ToString();
  EXPECT_LT(Clock::now(), pause_ends);  // returned while the server was still paused
  EXPECT_LT(took, 5s);
  EXPECT_GE(client->stats().timeouts, 1u);

  // An explicit, shorter deadline also holds for a fresh connection (AUTH-less
  // connect succeeds; the first command stalls).
  auto fresh = MustCreate(Url(*server), o);
  s = fresh->ExistsMany(keys, &r, Clock::now() + 100ms);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();

  // A deadline past the end of the pause: the call waits it out and succeeds.
  std::this_thread::sleep_until(client->NextReconnectAttempt());
  s = client->ExistsMany(keys, &r, pause_ends + 20s);
  EXPECT_TRUE(s.ok()) << s.ToString();
}

TEST(RedisClientTest, OneClientSharedByThreads) {
  auto server = RedisServer::Start({});
  ASSERT_NE(server, nullptr);
  auto client = MustCreate(Url(*server));
  ASSERT_NE(client, nullptr);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        const std::string key = "t" + std::to_string(t) + "-" + std::to_string(i);
        const std::string value = RandomBytes(4096, t * 1000 + i);
        std::vector<KeyResult> r;
        const KeyValue kv[] = {{key, value}};
        if (!client->SetNxMany(kv, 0s, &r).ok() || r[0] != KeyResult::kHit) ++failures;
        const std::string_view keys[] = {key};
        std::vector<std::optional<std::string>> values;
        if (!client->GetMany(keys, &values, &r).ok() || !values[0] || *values[0] != value) ++failures;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
}

// ---- TLS ------------------------------------------------------------------------

class RedisTlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TempRoot() + "/tls";
    std::filesystem::create_directories(dir_);
    auto run = [](std::vector<std::string> args) {
      std::string out;
      const int rc = testing::Run(args, &out);
      EXPECT_EQ(rc, 0) << out;
      return rc == 0;
    };
    const std::string ec = "ec";
    auto make_ca = [&](const std::string& name) {
      return run({"openssl", "req", "-x509", "-newkey", ec, "-pkeyopt", "ec_paramgen_curve:prime256v1",
                  "-nodes", "-keyout", dir_ + "/" + name + ".key", "-out", dir_ + "/" + name + ".crt",
                  "-days", "1", "-subj", "/CN=kvtier-test-" + name});
    };
    auto make_cert = [&](const std::string& name, const std::string& san) {
      std::ofstream(dir_ + "/" + name + ".ext") << "subjectAltName=" << san << "\n";
      return run({"openssl", "req", "-newkey", ec, "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                  "-keyout", dir_ + "/" + name + ".key", "-out", dir_ + "/" + name + ".csr", "-subj",
                  "/CN=kvtier-test-" + name}) &&
             run({"openssl", "x509", "-req", "-in", dir_ + "/" + name + ".csr", "-CA", dir_ + "/ca.crt",
                  "-CAkey", dir_ + "/ca.key", "-CAcreateserial", "-out", dir_ + "/" + name + ".crt",
                  "-days", "1", "-extfile", dir_ + "/" + name + ".ext"});
    };
    ASSERT_TRUE(make_ca("ca"));
    ASSERT_TRUE(make_ca("other-ca"));
    ASSERT_TRUE(make_cert("ip", "IP:127.0.0.1"));
    ASSERT_TRUE(make_cert("name", "DNS:other.example"));
  }

  std::unique_ptr<RedisServer> StartTls(const std::string& cert, std::vector<std::string> extra = {}) {
    const int port = testing::PickFreePort();
    std::vector<std::string> args = {"--tls-port", std::to_string(port),
                                     "--tls-cert-file", dir_ + "/" + cert + ".crt",
                                     "--tls-key-file", dir_ + "/" + cert + ".key",
                                     "--tls-ca-cert-file", dir_ + "/ca.crt",
                                     "--tls-auth-clients", "no"};
    args.insert(args.end(), extra.begin(), extra.end());
    return RedisServer::Start(args, port, /*tls_only=*/true);
  }

  std::string dir_;
};

TEST_F(RedisTlsTest, RoundTripOverTlsWithAuth) {
  auto server = StartTls("ip", {"--requirepass", "tls-pw"});
  ASSERT_NE(server, nullptr);
  RedisClientOptions o;
  o.tls_ca_file = dir_ + "/ca.crt";
  auto client = MustCreate("rediss://:tls-pw@" + server->addr(), o);
  ASSERT_NE(client, nullptr);
  const std::string value = RandomBytes(1 << 20, 9);
  const KeyValue kv[] = {{"secure", value}};
  std::vector<KeyResult> r;
  Status s = client->SetNxMany(kv, 0s, &r);
  ASSERT_TRUE(s.ok()) << s.ToString();
  const std::string_view keys[] = {"secure"};
  std::vector<std::optional<std::string>> values;
  ASSERT_TRUE(client->GetMany(keys, &values, &r).ok());
  ASSERT_TRUE(values[0].has_value());
  EXPECT_TRUE(*values[0] == value);

  // Plain TCP to a TLS port: an error, not a hang.
  RedisClientOptions fast;
  fast.command_timeout = 500ms;
  auto plain = MustCreate("redis://:tls-pw@" + server->addr(), fast);
  EXPECT_FALSE(plain->ExistsMany(keys, &r).ok());
}

TEST_F(RedisTlsTest, RejectsAnUntrustedOrMisnamedCertificate) {
  auto server = StartTls("ip");
  ASSERT_NE(server, nullptr);
  std::vector<KeyResult> r;
  const std::string_view keys[] = {"k"};

  RedisClientOptions other;
  other.tls_ca_file = dir_ + "/other-ca.crt";
  auto untrusted = MustCreate("rediss://" + server->addr(), other);
  Status s = untrusted->ExistsMany(keys, &r);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();

  auto misnamed_server = StartTls("name");
  ASSERT_NE(misnamed_server, nullptr);
  RedisClientOptions o;
  o.tls_ca_file = dir_ + "/ca.crt";
  auto misnamed = MustCreate("rediss://" + misnamed_server->addr(), o);
  s = misnamed->ExistsMany(keys, &r);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  o.tls_verify_name = false;  // chain still checked, name not
  auto unchecked_name = MustCreate("rediss://" + misnamed_server->addr(), o);
  s = unchecked_name->ExistsMany(keys, &r);
  EXPECT_TRUE(s.ok()) << s.ToString();

  RedisClientOptions bad;
  bad.tls_ca_file = dir_ + "/does-not-exist.crt";
  auto c = RedisClient::Create("rediss://" + server->addr(), bad);
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument) << c.status().ToString();
}

}  // namespace
}  // namespace kvtier::remote
