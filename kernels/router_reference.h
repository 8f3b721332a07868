// Plain-loop CPU references of the fused router's CUDA launchers (kernels/cuda/router_kernels.h),
// with the same raw-pointer contract minus the stream: float32 logits, probabilities and weights,
// int64 ids and counts, synchronous calls. The rule is RouterSelect (kernels/router_select.h); the
// caller has checked it with router_select_error and E >= 1 (there is no upper limit on E here).
// Tests drive these with host pointers and compare them with moe::route (the ATen path) and with
// the CUDA launchers.
//
// The only arithmetic differences from the CUDA launchers: sums over experts (softmax
// denominator, entropy, backward dot products) run sequentially here and as a fixed tree there,
// and exp/log/pow are the C library's here and CUDA's (<= 2 ulp) there.
//
// Legend: T tokens, E experts, K top-k, C columns (K for top-k, else E), N routed pairs.
#pragma once

#include <cstdint>

#include "kernels/router_select.h"

namespace mole::kernels::reference {

// Per token t: probs_TE[t] = softmax(logits_TE[t]); the n_t selected experts (router_select.h) in
// rank order in expert_TC[t, 0..n_t) with their weights in weight_TC[t, 0..n_t); columns
// [n_t, C) get expert -1 and weight 0; count_T[t] = n_t. token_TC, when not null, gets t in
// [0, n_t) and -1 after. count_E[e] = the number of tokens that selected e (overwritten).
// For the fixed-count rules (top-k, dense) expert_TC, weight_TC and token_TC are the token-major
// pair lists expert_N, weight_N, token_N with N = T*C; for top-p and DynMoLE compact them with
// routing_offsets and compact_routing.
void route_forward(const float* logits_TE, const RouterSelect& select, float* probs_TE,
                   int64_t* expert_TC, float* weight_TC, int64_t* token_TC, int64_t* count_T,
                   int64_t* count_E, int64_t num_tokens, int64_t num_experts);

// offsets_T1[0] = 0, offsets_T1[t + 1] = count_T[0] + ... + count_T[t]: the exclusive scan of the
// per-token counts, so that offsets_T1[T] = N and token t owns pairs [offsets_T1[t],
// offsets_T1[t + 1]).
void routing_offsets(const int64_t* count_T, int64_t num_tokens, int64_t* offsets_T1);

// Token-major pairs from the per-token selection: for j < offsets_T1[t + 1] - offsets_T1[t],
// pair i = offsets_T1[t] + j gets token_N[i] = t, expert_N[i] = expert_TC[t, j] and
// weight_N[i] = weight_TC[t, j]. Outputs hold offsets_T1[T] elements.
void compact_routing(const int64_t* expert_TC, const float* weight_TC, const int64_t* offsets_T1,
                     int64_t num_tokens, int64_t num_columns, int64_t* token_N, int64_t* expert_N,
                     float* weight_N);

// Gradient of the router logits, in closed form, from the gradients of probs_TE and weight_N:
//   weights p (top-p, DynMoLE, dense): dp = grad_probs_TE + grad_weight_N scattered to
//     (token, expert); grad_logits = p * (dp - sum_e dp p) (softmax backward);
//   renormalised top-k: the weights are the softmax of the selected logits, so
//     grad_logits = p * (dp - sum_e dp p) with dp = grad_probs_TE, plus, at the selected experts,
//     w * (g - sum_j g w) with g = grad_weight_N and w = weight_N of the token's pairs.
// probs_TE, expert_N and weight_N are the forward's outputs. The pairs of token t are
// [offsets_T1[t], offsets_T1[t + 1]) for top-p and DynMoLE (offsets_T1 from routing_offsets) and
// [t*C, (t+1)*C) for top-k and dense (offsets_T1 unused, may be null). weight_N is read only for
// top-k (may be null otherwise).
void route_backward(const RouterSelect& select, const float* probs_TE, const float* grad_probs_TE,
                    const int64_t* expert_N, const float* weight_N, const float* grad_weight_N,
                    const int64_t* offsets_T1, float* grad_logits_TE, int64_t num_tokens,
                    int64_t num_experts);

}  // namespace mole::kernels::reference
