#include "cc/tiers/remote/redis_url.h"

#include <algorithm>
#include <charconv>

namespace kvtier::remote {
namespace {

constexpr std::string_view kRedacted = "***";

// Replaces the password in the userinfo of a (possibly malformed) URL by
// "***", for error messages. Works on the raw text so that it also redacts
// URLs that fail to parse.
std::string RedactRaw(std::string_view url) {
  const size_t scheme_end = url.find("://");
  if (scheme_end == std::string_view::npos) {
    // No authority to find: a bare string may itself be a secret.
    return url.find('@') == std::string_view::npos ? std::string(url) : "<redacted>";
  }
  const size_t auth_begin = scheme_end + 3;
  const size_t at = url.rfind('@');
  if (at == std::string_view::npos || at < auth_begin) return std::string(url);
  const std::string_view userinfo = url.substr(auth_begin, at - auth_begin);
  const size_t colon = userinfo.find(':');
  std::string out(url.substr(0, auth_begin));
  out += colon == std::string_view::npos ? std::string(kRedacted)
                                         : std::string(userinfo.substr(0, colon + 1)) +
                                               std::string(kRedacted);
  out += url.substr(at);
  return out;
}

Status Bad(std::string_view url, std::string_view why) {
  return InvalidArgument("invalid Redis URL '" + RedactRaw(url) + "': " + std::string(why));
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

bool PercentDecode(std::string_view in, std::string* out) {
  out->clear();
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '%') {
      out->push_back(in[i]);
      continue;
    }
    if (i + 2 >= in.size()) return false;  // "%" needs two hex digits
    const int hi = HexValue(in[i + 1]);
    const int lo = HexValue(in[i + 2]);
    if (hi < 0 || lo < 0) return false;
    out->push_back(static_cast<char>(hi * 16 + lo));
    i += 2;
  }
  return true;
}

bool ParseInt(std::string_view s, int64_t min, int64_t max, int64_t* v) {
  if (s.empty() || s.size() > 10) return false;
  if (!std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; })) return false;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *v);
  return ec == std::errc() && p == s.data() + s.size() && *v >= min && *v <= max;
}

// "host[:port]" or "[v6][:port]".
bool ParseHostPort(std::string_view s, RedisEndpoint* ep, std::string* why) {
  std::string_view host;
  std::string_view rest;
  if (!s.empty() && s.front() == '[') {
    const size_t close = s.find(']');
    if (close == std::string_view::npos) {
      *why = "unterminated '[' in host '" + std::string(s) + "'";
      return false;
    }
    host = s.substr(1, close - 1);
    rest = s.substr(close + 1);
    if (!rest.empty() && rest.front() != ':') {
      *why = "unexpected text after ']' in '" + std::string(s) + "'";
      return false;
    }
  } else {
    const size_t colon = s.find(':');
    host = s.substr(0, colon);
    rest = colon == std::string_view::npos ? std::string_view() : s.substr(colon);
    if (host.find_first_of("[]/?#@ ") != std::string_view::npos) {
      *why = "invalid host '" + std::string(host) + "'";
      return false;
    }
  }
  if (host.empty()) {
    *why = "empty host";
    return false;
  }
  ep->host = std::string(host);
  ep->port = 6379;
  if (!rest.empty()) {
    int64_t port = 0;
    if (!ParseInt(rest.substr(1), 1, 65535, &port)) {
      *why = "invalid port '" + std::string(rest.substr(1)) + "' (want 1..65535)";
      return false;
    }
    ep->port = static_cast<int>(port);
  }
  return true;
}

}  // namespace

std::string RedisEndpoint::ToString() const {
  const bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

std::string RedisUrl::Redacted() const {
  std::string out = tls ? "rediss" : "redis";
  if (cluster) out += "+cluster";
  out += "://";
  if (!password.empty()) out += username + ":" + std::string(kRedacted) + "@";
  for (size_t i = 0; i < nodes.size(); ++i) {
    if (i > 0) out += ",";
    out += nodes[i].ToString();
  }
  if (db != 0) out += "/" + std::to_string(db);
  return out;
}

StatusOr<RedisUrl> ParseRedisUrl(std::string_view url) {
  RedisUrl out;
  const size_t scheme_end = url.find("://");
  if (scheme_end == std::string_view::npos) return Bad(url, "missing scheme (want redis://, rediss://, redis+cluster:// or rediss+cluster://)");
  const std::string_view scheme = url.substr(0, scheme_end);
  if (scheme == "redis") {
  } else if (scheme == "rediss") {
    out.tls = true;
  } else if (scheme == "redis+cluster") {
    out.cluster = true;
  } else if (scheme == "rediss+cluster") {
    out.cluster = out.tls = true;
  } else {
    return Bad(url, "unknown scheme '" + std::string(scheme) +
                        "' (want redis, rediss, redis+cluster or rediss+cluster)");
  }
  std::string_view rest = url.substr(scheme_end + 3);
  if (rest.find_first_of("?#") != std::string_view::npos) {
    return Bad(url, "query strings and fragments are not supported");
  }
  const size_t at = rest.rfind('@');
  if (at != std::string_view::npos) {
    const std::string_view userinfo = rest.substr(0, at);
    rest = rest.substr(at + 1);
    const size_t colon = userinfo.find(':');
    if (colon == std::string_view::npos) {
      return Bad(url, "credentials must be ':password' or 'user:password'");
    }
    if (!PercentDecode(userinfo.substr(0, colon), &out.username) ||
        !PercentDecode(userinfo.substr(colon + 1), &out.password)) {
      return Bad(url, "bad percent-encoding in the credentials");
    }
    if (out.password.empty()) return Bad(url, "empty password");
  }
  const size_t slash = rest.find('/');
  const std::string_view hosts = rest.substr(0, slash);
  if (slash != std::string_view::npos) {
    const std::string_view db = rest.substr(slash + 1);
    if (!db.empty()) {
      int64_t v = 0;
      if (!ParseInt(db, 0, INT32_MAX, &v)) {
        return Bad(url, "invalid database '" + std::string(db) + "' (want a number >= 0)");
      }
      out.db = static_cast<int>(v);
    }
    if (out.cluster && out.db != 0) return Bad(url, "a Redis Cluster has only database 0");
  }
  size_t begin = 0;
  while (true) {
    const size_t comma = hosts.find(',', begin);
    const std::string_view one = hosts.substr(begin, comma == std::string_view::npos ? std::string_view::npos : comma - begin);
    RedisEndpoint ep;
    std::string why;
    if (!ParseHostPort(one, &ep, &why)) return Bad(url, why);
    out.nodes.push_back(std::move(ep));
    if (comma == std::string_view::npos) break;
    begin = comma + 1;
  }
  if (!out.cluster && out.nodes.size() != 1) {
    return Bad(url, "several hosts need the redis+cluster:// scheme");
  }
  return out;
}

uint16_t Crc16(std::string_view data) {
  // CRC16-CCITT (XMODEM): polynomial 0x1021, initial 0, no reflection, as in
  // the Redis Cluster specification.
  uint16_t crc = 0;
  for (const char c : data) {
    crc ^= static_cast<uint16_t>(static_cast<uint8_t>(c)) << 8;
    for (int i = 0; i < 8; ++i) {
      crc = (crc & 0x8000) != 0 ? static_cast<uint16_t>((crc << 1) ^ 0x1021)
                                : static_cast<uint16_t>(crc << 1);
    }
  }
  return crc;
}

int HashSlot(std::string_view key) {
  const size_t open = key.find('{');
  if (open != std::string_view::npos) {
    const size_t close = key.find('}', open + 1);
    if (close != std::string_view::npos && close > open + 1) {
      key = key.substr(open + 1, close - open - 1);
    }
  }
  return Crc16(key) & (kClusterSlots - 1);
}

ReconnectBackoff::ReconnectBackoff(Clock::duration initial, Clock::duration max, uint64_t seed)
    : initial_(initial), max_(std::max(initial, max)), rng_(static_cast<uint32_t>(seed | 1)) {}

void ReconnectBackoff::RecordFailure(Clock::time_point now) {
  ++failures_;
  Clock::duration d = initial_;
  for (int i = 1; i < failures_ && d < max_; ++i) d *= 2;
  d = std::min(d, max_);
  // Jitter so that many clients that lost the same server do not reconnect
  // in lock step.
  std::uniform_int_distribution<int64_t> jitter(d.count() / 2, d.count());
  next_attempt_ = now + Clock::duration(jitter(rng_));
}

void ReconnectBackoff::RecordSuccess() {
  failures_ = 0;
  next_attempt_ = Clock::time_point{};
}

}  // namespace kvtier::remote
