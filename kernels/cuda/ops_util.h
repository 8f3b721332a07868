// What the tensor-facing CUDA wrappers (permute_ops.cpp, grouped_lora_ops.cpp, router_ops.cpp)
// share: the stream they launch on, the guard that makes a tensor's device current, and the
// launchers' element type of a dtype. Host code; no c10/cuda header (see permute_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include "kernels/check.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/permute_kernels.h"

namespace mole::kernels::cuda {

// The legacy default stream (PyTorch's default stream); see the stream note in permute_ops.cpp.
constexpr cudaStream_t kDefaultStream = nullptr;

// Makes `device` current in the CUDA runtime that these kernels link, for the scope of a launch.
// Not c10::DeviceGuard: a LibTorch that bundles its own CUDA runtime keeps its current device
// there, invisible to ours. `what` names the operation in errors.
class CurrentDevice {
 public:
  CurrentDevice(at::Device device, const char* what) : target_(static_cast<int>(device.index())) {
    MOLE_CUDA_CHECK(cudaGetDevice(&previous_), ::mole::detail::cat(what, " (CUDA) on ", device));
    if (previous_ != target_) {
      MOLE_CUDA_CHECK(cudaSetDevice(target_), ::mole::detail::cat(what, " (CUDA) on ", device));
    }
  }
  ~CurrentDevice() {
    if (previous_ != target_) cudaSetDevice(previous_);  // best effort: destructors do not throw
  }
  CurrentDevice(const CurrentDevice&) = delete;
  CurrentDevice& operator=(const CurrentDevice&) = delete;

 private:
  int target_;
  int previous_ = 0;
};

// The launchers' element type of `dtype`: float32, float64 or bfloat16; throws naming `what`
// for any other.
inline RowType element_type(at::ScalarType dtype, const char* what) {
  switch (dtype) {
    case at::kFloat:
      return RowType::kFloat32;
    case at::kDouble:
      return RowType::kFloat64;
    case at::kBFloat16:
      return RowType::kBFloat16;
    default:
      MOLE_FAIL(what, " (CUDA): expected float32, float64 or bfloat16, got ", dtype);
  }
}

}  // namespace mole::kernels::cuda
