// Test fixture: real redis-server processes (Debian's redis-server 7.0) on
// free local ports in a temp directory, and a 3-master Redis Cluster made of
// them with `redis-cli --cluster create`. Tests only; aborts the test on
// setup failure (gtest ASSERTs), never leaves a server behind (SIGKILL in
// the destructor).
#pragma once

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace kvtier::remote::testing {

inline std::string TempRoot() {
  const char* t = std::getenv("TEST_TMPDIR");
  return t != nullptr ? t : "/tmp";
}

inline bool PortFree(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  close(fd);
  return ok;
}

// A port p with p and p + 10000 (the cluster bus) free right now.
inline int PickFreePort() {
  // Not seeded from getpid(): in Bazel's sandbox every test process has the
  // same small pid (own PID namespace), and parallel tests would all pick the
  // same ports.
  static std::mt19937 rng(std::random_device{}() ^
                          static_cast<unsigned>(std::chrono::steady_clock::now().time_since_epoch().count()));
  for (int i = 0; i < 1000; ++i) {
    const int p = 20000 + static_cast<int>(rng() % 30000);
    if (PortFree(p) && PortFree(p + 10000)) return p;
  }
  return -1;
}

// Runs argv[0] (searched in PATH) and returns its exit code and stdout+stderr.
inline int Run(const std::vector<std::string>& args, std::string* output = nullptr) {
  int pipefd[2];
  if (pipe(pipefd) != 0) return -1;
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, pipefd[1], 1);
  posix_spawn_file_actions_adddup2(&fa, pipefd[1], 2);
  posix_spawn_file_actions_addclose(&fa, pipefd[0]);
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  close(pipefd[1]);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(pipefd[0], buf, sizeof(buf))) > 0) out.append(buf, n);
  close(pipefd[0]);
  if (rc != 0) return -1;
  int status = 0;
  waitpid(pid, &status, 0);
  if (output != nullptr) *output = out;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

class RedisServer {
 public:
  // Starts `redis-server --port P --save '' --appendonly no --dir D <extra>`
  // and waits until it logs that it accepts connections. port 0 picks one.
  static std::unique_ptr<RedisServer> Start(std::vector<std::string> extra, int port = 0,
                                            bool tls_only = false) {
    auto s = std::unique_ptr<RedisServer>(new RedisServer());
    s->extra_ = std::move(extra);
    s->tls_only_ = tls_only;
    // A port picked here can be taken by another process before the server
    // binds it: pick again (a port the caller chose is tried once).
    for (int attempt = 0; attempt < (port != 0 ? 1 : 5); ++attempt) {
      s->port_ = port != 0 ? port : PickFreePort();
      s->dir_ = TempRoot() + "/redis-" + std::to_string(s->port_);
      std::filesystem::create_directories(s->dir_);
      const bool last = port != 0 || attempt == 4;
      if (s->Launch(/*report_bind_failure=*/last)) return s;
      if (!s->bind_failed_) return nullptr;
    }
    return nullptr;
  }
  ~RedisServer() { Kill(); }

  int port() const { return port_; }
  const std::string& dir() const { return dir_; }
  std::string addr() const { return "127.0.0.1:" + std::to_string(port_); }

  // SIGKILL: no shutdown, connections reset.
  void Kill() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }
  // Same arguments (and port unless given); the data set starts empty.
  bool Restart(int port = 0) {
    Kill();
    if (port != 0) port_ = port;
    return Launch(/*report_bind_failure=*/true);
  }

  // redis-cli -p P <args>; returns its output (trailing newline stripped).
  std::string Cli(std::vector<std::string> args) const {
    std::vector<std::string> argv = {"redis-cli", "-h", "127.0.0.1", "-p", std::to_string(port_)};
    argv.insert(argv.end(), args.begin(), args.end());
    std::string out;
    Run(argv, &out);
    while (!out.empty() && out.back() == '\n') out.pop_back();
    return out;
  }

 private:
  RedisServer() = default;

  bool Launch(bool report_bind_failure) {
    bind_failed_ = false;
    std::vector<std::string> args = {"redis-server", "--port", tls_only_ ? "0" : std::to_string(port_),
                                     "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                     "--dir", dir_, "--logfile", log_ = dir_ + "/redis.log"};
    args.insert(args.end(), extra_.begin(), extra_.end());
    std::filesystem::remove(log_);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    // Not the caller's stdout/stderr: a pipe reader would wait for the server.
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    if (posix_spawnp(&pid_, "redis-server", &fa, nullptr, argv.data(), environ) != 0) {
      posix_spawn_file_actions_destroy(&fa);
      ADD_FAILURE() << "cannot start redis-server";
      pid_ = -1;
      return false;
    }
    posix_spawn_file_actions_destroy(&fa);
    // Wait (bounded) for "Ready to accept connections" in its log.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (std::chrono::steady_clock::now() < give_up) {
      std::ifstream f(log_);
      std::stringstream ss;
      ss << f.rdbuf();
      if (ss.str().find("Ready to accept connections") != std::string::npos) return true;
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        bind_failed_ = ss.str().find("Address already in use") != std::string::npos;
        if (!bind_failed_ || report_bind_failure) {
          ADD_FAILURE() << "redis-server exited at start:\n" << ss.str();
        }
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));  // polling a log file
    }
    ADD_FAILURE() << "redis-server on port " << port_ << " not ready after 20 s";
    Kill();
    return false;
  }

  pid_t pid_ = -1;
  int port_ = 0;
  bool tls_only_ = false;
  bool bind_failed_ = false;
  std::vector<std::string> extra_;
  std::string dir_;
  std::string log_;
};

// Three masters, no replicas, every slot assigned. Nodes keep serving their
// slots while another is down (cluster-require-full-coverage no).
class RedisCluster {
 public:
  static std::unique_ptr<RedisCluster> Start(int masters = 3) {
    auto c = std::unique_ptr<RedisCluster>(new RedisCluster());
    std::vector<std::string> create = {"redis-cli", "--cluster", "create"};
    for (int i = 0; i < masters; ++i) {
      auto s = RedisServer::Start({"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                   "--cluster-node-timeout", "1000",
                                   "--cluster-require-full-coverage", "no"});
      if (s == nullptr) return nullptr;
      create.push_back(s->addr());
      c->nodes_.push_back(std::move(s));
    }
    create.insert(create.end(), {"--cluster-replicas", "0", "--cluster-yes"});
    std::string out;
    if (Run(create, &out) != 0) {
      ADD_FAILURE() << "redis-cli --cluster create failed:\n" << out;
      return nullptr;
    }
    if (!c->WaitHealthy()) return nullptr;
    return c;
  }

  RedisServer& node(int i) { return *nodes_[i]; }
  int size() const { return static_cast<int>(nodes_.size()); }
  std::string url() const {
    return "redis+cluster://" + nodes_[0]->addr() + "," + nodes_[1]->addr();
  }
  std::string NodeId(int i) const { return nodes_[i]->Cli({"cluster", "myid"}); }
  // Index of the node that owns `slot`, as that node's CLUSTER NODES says.
  int OwnerOf(int slot) const {
    const std::string nodes = nodes_[0]->Cli({"cluster", "nodes"});
    std::istringstream lines(nodes);
    std::string line;
    while (std::getline(lines, line)) {
      std::istringstream f(line);
      std::string id, addr, flags, master, ping, pong, epoch, state, range;
      f >> id >> addr >> flags >> master >> ping >> pong >> epoch >> state;
      while (f >> range) {
        const size_t dash = range.find('-');
        if (range.front() == '[') continue;
        const int lo = std::stoi(range.substr(0, dash));
        const int hi = dash == std::string::npos ? lo : std::stoi(range.substr(dash + 1));
        if (slot < lo || slot > hi) continue;
        const int port = std::stoi(addr.substr(addr.find(':') + 1, addr.find('@') - addr.find(':') - 1));
        for (int i = 0; i < static_cast<int>(nodes_.size()); ++i) {
          if (nodes_[i]->port() == port) return i;
        }
      }
    }
    return -1;
  }

  // Bounded wait until every node reports cluster_state:ok and agrees on
  // the slot map (every node sees all slots assigned).
  bool WaitHealthy() {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < give_up) {
      bool ok = true;
      for (auto& n : nodes_) {
        const std::string info = n->Cli({"cluster", "info"});
        ok = ok && info.find("cluster_state:ok") != std::string::npos &&
             info.find("cluster_slots_ok:16384") != std::string::npos &&
             info.find("cluster_known_nodes:" + std::to_string(nodes_.size())) != std::string::npos;
      }
      if (ok) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));  // polling cluster state
    }
    ADD_FAILURE() << "cluster not healthy after 30 s";
    return false;
  }

 private:
  RedisCluster() = default;
  std::vector<std::unique_ptr<RedisServer>> nodes_;
};

}  // namespace kvtier::remote::testing
