// Fuzz target: the remote tier's value check (CheckRemoteRecord,
// remote_record.h) on values another writer (or a corrupt, truncated or
// foreign Redis value) could hold.
//
// Input: byte 0 control: bit 0 recompute header_crc, bit 1 recompute
// payload_crc, bit 2 expect the key, fingerprint and token count the header
// names (else a fixed chunk), bits 3-5 the largest payload asked for
// (1 << (4 + 2*k) bytes); the rest is the value, verbatim. The checksums are
// what a forged value recomputes anyway, so the control byte lets mutations
// past them.
// Checks, beyond "no sanitizer report": only kOk, kDataLoss or kNotFound; on
// kOk the payload lies inside the value right after the header, is 1..max
// bytes, ends the value, and matches its CRC32C and the header's key,
// fingerprint and token count; EncodeRemoteRecord of any chunk and payload
// passes the check and gives the payload back.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>

#include "cc/fuzz/fuzz_check.h"
#include "cc/tiers/disk/crc32c.h"
#include "cc/tiers/remote/remote_record.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvtier;
  using namespace kvtier::remote;
  if (size == 0) return 0;
  const uint8_t control = data[0];
  const size_t max_payload = size_t{1} << (4 + 2 * ((control >> 3) & 7));
  std::string value(reinterpret_cast<const char*>(data + 1), size - 1);
  const size_t h_size = sizeof(RemoteRecordHeader);

  ChunkMeta expected;
  expected.key = ChunkKey{0x1111, 0x2222};
  expected.fingerprint = 0x3333;
  expected.num_tokens = 16;
  if (value.size() >= h_size) {
    RemoteRecordHeader h;
    std::memcpy(&h, value.data(), h_size);
    if ((control & 2) && h.payload_bytes <= value.size() - h_size) {
      h.payload_crc = disk::Crc32c(std::as_bytes(std::span(value.data() + h_size, h.payload_bytes)));
    }
    if (control & 1) {
      h.header_crc = 0;
      h.header_crc = disk::Crc32c(std::as_bytes(std::span<const RemoteRecordHeader, 1>(&h, 1)));
    }
    std::memcpy(value.data(), &h, h_size);
    if (control & 4) {
      expected.key = ChunkKey{h.key_lo, h.key_hi};
      expected.fingerprint = h.fingerprint;
      expected.num_tokens = h.num_tokens;
    }
  }

  std::span<const std::byte> payload;
  uint64_t layout_id = 0;
  const Status s = CheckRemoteRecord(value, expected, max_payload, &payload, &layout_id);
  FUZZ_CHECK(s.ok() || s.code() == StatusCode::kDataLoss || s.code() == StatusCode::kNotFound,
             "CheckRemoteRecord: %s", s.ToString().c_str());
  if (s.ok()) {
    RemoteRecordHeader h;
    std::memcpy(&h, value.data(), h_size);
    const auto* base = reinterpret_cast<const std::byte*>(value.data());
    FUZZ_CHECK(payload.data() == base + h_size && payload.size() == value.size() - h_size, "payload span");
    FUZZ_CHECK(!payload.empty() && payload.size() <= max_payload && payload.size() == h.payload_bytes,
               "payload of %zu bytes accepted (max %zu)", payload.size(), max_payload);
    FUZZ_CHECK(disk::Crc32c(payload) == h.payload_crc, "payload CRC");
    FUZZ_CHECK((ChunkKey{h.key_lo, h.key_hi} == expected.key) && h.fingerprint == expected.fingerprint &&
                   h.num_tokens == expected.num_tokens && layout_id == h.layout_id,
               "another chunk's record accepted");
  }

  // Whatever we write, we read back.
  const std::string_view body(reinterpret_cast<const char*>(data + 1), size - 1);
  if (!body.empty() && body.size() <= max_payload) {
    ChunkMeta m = expected;
    m.layout_id = 0x4444;
    const std::string enc = EncodeRemoteRecord(m, std::as_bytes(std::span(body.data(), body.size())));
    std::span<const std::byte> back;
    uint64_t lid = 0;
    const Status r = CheckRemoteRecord(enc, m, max_payload, &back, &lid);
    FUZZ_CHECK(r.ok() && lid == m.layout_id && back.size() == body.size() &&
                   std::memcmp(back.data(), body.data(), body.size()) == 0,
               "an encoded record does not check: %s", r.ToString().c_str());
  }
  return 0;
}
