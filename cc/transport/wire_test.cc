#include "cc/transport/wire.h"

#include <cstring>

#include <gtest/gtest.h>

namespace kvtier::transport::wire {
namespace {

Pull SamplePull(size_t n) {
  Pull p;
  p.flags = kFlagReleaseHold;
  p.request_id = 42;
  p.namespace_key = ChunkKey{1, 2};
  p.layout_id = 9;
  for (size_t i = 0; i < n; ++i) p.entries.push_back({ChunkKey{i + 1, 7}, i * 3});
  return p;
}

TEST(WireTest, PullRoundTrips) {
  auto msg = EncodePull(SamplePull(3));
  EXPECT_EQ(msg.size(), sizeof(PullHeader) + 3 * sizeof(PullEntry));
  auto p = DecodePull(msg);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->request_id, 42u);
  EXPECT_EQ(p->layout_id, 9u);
  EXPECT_EQ(p->namespace_key, (ChunkKey{1, 2}));
  ASSERT_EQ(p->entries.size(), 3u);
  EXPECT_EQ(p->entries[2].key, (ChunkKey{3, 7}));
  EXPECT_EQ(p->entries[2].fingerprint, 6u);
}

TEST(WireTest, PullRejectsEveryMalformedField) {
  auto good = EncodePull(SamplePull(2));
  auto with = [&](size_t off, uint32_t v) {
    auto m = good;
    std::memcpy(m.data() + off, &v, sizeof(v));
    return m;
  };
  EXPECT_EQ(DecodePull({}).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodePull(with(0, 0xdeadbeef)).status().code(), StatusCode::kInvalidArgument);  // magic
  // version 2 of a PULL: kNotImplemented (answered kBadVersion)
  auto v2 = good;
  uint16_t two = 2;
  std::memcpy(v2.data() + 4, &two, 2);
  EXPECT_EQ(DecodePull(v2).status().code(), StatusCode::kNotImplemented);
  EXPECT_EQ(DecodePull(with(8, 0x80)).status().code(), StatusCode::kInvalidArgument);         // unknown flag
  EXPECT_EQ(DecodePull(with(12, 0)).status().code(), StatusCode::kInvalidArgument);            // count 0
  EXPECT_EQ(DecodePull(with(12, 3)).status().code(), StatusCode::kInvalidArgument);            // count vs length
  EXPECT_EQ(DecodePull(with(12, 0xffffffffu)).status().code(), StatusCode::kInvalidArgument);  // huge count
  auto truncated = good;
  truncated.pop_back();
  EXPECT_EQ(DecodePull(truncated).status().code(), StatusCode::kInvalidArgument);
  auto longer = good;
  longer.push_back(std::byte{0});
  EXPECT_EQ(DecodePull(longer).status().code(), StatusCode::kInvalidArgument);
  // Too many chunks even when the length matches.
  auto big = EncodePull(SamplePull(kMaxPullChunks + 1));
  EXPECT_EQ(DecodePull(big).status().code(), StatusCode::kInvalidArgument);
  // A reply or a release is not a pull.
  EXPECT_EQ(DecodePull(EncodeRelease(1)).status().code(), StatusCode::kInvalidArgument);
  // Every prefix of a good message is rejected, never read past its end.
  for (size_t n = 0; n < good.size(); ++n) {
    EXPECT_FALSE(DecodePull(std::span<const std::byte>(good.data(), n)).ok()) << n;
  }
}

TEST(WireTest, ReplyRoundTripsAndChecksAddresses) {
  Reply r;
  r.request_id = 5;
  r.lease_id = 6;
  r.region_base = 4096;
  r.region_size = 1 << 20;
  ReplyEntry e{};
  e.key = ChunkKey{1, 1};
  e.found = 1;
  e.addr = 4096 + 1000;
  e.size = 2000;
  r.entries.push_back(e);
  r.rkey = std::vector<std::byte>(10, std::byte{3});
  auto d = DecodeReply(EncodeReply(r));
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->lease_id, 6u);
  EXPECT_EQ(d->rkey.size(), 10u);
  EXPECT_EQ(d->entries[0].addr, 4096u + 1000);

  for (auto [addr, size] : {std::pair<uint64_t, uint64_t>{0, 10}, {4096 + (1 << 20) - 10, 11},
                            {4096, 0}, {~uint64_t{0} - 5, 10}}) {
    Reply bad = r;
    bad.entries[0].addr = addr;
    bad.entries[0].size = size;
    EXPECT_FALSE(DecodeReply(EncodeReply(bad)).ok()) << addr << " " << size;
  }
  Reply no_rkey = r;
  no_rkey.rkey.clear();
  EXPECT_FALSE(DecodeReply(EncodeReply(no_rkey)).ok());
  auto msg = EncodeReply(r);
  for (size_t n = 0; n < msg.size(); ++n) EXPECT_FALSE(DecodeReply(std::span<const std::byte>(msg.data(), n)).ok()) << n;
}

TEST(WireTest, ReleaseRoundTrips) {
  auto id = DecodeRelease(EncodeRelease(77));
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(*id, 77u);
  auto m = EncodeRelease(77);
  m.pop_back();
  EXPECT_FALSE(DecodeRelease(m).ok());
}

}  // namespace
}  // namespace kvtier::transport::wire
