// Transfer bandwidth of PeerTransport::Pull between two processes against
// ucx_perftest (ucp_get) on the same UCX transport, in the same run.
//
// For each UCX_TLS setting (--tls, default "tcp" and "cma,self,tcp": TCP
// loopback and cross-memory attach; a UCX_TLS in the environment replaces
// the list) and chunk size (1 MiB, 4 MiB):
//   producer  this binary re-executed with --producer: an Engine holding
//             `chunks` chunks of that size, serving on 127.0.0.1:0
//   consumer  this process: Clear(), then Pull() of the whole prompt
//             (--total_mib, default 128), timed; after one warm-up pull,
//             --rounds (3) rounds of --reps (5) pulls alternate with the
//             baseline runs; each side reports its median
//   baseline  ucx_perftest server + client on loopback, -t ucp_get, the
//             same message size and UCX_TLS, -O <outstanding> (default:
//             the same number of gets in flight as one pull issues)
// A pull includes what the baseline does not: the request round trip,
// the producer's lease and CRC32C of every chunk, the consumer's slab
// reservation, CRC32C check and commit of every chunk.
//
// Output: one line per measurement on stderr, then one JSON object per
// comparison on stdout, last (the format of cc/common/bench_main.h, so
// tools/bench.sh micro collects them):
//   {"name": "transport_pull_1MiB_tcp_vs_ucx_perftest_get", "value": B/s,
//    "baseline": B/s, "ratio": ..., "metric": "bytes_per_second", ...}
// Without ucx_perftest on PATH the comparison is skipped (said on stderr).
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cc/engine/engine.h"
#include "cc/transport/peer_transport.h"

namespace kvtier::transport {
namespace {

constexpr uint32_t kChunkTokens = 256;
constexpr uint64_t kLayout = 1;

EngineOptions Options(size_t chunk_bytes, size_t chunks) {
  EngineOptions o;
  o.hash_namespace.model = "transport-bench";
  o.chunk_tokens = kChunkTokens;
  o.cpu.capacity_bytes = chunk_bytes * (chunks + chunks / 2 + 4);
  o.cpu.chunk_bytes = chunk_bytes;
  o.cpu.prefault = true;  // page faults are not what is measured
  return o;
}

std::vector<int32_t> Tokens(size_t chunks) {
  std::vector<int32_t> t(chunks * kChunkTokens);
  std::iota(t.begin(), t.end(), 1);
  return t;
}

int Producer(size_t chunk_bytes, size_t chunks) {
  auto engine = Engine::Create(Options(chunk_bytes, chunks));
  if (!engine.ok()) return std::fprintf(stderr, "producer: %s\n", engine.status().ToString().c_str()), 1;
  const auto tokens = Tokens(chunks);
  std::vector<std::vector<std::byte>> data(chunks, std::vector<std::byte>(chunk_bytes));
  for (size_t c = 0; c < chunks; ++c) {
    for (size_t i = 0; i < chunk_bytes; i += 64) data[c][i] = static_cast<std::byte>(c * 31 + i);
  }
  auto h = (*engine)->StoreBuffers(tokens, kLayout, {data.begin(), data.end()});
  if (!h.ok() || !(*h)->Wait().ok()) return std::fprintf(stderr, "producer: store failed\n"), 1;
  TransportOptions o;
  o.listen_host = "127.0.0.1";
  auto t = PeerTransport::Create(engine->get(), o);
  if (!t.ok()) return std::fprintf(stderr, "producer: %s\n", t.status().ToString().c_str()), 1;
  std::printf("ADDR %s\n", (*t)->address().c_str());  // UCX may log to stdout too
  std::fflush(stdout);
  char c;
  while (read(0, &c, 1) > 0) {
  }  // until the consumer closes our stdin
  return 0;
}

struct Child {
  pid_t pid = -1;
  int in = -1, out = -1;  // its stdin (write end), its stdout (read end)
};

Child Spawn(const std::vector<std::string>& argv) {
  int to[2], from[2];
  if (pipe(to) != 0 || pipe(from) != 0) return {};
  Child c;
  c.pid = fork();
  if (c.pid == 0) {
    dup2(to[0], 0);
    dup2(from[1], 1);
    close(to[1]);
    close(from[0]);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    _exit(127);
  }
  close(to[0]);
  close(from[1]);
  c.in = to[1];
  c.out = from[0];
  return c;
}

std::string ReadAll(int fd) {
  std::string s;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) s.append(buf, n);
  return s;
}

std::string ReadLine(int fd) {
  std::string s;
  char c;
  while (read(fd, &c, 1) == 1 && c != '\n') s.push_back(c);
  return s;
}

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

bool HavePerftest() { return std::system("command -v ucx_perftest >/dev/null 2>&1") == 0; }

// ucx_perftest's overall bandwidth in bytes/s ("Final:" row, MB = 2^20), or 0.
double Perftest(size_t bytes, size_t outstanding, size_t iters) {
  const int port = FreePort();
  Child server = Spawn({"ucx_perftest", "-p", std::to_string(port)});
  double bw = 0;
  for (int attempt = 0; attempt < 50 && bw == 0; ++attempt) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the server binds its port
    Child client = Spawn({"ucx_perftest", "127.0.0.1", "-p", std::to_string(port), "-t", "ucp_get", "-s",
                          std::to_string(bytes), "-n", std::to_string(iters), "-O", std::to_string(outstanding)});
    close(client.in);
    std::istringstream out(ReadAll(client.out));
    close(client.out);
    int status = 0;
    waitpid(client.pid, &status, 0);
    for (std::string line; std::getline(out, line);) {
      if (line.rfind("Final:", 0) != 0) continue;
      std::istringstream f(line.substr(6));
      double v[6] = {};
      for (double& x : v) f >> x;
      bw = v[5] * 1048576.0;  // iters, lat50, lat avg, lat overall, bw avg, bw overall
    }
  }
  close(server.in);
  kill(server.pid, SIGTERM);
  int status = 0;
  waitpid(server.pid, &status, 0);
  close(server.out);
  return bw;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

int Main(int argc, char** argv) {
  // Shared memory proper (UCX_TLS=sm: posix/sysv) needs memory UCX
  // allocated itself, which the CPU tier's region is not: cma is the
  // intra-node transport both sides can use (see BENCHMARKS.md).
  std::vector<std::string> tls = {"tcp", "cma,self,tcp"};
  std::vector<size_t> sizes = {1 << 20, 4 << 20};
  size_t total_bytes = 128 << 20;  // per pull
  int reps = 5, rounds = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--producer" && i + 2 < argc) return Producer(std::stoul(argv[i + 1]), std::stoul(argv[i + 2]));
    if (a.rfind("--reps=", 0) == 0) reps = std::max(1, std::stoi(a.substr(7)));
    if (a.rfind("--rounds=", 0) == 0) rounds = std::max(1, std::stoi(a.substr(9)));
    if (a.rfind("--total_mib=", 0) == 0) total_bytes = std::stoul(a.substr(12)) << 20;
    if (a.rfind("--tls=", 0) == 0) tls = {a.substr(6)};
    // Anything else (e.g. --benchmark_* from KVTIER_BENCH_ARGS) is not ours.
  }
  if (const char* env = std::getenv("UCX_TLS"); env != nullptr && *env != '\0') tls = {env};
  const bool perftest = HavePerftest();
  if (!perftest) std::fprintf(stderr, "transport_benchmark: ucx_perftest not on PATH (ucx-utils): no comparison\n");
  std::vector<std::string> json;
  for (const std::string& t : tls) {
    setenv("UCX_TLS", t.c_str(), 1);  // the producer, ucx_perftest and our own transport all read it
    for (size_t size : sizes) {
      const size_t chunks = std::max<size_t>(1, total_bytes / size);
      Child producer = Spawn({"/proc/self/exe", "--producer", std::to_string(size), std::to_string(chunks)});
      std::string addr;
      for (std::string line = ReadLine(producer.out); !line.empty(); line = ReadLine(producer.out)) {
        if (line.rfind("ADDR ", 0) == 0) {
          addr = line.substr(5);
          break;
        }
      }
      if (addr.empty()) {
        std::fprintf(stderr, "transport_benchmark: the producer did not start\n");
        return 1;
      }
      auto engine = Engine::Create(Options(size, chunks));
      auto client = engine.ok() ? PeerTransport::Create(engine->get(), TransportOptions{}) : engine.status();
      if (!client.ok()) {
        std::fprintf(stderr, "transport_benchmark: %s\n", client.status().ToString().c_str());
        return 1;
      }
      const auto tokens = Tokens(chunks);
      const size_t window = std::min<size_t>(chunks, 64);
      // Rounds alternate our pulls and ucx_perftest, so a busy machine
      // slows both alike; each side's figure is the median over rounds.
      std::vector<double> ours_by_round, base_by_round;
      for (int round = 0; round < rounds; ++round) {
        std::vector<double> rates;
        for (int r = round == 0 ? -1 : 0; r < reps; ++r) {  // r = -1: warm-up (connection, registration)
          (*engine)->Clear();
          const auto t0 = std::chrono::steady_clock::now();
          const size_t got = (*client)->Pull(addr, tokens, kLayout);
          const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          if (got != tokens.size()) {
            const TransportStats st = (*client)->Stats();
            std::fprintf(stderr, "transport_benchmark: pull got %zu of %zu tokens (errors %llu, timeouts %llu, corrupt %llu)\n",
                         got, tokens.size(), static_cast<unsigned long long>(st.errors),
                         static_cast<unsigned long long>(st.timeouts), static_cast<unsigned long long>(st.corrupt));
            return 1;
          }
          if (r >= 0) rates.push_back(static_cast<double>(chunks * size) / s);
        }
        ours_by_round.push_back(Median(rates));
        if (perftest) base_by_round.push_back(Perftest(size, window, std::max<size_t>(64, 4 * chunks)));
      }
      client->reset();
      engine->reset();
      close(producer.in);
      int status = 0;
      waitpid(producer.pid, &status, 0);
      close(producer.out);
      const double ours = Median(ours_by_round);
      const std::string mib = std::to_string(size >> 20) + "MiB";
      std::fprintf(stderr, "transport pull   %-5s UCX_TLS=%-12s %3zu chunks/pull:  %8.1f MiB/s (median of %d rounds x %d)\n",
                   mib.c_str(), t.c_str(), chunks, ours / 1048576.0, rounds, reps);
      if (!perftest) continue;
      const double base = Median(base_by_round);
      std::fprintf(stderr, "ucx_perftest get %-5s UCX_TLS=%-12s -O %3zu:              %8.1f MiB/s (median of %d runs)\n",
                   mib.c_str(), t.c_str(), window, base / 1048576.0, rounds);
      if (base <= 0) continue;
      std::string tag = t;
      std::replace(tag.begin(), tag.end(), ',', '_');
      char line[512];
      std::snprintf(line, sizeof(line),
                    "{\"name\": \"transport_pull_%s_%s_vs_ucx_perftest_get\", \"value\": %.6g, \"baseline\": %.6g, "
                    "\"ratio\": %.4f, \"metric\": \"bytes_per_second\", \"higher_is_better\": true}",
                    mib.c_str(), tag.c_str(), ours, base, ours / base);
      json.push_back(line);
    }
  }
  for (const auto& j : json) std::printf("%s\n", j.c_str());
  return 0;
}

}  // namespace
}  // namespace kvtier::transport

int main(int argc, char** argv) { return kvtier::transport::Main(argc, argv); }
