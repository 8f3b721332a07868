// The safetensors container format, parsed and validated without LibTorch (so it can be
// fuzzed on its own). A file is: u64 little-endian header length N, N bytes of JSON header,
// then the data buffer; each tensor entry names a dtype, a shape and [begin, end) offsets into
// the data buffer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace mole::st {

enum class Dtype { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2, U16, U32, U64 };

// "F32" -> Dtype::F32 etc. Throws mole::Error naming `where` for unknown strings.
Dtype parse_dtype(const std::string& text, const std::string& where);
const char* dtype_name(Dtype dtype);
size_t dtype_size(Dtype dtype);
// "[4, 16, 128]", for messages and listings.
std::string shape_text(const std::vector<int64_t>& shape);

struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // offsets into the data buffer (after the header)
  uint64_t end = 0;
  int64_t numel() const;
};

struct Header {
  std::vector<TensorInfo> tensors;             // in data-offset order
  std::map<std::string, std::string> metadata;  // "__metadata__"
  uint64_t data_start = 0;                      // byte offset of the data buffer in the file
  uint64_t data_size = 0;                       // bytes of the data buffer
  const TensorInfo* find(const std::string& name) const;
};

// Largest header accepted (the reference implementation's limit).
inline constexpr uint64_t kMaxHeaderBytes = 100ull * 1024 * 1024;

// Parses and fully validates the header of a complete file image `bytes[0, size)`: header
// length inside the file and below kMaxHeaderBytes, valid JSON object, known dtypes,
// non-negative shapes, byte length = numel x dtype size (overflow-checked), offsets inside the
// data buffer, entries contiguous and not overlapping, the buffer fully covered. Every error is
// a mole::Error that names `source` (the file) and, where one is involved, the tensor.
Header parse_header(const uint8_t* bytes, size_t size, const std::string& source);

}  // namespace mole::st
