// Fuzz target: the Redis URL parser and the cluster hash slot
// (redis_url.h), on arbitrary text as a user or a config file gives it.
//
// Input: the URL, verbatim. Checks, beyond "no sanitizer report":
// ParseRedisUrl returns only kOk or kInvalidArgument; a parsed URL has at
// least one node, ports in 1..65535, exactly one node unless it is a
// cluster, db >= 0 and db 0 in a cluster, a non-empty password whenever it
// has credentials; neither an error message nor Redacted() depends on the
// password (RotatePassword: the same URL with other letters in its password
// gives the same text); HashSlot is in [0, 16384) and a non-empty
// {hash tag} decides it alone.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "cc/fuzz/fuzz_check.h"
#include "cc/tiers/remote/redis_url.h"

namespace {

// `url` with every letter g-z / G-Z of its password (the raw text between
// the first ':' of the credentials and the last '@', or the whole
// credentials without a ':') rotated to another such letter. Those letters
// mean nothing to the grammar there (unlike '%', hex digits, '?' and '#'),
// so a parser that keeps passwords to itself answers both URLs with the same
// message and the same Redacted(). Empty if the password has no such letter.
std::string RotatePassword(std::string_view url) {
  const size_t scheme_end = url.find("://");
  if (scheme_end == std::string_view::npos) return {};
  const size_t begin = scheme_end + 3;
  const size_t at = url.rfind('@');
  if (at == std::string_view::npos || at < begin) return {};
  const size_t colon = url.substr(begin, at - begin).find(':');
  const size_t pw_begin = colon == std::string_view::npos ? begin : begin + colon + 1;
  std::string out(url);
  bool changed = false;
  for (size_t i = pw_begin; i < at; ++i) {
    char& c = out[i];
    if ((c >= 'g' && c <= 'z') || (c >= 'G' && c <= 'Z')) {
      c = c == 'z' ? 'g' : c == 'Z' ? 'G' : static_cast<char>(c + 1);
      changed = true;
    }
  }
  return changed ? out : std::string();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvtier;
  using namespace kvtier::remote;
  const std::string_view url(reinterpret_cast<const char*>(data), size);
  auto parsed = ParseRedisUrl(url);
  const std::string rotated = RotatePassword(url);
  if (!rotated.empty()) {
    auto other = ParseRedisUrl(rotated);
    FUZZ_CHECK(parsed.ok() == other.ok(), "the password's letters decide whether the URL parses");
    if (!parsed.ok()) {
      FUZZ_CHECK(parsed.status().ToString() == other.status().ToString(), "the error message shows the password: %s",
                 parsed.status().ToString().c_str());
    } else {
      FUZZ_CHECK(parsed->Redacted() == other->Redacted(), "Redacted() shows the password: %s",
                 parsed->Redacted().c_str());
      FUZZ_CHECK(parsed->password != other->password, "the password is not where the grammar puts it");
    }
  }
  if (!parsed.ok()) {
    FUZZ_CHECK(parsed.status().code() == StatusCode::kInvalidArgument, "ParseRedisUrl: %s",
               parsed.status().ToString().c_str());
  } else {
    const RedisUrl& u = *parsed;
    FUZZ_CHECK(!u.nodes.empty(), "no nodes");
    FUZZ_CHECK(u.cluster || u.nodes.size() == 1, "%zu nodes without cluster", u.nodes.size());
    FUZZ_CHECK(u.db >= 0 && (!u.cluster || u.db == 0), "db %d", u.db);
    for (const RedisEndpoint& ep : u.nodes) {
      FUZZ_CHECK(!ep.host.empty() && ep.port >= 1 && ep.port <= 65535, "endpoint %s", ep.ToString().c_str());
    }
    FUZZ_CHECK(u.username.empty() || !u.password.empty(), "a user without a password");
    FUZZ_CHECK(url.find('@') == std::string_view::npos || !u.password.empty() ||
                   url.rfind('@') < url.find("://"),
               "credentials with an empty password");
  }

  const int slot = HashSlot(url);
  FUZZ_CHECK(slot >= 0 && slot < kClusterSlots, "slot %d", slot);
  const size_t open = url.find('{');
  if (open != std::string_view::npos) {
    const size_t close = url.find('}', open + 1);
    if (close != std::string_view::npos && close > open + 1) {
      FUZZ_CHECK(slot == HashSlot(url.substr(open + 1, close - open - 1)), "a hash tag does not decide the slot");
    }
  }
  return 0;
}
