// Tensor-facing CUDA twins of permute_rows and unpermute_combine (kernels/permute.h), built on the
// launchers of permute_kernels.h. kernels/permute.cpp routes CUDA tensors here when the kernels are
// built, so callers normally use kernels/permute.h and never this header.
//
// Legend: T tokens, D features, N routed pairs (= rows).
#pragma once

#include <ATen/core/Tensor.h>

#include "kernels/permute.h"

namespace mole::kernels {

// Whether mole_kernels was built with the CUDA permutation kernels (CMake MOLE_HAVE_CUDA_KERNELS).
// Always defined (in kernels/permute.cpp); the functions below exist only when it returns true.
bool cuda_permute_kernels_built();

// True for a CUDA tensor of a dtype the kernels handle: float32, float64 or bfloat16. Other
// dtypes (float16) take the ATen path.
bool cuda_permute_supports(const at::Tensor& x);

// Same contract as permute_rows / unpermute_combine, for CUDA tensors of a supported dtype.
// Differentiable once (no double backward). Deterministic: sums run in a fixed order without
// atomics, in float32 (float64 for float64 rows). Non-contiguous inputs are copied first.
//
// Stream: the work is queued on the legacy default stream (stream 0, PyTorch's default stream),
// never on a non-default current stream set by the caller; see permute_ops.cpp.
// Sync points: no device-to-host copy. A plan made on the host has its index tensors copied to the
// device on every call (a host-to-device copy); make the plan on the device to avoid it.
at::Tensor permute_rows_cuda(const at::Tensor& x_TD, const PermutePlan& plan);
at::Tensor unpermute_combine_cuda(const at::Tensor& rows_ND, const PermutePlan& plan,
                                  const at::Tensor& weight_N);

}  // namespace mole::kernels
