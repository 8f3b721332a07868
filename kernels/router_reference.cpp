// Plain-loop CPU references of the fused router's CUDA launchers (see router_reference.h).
//
// Legend: T tokens, E experts, K top-k, C columns (K for top-k, else E), N routed pairs.
#include "kernels/router_reference.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <numeric>
#include <vector>

namespace mole::kernels::reference {
namespace {

// Whether expert a (logit za) ranks before expert b (logit zb): larger logit first, the lower id
// among equals, NaN before every number (a strict total order, so ranks are a permutation).
bool ranks_before(float za, int64_t a, float zb, int64_t b) {
  const bool nan_a = std::isnan(za), nan_b = std::isnan(zb);
  if (nan_a || nan_b) return nan_a && (!nan_b || a < b);
  return za > zb || (za == zb && a < b);
}

// Normalised Tsallis entropy of one token's probabilities (router_select.h).
float normalized_entropy(const float* p_E, int64_t num_experts, const RouterConstants& c) {
  if (num_experts == 1) return 0.0f;
  float sum = 0.0f;
  for (int64_t e = 0; e < num_experts; ++e) {
    const float clamped = std::max(p_E[e], FLT_MIN);
    sum += c.shannon ? p_E[e] * std::log(clamped) : p_E[e] * std::pow(clamped, c.q_minus_1);
  }
  const float s = c.shannon ? -sum / c.entropy_max : (1.0f - sum) / c.entropy_max;
  return std::min(std::max(s, 0.0f), 1.0f);
}

// n for top-p over probabilities in rank order: ranks are kept while the preceding ones sum
// (float64, rounded to float32) to at most top_p.
int64_t top_p_count(const float* sorted_p_E, int64_t num_experts, const RouterConstants& c) {
  if (c.keep_all_top_p) return num_experts;
  double before = 0.0;
  int64_t n = 0;
  while (n < num_experts && static_cast<float>(before) <= c.top_p) before += sorted_p_E[n++];
  return n;
}

}  // namespace

void route_forward(const float* logits_TE, const RouterSelect& select, float* probs_TE,
                   int64_t* expert_TC, float* weight_TC, int64_t* token_TC, int64_t* count_T,
                   int64_t* count_E, int64_t num_tokens, int64_t num_experts) {
  const RouterConstants c = router_constants(select, num_experts);
  const int64_t num_columns = router_columns(select, num_experts);
  std::fill(count_E, count_E + num_experts, int64_t{0});
  std::vector<int64_t> order_E(static_cast<size_t>(num_experts));
  std::vector<float> sorted_p_E(static_cast<size_t>(num_experts));
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* z_E = logits_TE + t * num_experts;
    float* p_E = probs_TE + t * num_experts;
    float max = -INFINITY;
    for (int64_t e = 0; e < num_experts; ++e) max = std::fmax(max, z_E[e]);
    float sum = 0.0f;
    for (int64_t e = 0; e < num_experts; ++e) {
      p_E[e] = std::exp(z_E[e] - max);
      sum += p_E[e];
    }
    for (int64_t e = 0; e < num_experts; ++e) p_E[e] /= sum;

    std::iota(order_E.begin(), order_E.end(), int64_t{0});
    std::sort(order_E.begin(), order_E.end(),
              [&](int64_t a, int64_t b) { return ranks_before(z_E[a], a, z_E[b], b); });
    for (int64_t j = 0; j < num_experts; ++j) sorted_p_E[j] = p_E[order_E[j]];

    int64_t n = num_experts;
    float renorm = 1.0f;
    switch (select.rule) {
      case RouterRule::kTopK:
        n = c.kept;
        renorm = 0.0f;
        for (int64_t j = 0; j < n; ++j) renorm += sorted_p_E[j];
        break;
      case RouterRule::kTopP:
        n = top_p_count(sorted_p_E.data(), num_experts, c);
        break;
      case RouterRule::kDynMole:
        if (!(normalized_entropy(p_E, num_experts, c) > c.threshold)) {
          n = std::max<int64_t>(top_p_count(sorted_p_E.data(), num_experts, c), c.kept);
        }
        break;
      case RouterRule::kDense:
        break;
    }

    count_T[t] = n;
    for (int64_t j = 0; j < num_columns; ++j) {
      const int64_t at = t * num_columns + j;
      const bool selected = j < n;
      expert_TC[at] = selected ? order_E[j] : -1;
      weight_TC[at] = !selected                          ? 0.0f
                      : select.rule == RouterRule::kTopK ? sorted_p_E[j] / renorm
                                                         : sorted_p_E[j];
      if (token_TC != nullptr) token_TC[at] = selected ? t : -1;
      if (selected) ++count_E[order_E[j]];
    }
  }
}

void routing_offsets(const int64_t* count_T, int64_t num_tokens, int64_t* offsets_T1) {
  offsets_T1[0] = 0;
  for (int64_t t = 0; t < num_tokens; ++t) offsets_T1[t + 1] = offsets_T1[t] + count_T[t];
}

void compact_routing(const int64_t* expert_TC, const float* weight_TC, const int64_t* offsets_T1,
                     int64_t num_tokens, int64_t num_columns, int64_t* token_N, int64_t* expert_N,
                     float* weight_N) {
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t j = 0; j < offsets_T1[t + 1] - offsets_T1[t]; ++j) {
      const int64_t pair = offsets_T1[t] + j;
      token_N[pair] = t;
      expert_N[pair] = expert_TC[t * num_columns + j];
      weight_N[pair] = weight_TC[t * num_columns + j];
    }
  }
}

void route_backward(const RouterSelect& select, const float* probs_TE, const float* grad_probs_TE,
                    const int64_t* expert_N, const float* weight_N, const float* grad_weight_N,
                    const int64_t* offsets_T1, float* grad_logits_TE, int64_t num_tokens,
                    int64_t num_experts) {
  const bool renormalised = select.rule == RouterRule::kTopK;
  const int64_t num_columns = router_columns(select, num_experts);
  std::vector<float> dp_E(static_cast<size_t>(num_experts));
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t begin = router_fixed_count(select.rule) ? t * num_columns : offsets_T1[t];
    const int64_t end = router_fixed_count(select.rule) ? begin + num_columns : offsets_T1[t + 1];
    const float* p_E = probs_TE + t * num_experts;
    float* dz_E = grad_logits_TE + t * num_experts;

    std::copy(grad_probs_TE + t * num_experts, grad_probs_TE + (t + 1) * num_experts, dp_E.begin());
    if (!renormalised) {
      for (int64_t i = begin; i < end; ++i) dp_E[expert_N[i]] += grad_weight_N[i];
    }
    float dot = 0.0f;
    for (int64_t e = 0; e < num_experts; ++e) dot += dp_E[e] * p_E[e];
    for (int64_t e = 0; e < num_experts; ++e) dz_E[e] = p_E[e] * (dp_E[e] - dot);

    if (renormalised) {
      float weighted = 0.0f;
      for (int64_t i = begin; i < end; ++i) weighted += grad_weight_N[i] * weight_N[i];
      for (int64_t i = begin; i < end; ++i) {
        dz_E[expert_N[i]] += weight_N[i] * (grad_weight_N[i] - weighted);
      }
    }
  }
}

}  // namespace mole::kernels::reference
