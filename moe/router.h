// Routers of the MoE-LoRA methods (DESIGN.md §3): top-k (MixLoRA, MoLA, MoELoRA), top-p
// (MixLoRA-dynamic), switch (top-1 with capacity), DynMoLE's entropy hybrid, and dense (all
// experts, LoRAMoE-style). Router math runs in float32 whatever the model dtype.
//
// A routing is a list of (token, expert, weight) pairs in token-major order (for each token its
// selected experts in descending probability, ties broken by the lower expert id); top-k is the
// case N = T*K, top-p and DynMoLE select a variable number per token, switch may drop tokens.
//
// Legend: T tokens, D router input features, E experts, K top-k, N routed pairs.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>

#include "kernels/router_select.h"

namespace mole::moe {

enum class RoutingStrategy { kTopK, kTopP, kSwitch, kDynMole, kDense };

// "topk" | "topp" | "switch" | "dynmole" | "dense"; throws naming the allowed values.
RoutingStrategy parse_routing_strategy(const std::string& name);
const char* routing_strategy_name(RoutingStrategy strategy);

struct RouterOptions {
  RoutingStrategy strategy = RoutingStrategy::kTopK;
  int64_t top_k = 2;             // topk
  double top_p = 0.75;           // topp, dynmole
  double jitter_noise = 0.0;     // training only: router input scaled by U(1-j, 1+j)
  double capacity_factor = 1.0;  // switch: capacity C = ceil(T/E * capacity_factor)
  double entropy_q = 1.1;        // dynmole: Tsallis q
  double entropy_threshold = 0.9;  // dynmole: above it the token uses every expert
  int64_t keep_top_k = 2;        // dynmole: experts always kept below the threshold

  // Throws mole::Error naming the option when a value is out of range for `num_experts`.
  void validate(int64_t num_experts) const;
};

struct Routing {
  at::Tensor token_N;   // int64
  at::Tensor expert_N;  // int64
  at::Tensor weight_N;  // float32, differentiable with respect to the router logits
  int64_t num_tokens = 0;
  int64_t num_experts = 0;
  // Every token has exactly this many pairs (top-k: K, dense: E), known on the host; 0 when the
  // count varies per token (top-p, switch, dynmole).
  int64_t pairs_per_token = 0;
};

struct RouterOutput {
  Routing routing;
  at::Tensor logits_TE;  // float32
  at::Tensor probs_TE;   // float32 softmax of logits_TE
};

// z = x W_r^T in float32; in training with jitter > 0 the router input is first multiplied
// elementwise by U(1 - jitter, 1 + jitter) drawn from `gen`.
at::Tensor router_logits(const at::Tensor& x_TD, const at::Tensor& weight_ED, double jitter_noise,
                         bool training, const std::optional<at::Generator>& gen);

// Selects experts per token from float32 logits according to `options`:
//   topk:    the K largest p, weights renormalised to sum 1;
//   topp:    experts in descending p until the cumulative sum first exceeds top_p (that expert
//            included); weights p, not renormalised;
//   switch:  top-1 with weight p; tokens beyond the capacity of their expert (in token order)
//            are dropped (no pair), so they pass through;
//   dynmole: normalised Tsallis entropy S_q(p) > threshold: every expert with weight p;
//            otherwise the union of the top-p set and the top keep_top_k, weights p;
//   dense:   every expert with weight p.
// CUDA float32 logits with E <= 64 and a strategy other than switch take the fused kernels of
// kernels/cuda/router_ops.h when they are built: the same pairs (unless a top-p sum or an entropy
// lies within float32 rounding of its threshold), probabilities and weights within float32
// rounding; one device-to-host copy (the pair count) for topp and dynmole, none otherwise.
RouterOutput route(const at::Tensor& logits_TE, const RouterOptions& options);

// The fused router kernels' description of `options`' selection rule; none for switch routing
// (its capacity is not a per-token rule).
std::optional<kernels::RouterSelect> fused_select(const RouterOptions& options);

// Normalised Tsallis entropy per token: (1 - sum p^q)/(q - 1) divided by its maximum
// (1 - E^(1-q))/(q - 1); Shannon entropy / ln E at q = 1. In [0, 1]; differentiable.
at::Tensor normalized_tsallis_entropy(const at::Tensor& probs_TE, double q);

}  // namespace mole::moe
