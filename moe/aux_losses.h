// Auxiliary router losses (DESIGN.md §3): load balance, router z-loss, Tsallis entropy loss and
// the MoELoRA contrastive loss. Statistics are kept as sums so that they can be added over
// sites, micro-batches or ranks before a loss is formed (global-batch load balancing).
//
// Legend: T tokens, E experts, N routed pairs, M sampled embeddings, D embedding width.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "moe/router.h"

namespace mole::moe {

struct RouterStats {
  at::Tensor pairs_E;     // float32: routed (token, expert) pairs per expert (no gradient)
  at::Tensor prob_sum_E;  // float32: sum over counted tokens of p_{t,e} (differentiable)
  at::Tensor z_sum;       // float32 scalar: sum over counted tokens of logsumexp(z_t)^2
  at::Tensor entropy_sum;  // float32 scalar: sum of normalised Tsallis entropy (q given)
  int64_t num_pairs = 0;   // routed pairs of counted tokens
  int64_t num_tokens = 0;  // counted tokens

  // Element-wise sum of two stats of the same expert count.
  RouterStats operator+(const RouterStats& other) const;
};

// Stats of one router call. `valid_T` (bool, optional) marks the tokens that count (padding
// excluded); `entropy_q` is the Tsallis q used for entropy_sum.
RouterStats router_stats(const RouterOutput& out, const at::Tensor& valid_T, double entropy_q);

// E * sum_i f_i P_i with f_i = pairs_i / num_pairs and P_i = prob_sum_i / num_tokens.
at::Tensor load_balance_loss(const RouterStats& stats);
// mean over tokens of logsumexp(z)^2.
at::Tensor z_loss(const RouterStats& stats);
// mean over tokens of the normalised Tsallis entropy.
at::Tensor entropy_loss(const RouterStats& stats);

// MoELoRA contrastive loss, our reading of the paper (which gives no code): the LoRA outputs of
// experts are embeddings; embeddings of the same expert (other tokens) are positives, those of
// other experts negatives. With cosine similarities s_ij / temperature, each anchor i with at
// least one positive contributes -log(sum_{j in pos(i)} exp(s_ij) / sum_{j != i} exp(s_ij));
// the loss is their mean (zero when no anchor has a positive).
at::Tensor contrastive_loss(const at::Tensor& embeddings_MD, const at::Tensor& expert_M,
                            double temperature);

}  // namespace mole::moe
