// Peak memory readings (see memory_stats.h). The CUDA allocator's statistics come from LibTorch's
// c10_cuda, present only in a CUDA build (MOLE_TORCH_CUDA); elsewhere they read as unavailable.
#include "launch/memory_stats.h"

#include <ATen/Context.h>
#include <sys/resource.h>

#ifdef MOLE_TORCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace mole::launch {

double peak_host_mib() {
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;
}

bool cuda_memory_stats_available() {
#ifdef MOLE_TORCH_CUDA
  return at::hasCUDA();
#else
  return false;
#endif
}

int64_t peak_cuda_allocated_bytes() {
  if (!cuda_memory_stats_available()) return -1;
#ifdef MOLE_TORCH_CUDA
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
  return stats.allocated_bytes[0].peak;  // index 0: StatType::AGGREGATE (every pool)
#else
  return -1;
#endif
}

void reset_peak_cuda_allocated_bytes() {
  if (!cuda_memory_stats_available()) return;
#ifdef MOLE_TORCH_CUDA
  c10::cuda::CUDACachingAllocator::resetPeakStats(c10::cuda::current_device());
#endif
}

}  // namespace mole::launch
