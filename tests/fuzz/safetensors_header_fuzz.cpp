// libFuzzer target: mole::st::parse_header on arbitrary file images. A mole::Error is the
// expected outcome for bad input; any other exception, a sanitizer report, or an accepted
// header that breaks the documented invariants is a bug.
#include <cstddef>
#include <cstdint>

#include "checkpoint/safetensors_format.h"
#include "kernels/check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  mole::st::Header header;
  try {
    header = mole::st::parse_header(data, size, "fuzz.safetensors");
  } catch (const mole::Error&) {
    return 0;
  }
  // Accepted: the entries must tile the data buffer exactly, with consistent sizes.
  if (header.data_start > size || header.data_start + header.data_size != size) __builtin_trap();
  uint64_t expected = 0;
  for (const mole::st::TensorInfo& t : header.tensors) {
    if (t.begin != expected || t.end < t.begin) __builtin_trap();
    if (static_cast<uint64_t>(t.numel()) * mole::st::dtype_size(t.dtype) != t.end - t.begin) {
      __builtin_trap();
    }
    if (header.find(t.name) != &t) __builtin_trap();
    expected = t.end;
  }
  if (expected != header.data_size) __builtin_trap();
  return 0;
}
