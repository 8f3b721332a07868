// Peak memory readings (see memory_stats.h). The CUDA allocator's statistics come from LibTorch's
// c10_cuda, present only in a CUDA build (MOLE_TORCH_CUDA); elsewhere they read as unavailable.
#include "launch/memory_stats.h"

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

int64_t peak_cuda_allocated_bytes(const at::Device& device) {
  if (!device.is_cuda()) return -1;
#ifdef MOLE_TORCH_CUDA
  const c10::DeviceIndex index = device.has_index() ? device.index() : c10::cuda::current_device();
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(index);
  return stats.allocated_bytes[0].peak;  // index 0: StatType::AGGREGATE (every pool)
#else
  return -1;
#endif
}

void reset_peak_cuda_allocated_bytes(const at::Device& device) {
  if (!device.is_cuda()) return;
#ifdef MOLE_TORCH_CUDA
  const c10::DeviceIndex index = device.has_index() ? device.index() : c10::cuda::current_device();
  c10::cuda::CUDACachingAllocator::resetPeakStats(index);
#endif
}

}  // namespace mole::launch
