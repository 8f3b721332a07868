// Tensor-facing CUDA twin of grouped_lora (kernels/grouped_lora.h), built on the launchers of
// grouped_lora_kernels.h. kernels/grouped_lora.cpp routes CUDA tensors here when the kernels are
// built, so callers normally use kernels/grouped_lora.h and never this header.
//
// Legend: N rows (grouped by expert), I in features, O out features, E experts, r LoRA rank.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace mole::kernels {

// Whether mole_kernels was built with the CUDA grouped LoRA kernels (CMake MOLE_HAVE_CUDA_KERNELS).
// Always defined (in kernels/grouped_lora.cpp); the functions below exist only when it returns
// true.
bool cuda_grouped_lora_kernels_built();

// True for CUDA rows and weights on one device whose (rows, weights) dtypes the kernels handle:
// (float32, float32), (float64, float64), (bfloat16, float32), (bfloat16, bfloat16). Other
// pairs (float16, float64 rows with float32 weights) take the ATen path.
bool cuda_grouped_lora_supports(const at::Tensor& x_NI, const at::Tensor& a_ErI,
                                const at::Tensor& b_EOr);

// Same contract as grouped_lora, for tensors that cuda_grouped_lora_supports, except that the
// products run in the accumulation type (float32, float64 for float64 rows) whatever the
// weights' dtype, reading bfloat16 rows directly (no float32 copy of x). Returns y_NO in x's
// dtype; differentiable once (no double backward) in x, A and B, the weight gradients in the
// weights' dtype. Deterministic: no atomics, sums in an order fixed by the sizes. Non-contiguous
// inputs are copied first.
//
// Stream: queued on the legacy default stream (stream 0, PyTorch's default stream), never on a
// non-default current stream set by the caller; see permute_ops.cpp for why.
// Sync points: none. The segment offsets are built from `counts` on the host and copied to the
// device on every call, from pinned memory without waiting for the device's queue; nothing is
// copied back.
at::Tensor grouped_lora_cuda(const at::Tensor& x_NI, const at::Tensor& a_ErI,
                             const at::Tensor& b_EOr, const std::vector<int64_t>& counts,
                             double scale);

}  // namespace mole::kernels
