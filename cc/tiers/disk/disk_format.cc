#include "cc/tiers/disk/disk_format.h"

#include "cc/tiers/disk/crc32c.h"

namespace kvtier::disk {
namespace {
template <typename T>
uint32_t CrcOf(const T& h) {
  return Crc32c(std::as_bytes(std::span<const T, 1>(&h, 1)));
}
}  // namespace

void SealSegmentHeader(SegmentHeader* h) {
  h->crc = 0;
  h->crc = CrcOf(*h);
}

void SealRecordHeader(RecordHeader* h) {
  h->header_bytes = sizeof(RecordHeader);
  h->header_crc = 0;
  h->header_crc = CrcOf(*h);
}

bool SegmentHeaderValid(const SegmentHeader& h) {
  if (h.magic != kSegmentMagic || h.version != kFormatVersion) return false;
  SegmentHeader c = h;
  c.crc = 0;
  return CrcOf(c) == h.crc;
}

bool RecordHeaderValid(const RecordHeader& h) {
  if (h.magic != kRecordMagic || h.version != kFormatVersion || h.header_bytes != sizeof(RecordHeader))
    return false;
  RecordHeader c = h;
  c.header_crc = 0;
  return CrcOf(c) == h.header_crc;
}

}  // namespace kvtier::disk
