// Peak memory of this process, for logs and benchmarks: the host's peak resident set, and on a
// CUDA device the peak of the bytes LibTorch's caching allocator handed out (what the tensors of
// a step needed at most; the allocator may reserve more from the driver).
#pragma once

#include <c10/core/Device.h>

#include <cstdint>

namespace mole::launch {

// Peak resident set size of this process, in MiB.
double peak_host_mib();

// Peak bytes allocated on CUDA `device` since the start or the last reset; -1 for a CPU device or
// a build without a CUDA LibTorch (the allocator of a device nothing ran on is never touched).
int64_t peak_cuda_allocated_bytes(const at::Device& device);
// Starts a new peak on CUDA `device` (nothing for a CPU device or without a CUDA LibTorch).
void reset_peak_cuda_allocated_bytes(const at::Device& device);

}  // namespace mole::launch
