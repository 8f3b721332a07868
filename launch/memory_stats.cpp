// Memory readings (see memory_stats.h). The CUDA allocator's statistics come from LibTorch's
// c10_cuda, present only in a CUDA build (MOLE_TORCH_CUDA); elsewhere they read as unavailable.
#include "launch/memory_stats.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/resource.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <unordered_map>

#ifdef MOLE_TORCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

// LibTorch 2.3 made Allocator::allocate non-const and added copy_data.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
#define MOLE_ALLOCATE_CONST
#define MOLE_ALLOCATOR_COPY_DATA 1
#else
#define MOLE_ALLOCATE_CONST const
#define MOLE_ALLOCATOR_COPY_DATA 0
#endif

namespace mole::launch {
namespace {

// LibTorch's CPU allocator with a count of the bytes it has out. Each allocation's data pointer
// is its own context (as the default allocator's), so raw allocation keeps working; the inner
// allocation is kept by address until freed.
class CountingCpuAllocator final : public c10::Allocator {
 public:
  explicit CountingCpuAllocator(c10::Allocator* inner) : inner_(inner) {}

  c10::DataPtr allocate(size_t n) MOLE_ALLOCATE_CONST override {
    c10::DataPtr inner = inner_->allocate(n);
    void* data = inner.get();
    if (data == nullptr) return inner;  // zero bytes
    {
      std::lock_guard<std::mutex> lock(mutex_);
      held_.emplace(data, Held{std::move(inner), n});
    }
    const int64_t now = current_.fetch_add(static_cast<int64_t>(n)) + static_cast<int64_t>(n);
    int64_t peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
    }
    return c10::DataPtr(data, data, &CountingCpuAllocator::release, c10::Device(c10::DeviceType::CPU));
  }
  c10::DeleterFnPtr raw_deleter() const override { return &CountingCpuAllocator::release; }
#if MOLE_ALLOCATOR_COPY_DATA
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
#endif

  int64_t current() const { return current_.load(); }
  int64_t peak() const { return peak_.load(); }
  void reset_peak() { peak_.store(current_.load()); }

 private:
  struct Held {
    c10::DataPtr inner;
    size_t bytes;
  };
  static void release(void* data);

  c10::Allocator* inner_;
  mutable std::mutex mutex_;
  mutable std::unordered_map<void*, Held> held_;
  mutable std::atomic<int64_t> current_{0};
  mutable std::atomic<int64_t> peak_{0};
};

// Never destroyed: tensors may be freed during static destruction.
CountingCpuAllocator* g_counting = nullptr;

void CountingCpuAllocator::release(void* data) {
  Held held;
  {
    std::lock_guard<std::mutex> lock(g_counting->mutex_);
    auto it = g_counting->held_.find(data);
    if (it == g_counting->held_.end()) {
      // Raw memory the inner allocator gave out before tracking began, freed through the current
      // CPU allocator (oneDNN does this): the inner allocator frees it.
      if (c10::DeleterFnPtr inner = g_counting->inner_->raw_deleter()) inner(data);
      return;
    }
    held = std::move(it->second);
    g_counting->held_.erase(it);
  }
  g_counting->current_.fetch_sub(static_cast<int64_t>(held.bytes));
  // `held.inner` frees the bytes with the inner allocator's deleter on leaving.
}

}  // namespace

double peak_host_mib() {
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;
}

void track_cpu_tensor_bytes() {
  if (g_counting) return;
  g_counting = new CountingCpuAllocator(c10::GetCPUAllocator());
  // Priority above the default registration's, so that it stays.
  c10::SetCPUAllocator(g_counting, /*priority=*/1);
}

int64_t cpu_tensor_bytes() { return g_counting ? g_counting->current() : -1; }
int64_t peak_cpu_tensor_bytes() { return g_counting ? g_counting->peak() : -1; }
void reset_peak_cpu_tensor_bytes() {
  if (g_counting) g_counting->reset_peak();
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

int64_t peak_tensor_bytes(const at::Device& device) {
  return device.is_cuda() ? peak_cuda_allocated_bytes(device) : peak_cpu_tensor_bytes();
}

void reset_peak_tensor_bytes(const at::Device& device) {
  if (device.is_cuda()) reset_peak_cuda_allocated_bytes(device);
  else reset_peak_cpu_tensor_bytes();
}

}  // namespace mole::launch
