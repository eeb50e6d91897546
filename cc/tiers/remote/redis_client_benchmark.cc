// RedisClient put/get of 1 MiB and 4 MiB values against a raw pipelined
// hiredis loop moving the same bytes to the same server in the same run.
//
//   bazel run --config=opt //cc/tiers/remote:redis_client_benchmark
//   (or tools/bench.sh micro). KVTIER_BENCH_REDIS_URL=redis://host:port uses
//   that server (it is FLUSHALLed!); default: a redis-server started here on
//   a free local port, --save '' --appendonly no.
//
// One iteration moves a batch of kBatchBytes (16 values of 1 MiB or 4 of
// 4 MiB). Put: SET key value NX of fresh keys, pipelined; FLUSHALL between
// iterations, untimed, so every SET stores. Get: GET of the same stored keys,
// pipelined. The client's runs include its routing, deadline handling and
// reply checks; values are handed to a callback without a copy, and the raw
// loop only frees its replies, so both do the same work per byte.
#include <hiredis/hiredis.h>

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "cc/common/bench_main.h"
#include "cc/tiers/remote/redis_client.h"
#include "cc/tiers/remote/redis_test_server.h"

namespace kvtier::remote {
namespace {

using namespace std::chrono_literals;

constexpr int64_t k1M = 1 << 20;
constexpr int64_t k4M = 4 << 20;
constexpr int64_t kBatchBytes = 16 << 20;

struct Env {
  std::unique_ptr<testing::RedisServer> server;  // when we started one
  std::string url;
  RedisEndpoint ep;
  redisContext* raw = nullptr;
  std::unique_ptr<RedisClient> client;

  Env() {
    const char* u = std::getenv("KVTIER_BENCH_REDIS_URL");
    if (u != nullptr && *u != '\0') {
      url = u;
    } else {
      server = testing::RedisServer::Start({});
      if (server == nullptr) Die("cannot start redis-server");
      url = "redis://" + server->addr();
    }
    auto parsed = ParseRedisUrl(url);
    if (!parsed.ok() || parsed->cluster || parsed->tls) Die("want a redis:// URL of one node");
    ep = parsed->nodes[0];
    raw = redisConnect(ep.host.c_str(), ep.port);
    if (raw == nullptr || raw->err != 0) Die("raw hiredis connect failed");
    if (!parsed->password.empty()) Command({"AUTH", parsed->password});
    RedisClientOptions o;
    o.command_timeout = 30s;
    auto c = RedisClient::Create(*parsed, o);
    if (!c.ok()) Die(c.status().ToString());
    client = std::move(c).value();
  }

  [[noreturn]] static void Die(const std::string& why) {
    std::fprintf(stderr, "redis_client_benchmark: %s\n", why.c_str());
    std::exit(1);
  }

  void Command(std::vector<std::string> args) {
    std::vector<const char*> argv;
    std::vector<size_t> len;
    for (auto& a : args) {
      argv.push_back(a.data());
      len.push_back(a.size());
    }
    auto* r = static_cast<redisReply*>(
        redisCommandArgv(raw, static_cast<int>(argv.size()), argv.data(), len.data()));
    if (r == nullptr || r->type == REDIS_REPLY_ERROR) Die("raw command failed: " + args[0]);
    freeReplyObject(r);
  }
};

Env& GetEnv() {
  static Env env;  // destroyed at exit: the server started here is killed
  return env;
}

std::vector<std::string> Keys(const char* prefix, int n) {
  std::vector<std::string> k;
  for (int i = 0; i < n; ++i) k.push_back(std::string(prefix) + ":" + std::to_string(i));
  return k;
}

std::string Value(int64_t size) {
  std::string v(size, '\0');
  for (int64_t i = 0; i < size; ++i) v[i] = static_cast<char>(i * 2654435761u >> 24);
  return v;
}

void RawPipeline(Env& env, const std::vector<std::string>& keys, const std::string* value) {
  for (const auto& k : keys) {
    if (value != nullptr) {
      const char* argv[] = {"SET", k.data(), value->data(), "NX"};
      const size_t len[] = {3, k.size(), value->size(), 2};
      redisAppendCommandArgv(env.raw, 4, argv, len);
    } else {
      const char* argv[] = {"GET", k.data()};
      const size_t len[] = {3, k.size()};
      redisAppendCommandArgv(env.raw, 2, argv, len);
    }
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    void* r = nullptr;
    if (redisGetReply(env.raw, &r) != REDIS_OK || r == nullptr) Env::Die("raw pipeline failed");
    const auto* reply = static_cast<redisReply*>(r);
    if (reply->type == REDIS_REPLY_ERROR || reply->type == REDIS_REPLY_NIL) Env::Die("raw reply not a hit");
    benchmark::DoNotOptimize(reply->str);
    freeReplyObject(r);
  }
}

void BM_RawHiredisPut(benchmark::State& state) {
  Env& env = GetEnv();
  const std::string value = Value(state.range(0));
  const auto keys = Keys("raw-put", static_cast<int>(kBatchBytes / state.range(0)));
  env.Command({"FLUSHALL"});
  for (auto _ : state) {
    RawPipeline(env, keys, &value);
    state.PauseTiming();
    env.Command({"FLUSHALL"});
    state.ResumeTiming();
  }
  state.SetBytesProcessed(state.iterations() * kBatchBytes);
}

void BM_RemotePut(benchmark::State& state) {
  Env& env = GetEnv();
  const std::string value = Value(state.range(0));
  const auto keys = Keys("remote-put", static_cast<int>(kBatchBytes / state.range(0)));
  std::vector<KeyValue> items;
  for (const auto& k : keys) items.push_back({k, value});
  std::vector<KeyResult> results;
  env.Command({"FLUSHALL"});
  for (auto _ : state) {
    Status s = env.client->SetNxMany(items, 0s, &results);
    if (!s.ok() || results[0] != KeyResult::kHit) Env::Die("put failed: " + s.ToString());
    state.PauseTiming();
    env.Command({"FLUSHALL"});
    state.ResumeTiming();
  }
  state.SetBytesProcessed(state.iterations() * kBatchBytes);
}

void BM_RawHiredisGet(benchmark::State& state) {
  Env& env = GetEnv();
  const std::string value = Value(state.range(0));
  const auto keys = Keys("raw-get", static_cast<int>(kBatchBytes / state.range(0)));
  env.Command({"FLUSHALL"});
  RawPipeline(env, keys, &value);
  for (auto _ : state) RawPipeline(env, keys, nullptr);
  state.SetBytesProcessed(state.iterations() * kBatchBytes);
}

void BM_RemoteGet(benchmark::State& state) {
  Env& env = GetEnv();
  const std::string value = Value(state.range(0));
  const auto keys = Keys("remote-get", static_cast<int>(kBatchBytes / state.range(0)));
  env.Command({"FLUSHALL"});
  RawPipeline(env, keys, &value);
  std::vector<std::string_view> views(keys.begin(), keys.end());
  std::vector<KeyResult> results;
  const RedisClient::ValueFn touch = [](size_t, std::string_view v) { benchmark::DoNotOptimize(v.data()); };
  for (auto _ : state) {
    Status s = env.client->GetMany(views, touch, &results);
    if (!s.ok() || results.back() != KeyResult::kHit) Env::Die("get failed: " + s.ToString());
  }
  state.SetBytesProcessed(state.iterations() * kBatchBytes);
}

// Each client run right after its baseline, so that load from other
// processes on the machine drifts less between the two.
BENCHMARK(BM_RawHiredisPut)->Arg(k1M)->UseRealTime();
BENCHMARK(BM_RemotePut)->Arg(k1M)->UseRealTime();
BENCHMARK(BM_RawHiredisPut)->Arg(k4M)->UseRealTime();
BENCHMARK(BM_RemotePut)->Arg(k4M)->UseRealTime();
BENCHMARK(BM_RawHiredisGet)->Arg(k1M)->UseRealTime();
BENCHMARK(BM_RemoteGet)->Arg(k1M)->UseRealTime();
BENCHMARK(BM_RawHiredisGet)->Arg(k4M)->UseRealTime();
BENCHMARK(BM_RemoteGet)->Arg(k4M)->UseRealTime();

using bench::Metric;
KVTIER_BENCH_COMPARE("remote_put_1MiB_vs_raw_hiredis", "BM_RemotePut/1048576/real_time",
                     "BM_RawHiredisPut/1048576/real_time", Metric::kBytesPerSecond);
KVTIER_BENCH_COMPARE("remote_put_4MiB_vs_raw_hiredis", "BM_RemotePut/4194304/real_time",
                     "BM_RawHiredisPut/4194304/real_time", Metric::kBytesPerSecond);
KVTIER_BENCH_COMPARE("remote_get_1MiB_vs_raw_hiredis", "BM_RemoteGet/1048576/real_time",
                     "BM_RawHiredisGet/1048576/real_time", Metric::kBytesPerSecond);
KVTIER_BENCH_COMPARE("remote_get_4MiB_vs_raw_hiredis", "BM_RemoteGet/4194304/real_time",
                     "BM_RawHiredisGet/4194304/real_time", Metric::kBytesPerSecond);

}  // namespace
}  // namespace kvtier::remote
