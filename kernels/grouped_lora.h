// Grouped LoRA: one LoRA per expert applied to that expert's contiguous row segment,
//   y[rows of e] = scale * (x[rows of e] A_e^T) B_e^T.
// CPU reference from differentiable ATen ops; CUDA tensors take the CUDA twin
// (kernels/cuda/grouped_lora_ops.h) when it is built and handles their dtypes.
//
// Legend: N rows (grouped by expert), I in features, O out features, E experts, r LoRA rank.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace mole::kernels {

// x_NI rows grouped by expert with `counts` rows per expert (sum = N); a_ErI [E, r, I],
// b_EOr [E, O, r]. Returns y_NO in x's dtype; the products run in the LoRA weights' dtype.
// Experts with zero rows are skipped but stay in the graph (their gradients are zero).
at::Tensor grouped_lora(const at::Tensor& x_NI, const at::Tensor& a_ErI, const at::Tensor& b_EOr,
                        const std::vector<int64_t>& counts, double scale);

}  // namespace mole::kernels
