// Fuzz target: the disk record and segment header checks (disk_format.h) on
// arbitrary bytes, as rebuild and every Get apply them to a block read from
// disk.
//
// Input: byte 0 selects the segment size (a multiple of 4096 in [8 KiB,
// 1 GiB]) and whether the header's checksum is recomputed first (a forged
// header carries a right one); the rest is the header block (zero padded).
// Checks, beyond "no sanitizer report": a header that passes
// RecordHeaderValid and PayloadBytesFit gives a record whose size neither
// wraps nor leaves a segment when it starts at the last block a record can
// start at; RecordHeaderValid is exactly "magic, version, header_bytes and
// checksum right"; sealing a header makes it valid iff those fields are.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "cc/fuzz/fuzz_check.h"
#include "cc/tiers/disk/crc32c.h"
#include "cc/tiers/disk/disk_format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvtier::disk;
  if (size == 0) return 0;
  const uint8_t control = data[0];
  // 2 blocks .. 2^18 blocks (1 GiB), in powers of two and a few odd sizes.
  const uint64_t blocks = (control & 0x40) ? 2 + (control & 0x3F) * 977 : uint64_t{2} << (control & 0x0F) % 18;
  const uint64_t seg = blocks * kBlock;
  std::byte block[kBlock] = {};
  std::memcpy(block, data + 1, std::min<size_t>(size - 1, kBlock));

  auto h = LoadHeader<RecordHeader>(block);
  if (control & 0x80) {
    h.header_crc = 0;
    h.header_crc = Crc32c(std::as_bytes(std::span<const RecordHeader, 1>(&h, 1)));
  }
  RecordHeader zeroed = h;
  zeroed.header_crc = 0;
  const bool fields_ok = h.magic == kRecordMagic && h.version == kFormatVersion && h.header_bytes == sizeof(RecordHeader);
  const bool crc_ok = Crc32c(std::as_bytes(std::span<const RecordHeader, 1>(&zeroed, 1))) == h.header_crc;
  FUZZ_CHECK(RecordHeaderValid(h) == (fields_ok && crc_ok), "RecordHeaderValid disagrees with its definition");

  if (RecordHeaderValid(h) && PayloadBytesFit(h.payload_bytes, seg)) {
    // The last place a record can start is the last block; anything that fits
    // from the first record block must not wrap from there either.
    const uint64_t rec = RecordBytes(h.payload_bytes);
    FUZZ_CHECK(rec > h.payload_bytes && rec % kBlock == 0 && rec <= seg - kBlock,
               "payload_bytes %llu fits a %llu-byte segment but RecordBytes is %llu",
               static_cast<unsigned long long>(h.payload_bytes), static_cast<unsigned long long>(seg),
               static_cast<unsigned long long>(rec));
    for (uint64_t pos = kBlock; pos < seg; pos += seg / 4 + kBlock) {
      const bool inside = rec <= seg - pos;
      FUZZ_CHECK(inside == (pos + rec <= seg), "bounds check wraps at %llu", static_cast<unsigned long long>(pos));
    }
  }

  RecordHeader sealed = h;
  SealRecordHeader(&sealed);
  FUZZ_CHECK(RecordHeaderValid(sealed) == (h.magic == kRecordMagic && h.version == kFormatVersion),
             "a sealed header's validity depends on more than magic and version");

  // The same bytes as a segment header.
  auto sh = LoadHeader<SegmentHeader>(block);
  SegmentHeader sh_sealed = sh;
  SealSegmentHeader(&sh_sealed);
  FUZZ_CHECK(SegmentHeaderValid(sh_sealed) == (sh.magic == kSegmentMagic && sh.version == kFormatVersion),
             "a sealed segment header's validity depends on more than magic and version");
  (void)SegmentHeaderValid(sh);
  return 0;
}
