// Token permutation for MoE compute: group routed (token, expert) pairs by expert, gather their
// rows, and scatter expert outputs back with the routing weights. CPU reference paths built from
// differentiable ATen ops; a CUDA twin must keep this contract.
//
// Legend: T tokens, D features, E experts, N routed pairs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace mole::kernels {

// Where each routed pair goes. Immutable once made.
struct PermutePlan {
  at::Tensor order_N;    // int64: routing-pair index of each sorted row (stable sort by expert)
  at::Tensor token_N;    // int64: token of each sorted row
  at::Tensor inverse_N;  // int64: sorted row of each routing pair (order_N's inverse)
  std::vector<int64_t> counts;  // rows per expert, on the host; sums to N
  int64_t num_tokens = 0;
  int64_t num_experts = 0;

  int64_t num_rows() const { return order_N.size(0); }
};

// Stable sort of the pairs (token_N[i], expert_N[i]) by expert: pairs of one expert keep their
// routing order. Validates ranges (expert ids in [0, E), tokens in [0, T)) and prints the
// offending value. One sync point: the per-expert counts and the id ranges come to the host
// together.
PermutePlan make_permute_plan(const at::Tensor& token_N, const at::Tensor& expert_N,
                              int64_t num_tokens, int64_t num_experts);

// x_TD -> rows_ND: row i is x[token_N[i]] (grouped by expert).
at::Tensor permute_rows(const at::Tensor& x_TD, const PermutePlan& plan);

// rows_ND (grouped by expert) -> y_TD: y[t] = sum over pairs (t, e) of weight * rows[sorted row].
// `weight_N` is in routing-pair order; tokens without pairs get zeros. Differentiable in rows and
// weights. The result has rows' dtype; weights are cast to it.
at::Tensor unpermute_combine(const at::Tensor& rows_ND, const PermutePlan& plan,
                             const at::Tensor& weight_N);

}  // namespace mole::kernels
