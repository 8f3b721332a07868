// CRC-32C (Castagnoli, the checksum of iSCSI, ext4 and many storage formats): the checksum of
// every piece of a training checkpoint.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mole::ckpt {

// The CRC-32C of `size` bytes, continuing from `crc` (0 to start): crc32c("123456789") is
// 0xE3069283.
uint32_t crc32c(const void* data, size_t size, uint32_t crc = 0);

}  // namespace mole::ckpt
