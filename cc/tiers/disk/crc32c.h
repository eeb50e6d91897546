// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as used by iSCSI,
// ext4 and RocksDB. The disk tier checksums every record with it.
//
// Contract
// - Crc32c(data) equals the standard CRC32C: initial value ~0, final xor ~0
//   (Crc32c("123456789") == 0xE3069283).
// - Crc32cExtend(crc, data) continues a checksum: Crc32cExtend(Crc32c(a), b)
//   == Crc32c(a + b). This is how a record's header and payload are covered
//   by one value without copying them together.
// - The SSE4.2 crc32 instruction is used when the CPU has it (checked once at
//   run time, so the binary still runs on CPUs without it), three lanes at
//   a time for inputs of 12 KiB and more; otherwise an 8-table software
//   implementation. Both give identical results (tested).
// - Pure functions, thread-safe, no allocation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace kvtier::disk {

uint32_t Crc32cExtend(uint32_t crc, std::span<const std::byte> data);
inline uint32_t Crc32c(std::span<const std::byte> data) { return Crc32cExtend(0, data); }

// The two implementations, exposed so tests can compare them directly.
uint32_t Crc32cExtendSoftware(uint32_t crc, std::span<const std::byte> data);
// Requires Crc32cHardwareAvailable().
uint32_t Crc32cExtendHardware(uint32_t crc, std::span<const std::byte> data);
bool Crc32cHardwareAvailable();

}  // namespace kvtier::disk
