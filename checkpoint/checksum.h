// Checksums and digests: CRC-32C (Castagnoli, the checksum of iSCSI, ext4 and many storage
// formats) guards every piece of a training checkpoint; FNV-1a digests say what a checkpoint fits
// (configuration, base model).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace mole::ckpt {

// The CRC-32C of `size` bytes, continuing from `crc` (0 to start): crc32c("123456789") is
// 0xE3069283.
uint32_t crc32c(const void* data, size_t size, uint32_t crc = 0);

// 64-bit FNV-1a of `text`, continuing from `hash`; not a checksum against damage, a cheap
// fingerprint. Digests of several fields end each with fnv1a_field, so that ("ab", "c") and
// ("a", "bc") differ.
constexpr uint64_t kFnvOffset = 1469598103934665603ull;
uint64_t fnv1a(std::string_view text, uint64_t hash = kFnvOffset);
inline uint64_t fnv1a_field(std::string_view text, uint64_t hash) {
  return fnv1a(std::string_view("\xFF", 1), fnv1a(text, hash));
}

}  // namespace mole::ckpt
