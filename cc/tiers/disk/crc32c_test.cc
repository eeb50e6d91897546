#include "cc/tiers/disk/crc32c.h"

#include <gtest/gtest.h>

#include <random>
#include <string_view>
#include <vector>

#include "cc/tiers/disk/disk_format.h"

namespace kvtier::disk {
namespace {

std::span<const std::byte> Bytes(std::string_view s) { return std::as_bytes(std::span(s.data(), s.size())); }

TEST(Crc32c, KnownVectors) {
  // RFC 3720 B.4 and the common "123456789" check value.
  EXPECT_EQ(Crc32c(Bytes("123456789")), 0xE3069283u);
  EXPECT_EQ(Crc32cExtendSoftware(0, Bytes("123456789")), 0xE3069283u);
  std::vector<std::byte> zeros(32, std::byte{0});
  EXPECT_EQ(Crc32c(zeros), 0x8A9136AAu);
  std::vector<std::byte> ones(32, std::byte{0xFF});
  EXPECT_EQ(Crc32c(ones), 0x62A8AB43u);
  EXPECT_EQ(Crc32c({}), 0u);
}

TEST(Crc32c, HardwareAndSoftwareAgreeAndExtendComposes) {
  std::mt19937_64 rng(42);
  std::vector<std::byte> buf(70000);
  for (auto& b : buf) b = static_cast<std::byte>(rng());
  for (size_t len : {0ul, 1ul, 7ul, 8ul, 9ul, 63ul, 4096ul, 4099ul, 12287ul, 12288ul, 12295ul, 24576ul, 69997ul}) {
    for (size_t off : {0ul, 1ul, 3ul}) {
      if (off + len > buf.size()) continue;
      std::span<const std::byte> s(buf.data() + off, len);
      const uint32_t sw = Crc32cExtendSoftware(0, s);
      if (Crc32cHardwareAvailable()) {
        EXPECT_EQ(Crc32cExtendHardware(0, s), sw) << len << "@" << off;
      }
      EXPECT_EQ(Crc32c(s), sw);
      for (size_t cut : {0ul, len / 3, len}) {
        EXPECT_EQ(Crc32cExtend(Crc32c(s.first(cut)), s.subspan(cut)), sw) << len << " cut " << cut;
      }
    }
  }
}

TEST(Crc32c, DetectsEverySingleBitFlip) {
  std::vector<std::byte> buf(512);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<std::byte>(i * 7);
  const uint32_t good = Crc32c(buf);
  for (size_t bit = 0; bit < buf.size() * 8; ++bit) {
    buf[bit / 8] ^= static_cast<std::byte>(1u << (bit % 8));
    ASSERT_NE(Crc32c(buf), good) << bit;
    buf[bit / 8] ^= static_cast<std::byte>(1u << (bit % 8));
  }
}

TEST(DiskFormat, HeadersSealAndValidate) {
  RecordHeader h{};
  h.magic = kRecordMagic;
  h.version = kFormatVersion;
  h.segment_gen = 9;
  h.key_lo = 1;
  h.payload_bytes = 100;
  SealRecordHeader(&h);
  EXPECT_TRUE(RecordHeaderValid(h));
  RecordHeader bad = h;
  bad.payload_bytes = 101;  // a field change without resealing
  EXPECT_FALSE(RecordHeaderValid(bad));
  bad = h;
  bad.version = 2;
  SealRecordHeader(&bad);
  EXPECT_FALSE(RecordHeaderValid(bad)) << "unknown versions are rejected even with a good crc";

  SegmentHeader s{};
  s.magic = kSegmentMagic;
  s.version = kFormatVersion;
  s.gen = 3;
  SealSegmentHeader(&s);
  EXPECT_TRUE(SegmentHeaderValid(s));
  s.gen = 4;
  EXPECT_FALSE(SegmentHeaderValid(s));
  EXPECT_EQ(RecordBytes(1), 2 * kBlock);
  EXPECT_EQ(RecordBytes(4096), 2 * kBlock);
  EXPECT_EQ(RecordBytes(4097), 3 * kBlock);
}

}  // namespace
}  // namespace kvtier::disk
