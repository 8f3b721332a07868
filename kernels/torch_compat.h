// The one place where LibTorch version differences live (Debian's 1.13 and PyTorch 2.x).
#pragma once

#include <ATen/ATen.h>
#include <torch/version.h>

#include <optional>

namespace mole::compat {

#if TORCH_VERSION_MAJOR >= 2
inline constexpr bool kHasFusedAttention = true;
#else
inline constexpr bool kHasFusedAttention = false;
#endif

// Scaled dot-product attention over [B, H, S, hd] tensors (keys/values already expanded to H
// heads). `mask_SS` is an optional boolean mask (true = attend); when absent the attention is
// causal. Uses the fused kernel where LibTorch has it, explicit math otherwise; both compute
// softmax(q k^T / sqrt(hd) + mask) v.
inline at::Tensor scaled_dot_product_attention(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v,
                                               const std::optional<at::Tensor>& mask_SS,
                                               double scale) {
#if TORCH_VERSION_MAJOR >= 2
  if (mask_SS) {
    return at::scaled_dot_product_attention(q, k, v, *mask_SS, 0.0, /*is_causal=*/false, scale);
  }
  return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true, scale);
#else
  const int64_t s_q = q.size(-2);
  const int64_t s_k = k.size(-2);
  at::Tensor allowed = mask_SS ? *mask_SS
                               : at::ones({s_q, s_k}, q.options().dtype(at::kBool)).tril(s_k - s_q);
  at::Tensor scores = at::matmul(q, k.transpose(-2, -1)).mul(scale);
  scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
  // Reduced precision (bf16) softmax runs in float32; float32 and float64 in their own dtype.
  const at::ScalarType softmax_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor probs = at::softmax(scores, -1, softmax_dtype).to(q.scalar_type());
  return at::matmul(probs, v);
#endif
}

}  // namespace mole::compat
