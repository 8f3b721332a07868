// Memory readings of this process, for logs, summary.json and benchmarks: the host's peak
// resident set; the bytes LibTorch's CPU allocator has handed out (current and peak, once
// tracking is on); and on a CUDA device the peak of the bytes LibTorch's caching allocator handed
// out (what the tensors of a step needed at most; the allocator may reserve more from the driver).
#pragma once

#include <c10/core/Device.h>

#include <cstdint>

namespace mole::launch {

// Peak resident set size of this process, in MiB.
double peak_host_mib();

// Counts the bytes of every CPU tensor allocated from now on (LibTorch's CPU allocator, wrapped;
// tensors over memory they do not own, such as memory-mapped files, are not counted). Call once,
// first thing: tensors allocated before are freed by their own allocator and never counted.
void track_cpu_tensor_bytes();
// Bytes of the CPU tensors allocated since tracking started and not yet freed; -1 without tracking.
int64_t cpu_tensor_bytes();
// Their peak since tracking started or the last reset; -1 without tracking.
int64_t peak_cpu_tensor_bytes();
void reset_peak_cpu_tensor_bytes();

// Peak bytes allocated on CUDA `device` since the start or the last reset; -1 for a CPU device or
// a build without a CUDA LibTorch (the allocator of a device nothing ran on is never touched).
int64_t peak_cuda_allocated_bytes(const at::Device& device);
// Starts a new peak on CUDA `device` (nothing for a CPU device or without a CUDA LibTorch).
void reset_peak_cuda_allocated_bytes(const at::Device& device);

// The tensors of `device`: the CUDA allocator's peak there, or the tracked CPU tensors' peak.
int64_t peak_tensor_bytes(const at::Device& device);
void reset_peak_tensor_bytes(const at::Device& device);

}  // namespace mole::launch
