#include "cc/tiers/disk/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace kvtier::disk {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // CRC32C, bit-reflected

// Slicing-by-8 tables: table[k][b] is the CRC of byte b followed by k zero
// bytes, so eight input bytes fold in with eight independent lookups.
struct Tables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  constexpr Tables() {
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t c = b;
      for (int i = 0; i < 8; ++i) c = (c >> 1) ^ ((c & 1u) ? kPoly : 0u);
      t[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; ++b) {
      for (int k = 1; k < 8; ++k) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFFu];
    }
  }
};
constexpr Tables kTables;

uint64_t Load64(const std::byte* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));  // unaligned-safe; little-endian host assumed (x86-64)
  return v;
}

}  // namespace

uint32_t Crc32cExtendSoftware(uint32_t crc, std::span<const std::byte> data) {
  const std::byte* p = data.data();
  size_t n = data.size();
  uint32_t c = ~crc;
  while (n >= 8) {
    const uint64_t v = Load64(p) ^ c;
    c = kTables.t[7][v & 0xFF] ^ kTables.t[6][(v >> 8) & 0xFF] ^ kTables.t[5][(v >> 16) & 0xFF] ^
        kTables.t[4][(v >> 24) & 0xFF] ^ kTables.t[3][(v >> 32) & 0xFF] ^
        kTables.t[2][(v >> 40) & 0xFF] ^ kTables.t[1][(v >> 48) & 0xFF] ^ kTables.t[0][v >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) c = (c >> 8) ^ kTables.t[0][(c ^ static_cast<uint8_t>(*p++)) & 0xFF];
  return ~c;
}

#if defined(__x86_64__)
namespace {

// The hardware loop runs three independent lanes of kLane bytes so the
// crc32 instruction's 3-cycle latency overlaps (about 3x one chain). Lanes
// 1 and 2 start from state 0; CRC registers are linear, so the combined
// state is Shift(Shift(lane0) ^ lane1) ^ lane2, where Shift advances a state
// over kLane zero bytes. Shift is linear too: a 4 x 256 table built once.
constexpr size_t kLane = 4096;

struct ShiftTable {
  std::array<std::array<uint32_t, 256>, 4> t{};
  ShiftTable() {
    std::array<uint32_t, 32> basis{};
    for (int bit = 0; bit < 32; ++bit) {
      uint32_t v = 1u << bit;
      for (size_t k = 0; k < kLane; ++k) v = (v >> 8) ^ kTables.t[0][v & 0xFF];
      basis[bit] = v;
    }
    for (int j = 0; j < 4; ++j) {
      for (uint32_t b = 0; b < 256; ++b) {
        uint32_t v = 0;
        for (int k = 0; k < 8; ++k) {
          if (b & (1u << k)) v ^= basis[8 * j + k];
        }
        t[j][b] = v;
      }
    }
  }
  uint32_t Shift(uint32_t s) const {
    return t[0][s & 0xFF] ^ t[1][(s >> 8) & 0xFF] ^ t[2][(s >> 16) & 0xFF] ^ t[3][s >> 24];
  }
};

}  // namespace

__attribute__((target("sse4.2"))) uint32_t Crc32cExtendHardware(uint32_t crc,
                                                                std::span<const std::byte> data) {
  static const ShiftTable kShift;  // thread-safe one-time init
  const std::byte* p = data.data();
  size_t n = data.size();
  uint32_t c32 = ~crc;
  while (n >= 3 * kLane) {
    uint64_t c0 = c32, c1 = 0, c2 = 0;
    for (size_t k = 0; k < kLane; k += 8) {
      c0 = _mm_crc32_u64(c0, Load64(p + k));
      c1 = _mm_crc32_u64(c1, Load64(p + kLane + k));
      c2 = _mm_crc32_u64(c2, Load64(p + 2 * kLane + k));
    }
    c32 = kShift.Shift(kShift.Shift(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1)) ^
          static_cast<uint32_t>(c2);
    p += 3 * kLane;
    n -= 3 * kLane;
  }
  uint64_t c = c32;
  while (n >= 8) {
    c = _mm_crc32_u64(c, Load64(p));
    p += 8;
    n -= 8;
  }
  c32 = static_cast<uint32_t>(c);
  while (n--) c32 = _mm_crc32_u8(c32, static_cast<uint8_t>(*p++));
  return ~c32;
}

bool Crc32cHardwareAvailable() {
  static const bool kHave = __builtin_cpu_supports("sse4.2");
  return kHave;
}
#else
uint32_t Crc32cExtendHardware(uint32_t crc, std::span<const std::byte> data) {
  return Crc32cExtendSoftware(crc, data);
}
bool Crc32cHardwareAvailable() { return false; }
#endif

uint32_t Crc32cExtend(uint32_t crc, std::span<const std::byte> data) {
  return Crc32cHardwareAvailable() ? Crc32cExtendHardware(crc, data)
                                   : Crc32cExtendSoftware(crc, data);
}

}  // namespace kvtier::disk
