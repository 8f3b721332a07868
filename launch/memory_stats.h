// Peak memory of this process, for logs and benchmarks: the host's peak resident set, and on a
// CUDA device the peak of the bytes LibTorch's caching allocator handed out (what the tensors of
// a step needed at most; the allocator may reserve more from the driver).
#pragma once

#include <cstdint>

namespace mole::launch {

// Peak resident set size of this process, in MiB.
double peak_host_mib();

// Whether this build can read the CUDA allocator (a LibTorch with CUDA).
bool cuda_memory_stats_available();

// Peak bytes allocated on the current CUDA device since the start or the last reset; -1 when the
// build has no CUDA LibTorch or no device is usable.
int64_t peak_cuda_allocated_bytes();
// Starts a new peak on the current CUDA device (nothing without one).
void reset_peak_cuda_allocated_bytes();

}  // namespace mole::launch
