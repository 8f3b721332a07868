// The expert-selection rule shared by the fused router's CPU reference
// (kernels/router_reference.h), its CUDA launchers (kernels/cuda/router_kernels.h) and its tensor
// wrapper (kernels/cuda/router_ops.h): the rules of moe::route (moe/router.h) minus switch, in
// plain C++ (no CUDA, no LibTorch) so that all three read the same definition.
//
// Legend: T tokens, E experts, K top-k, C columns of the per-token selection (K or E).
#pragma once

#include <cmath>
#include <cstdint>

namespace mole::kernels {

// Per token, experts are ranked by descending logit, ties broken by the lower expert id (NaN ranks
// above every number, as in ATen's descending sort); p = softmax(logits). Every rule selects a
// prefix of that ranking, of length n:
//   kTopK:    n = K; weights p renormalised over the K selected (they sum to 1);
//   kTopP:    n = 1 + the number of later ranks j whose preceding probabilities sum to at most
//             top_p (experts until the cumulative sum first exceeds top_p, that expert included;
//             every expert when top_p >= 1); weights p;
//   kDynMole: normalised Tsallis entropy S_q(p) > threshold: n = E; otherwise n = max(n of
//             kTopP, keep_top_k); weights p;
//   kDense:   n = E; weights p.
enum class RouterRule : int {
  kTopK = 0,
  kTopP = 1,
  kDynMole = 2,
  kDense = 3,
};

// The largest E the CUDA launchers handle: a token's experts live in at most two registers per
// lane of one warp. Wider routers take the ATen path of moe::route.
constexpr int64_t kMaxRouterExperts = 64;

// The options of moe::RouterOptions that the rules read.
struct RouterSelect {
  RouterRule rule = RouterRule::kTopK;
  int64_t top_k = 2;               // kTopK
  double top_p = 0.75;             // kTopP, kDynMole
  double entropy_q = 1.1;          // kDynMole
  double entropy_threshold = 0.9;  // kDynMole
  int64_t keep_top_k = 2;          // kDynMole
};

// Whether every token selects the same number of experts (K for top-k, E for dense): then the
// per-token selection [T, C] is already the token-major pair list (N = T*C, known on the host).
inline bool router_fixed_count(RouterRule rule) {
  return rule == RouterRule::kTopK || rule == RouterRule::kDense;
}

// C, the columns of the per-token selection buffers: K for top-k, E otherwise.
inline int64_t router_columns(const RouterSelect& select, int64_t num_experts) {
  return select.rule == RouterRule::kTopK ? select.top_k : num_experts;
}

// Null when `select` is valid for `num_experts` (>= 1), else what is wrong (the ranges of
// moe::RouterOptions::validate).
inline const char* router_select_error(const RouterSelect& select, int64_t num_experts) {
  if (num_experts < 1) return "num_experts must be >= 1";
  switch (select.rule) {
    case RouterRule::kTopK:
      return select.top_k >= 1 && select.top_k <= num_experts ? nullptr : "top_k must be in [1, E]";
    case RouterRule::kTopP:
      return select.top_p > 0.0 && select.top_p <= 1.0 ? nullptr : "top_p must be in (0, 1]";
    case RouterRule::kDynMole:
      if (!(select.top_p > 0.0 && select.top_p <= 1.0)) return "top_p must be in (0, 1]";
      if (!(select.entropy_q > 0.0)) return "entropy_q must be > 0";
      if (!(select.entropy_threshold >= 0.0 && select.entropy_threshold <= 1.0)) {
        return "entropy_threshold must be in [0, 1]";
      }
      return select.keep_top_k >= 1 && select.keep_top_k <= num_experts
                 ? nullptr
                 : "keep_top_k must be in [1, E]";
    case RouterRule::kDense:
      return nullptr;
  }
  return "unknown rule";
}

// The constants of a rule as both implementations use them, in float32 like the ATen path of
// moe::route (which compares float32 tensors with these options and divides by the entropy's
// maximum as a float32 scalar):
//   top_p >= 1 keeps everything; otherwise a rank is kept while the preceding probabilities,
//   summed in float64 in rank order and rounded to float32, are <= float(top_p);
//   S_q = -sum p log max(p, FLT_MIN) / float(ln E) when |q - 1| < 1e-6 (Shannon), else
//   (1 - sum p max(p, FLT_MIN)^float(q - 1)) / float(1 - E^(1 - q)); clamped to [0, 1]; 0 when
//   E = 1; compared as S_q > float(threshold).
struct RouterConstants {
  int rule = 0;            // RouterRule
  int kept = 0;            // K (kTopK), keep_top_k (kDynMole), else 0
  int keep_all_top_p = 0;  // top_p >= 1
  int shannon = 0;         // |q - 1| < 1e-6
  float top_p = 0.0f;
  float q_minus_1 = 0.0f;
  float entropy_max = 1.0f;  // ln E (Shannon) or 1 - E^(1 - q); the normaliser of S_q
  float threshold = 0.0f;
};

inline RouterConstants router_constants(const RouterSelect& select, int64_t num_experts) {
  RouterConstants c;
  c.rule = static_cast<int>(select.rule);
  c.kept = static_cast<int>(select.rule == RouterRule::kTopK      ? select.top_k
                            : select.rule == RouterRule::kDynMole ? select.keep_top_k
                                                                  : 0);
  c.keep_all_top_p = select.top_p >= 1.0;
  c.shannon = std::abs(select.entropy_q - 1.0) < 1e-6;
  c.top_p = static_cast<float>(select.top_p);
  c.q_minus_1 = static_cast<float>(select.entropy_q - 1.0);
  const double e = static_cast<double>(num_experts);
  c.entropy_max =
      static_cast<float>(c.shannon ? std::log(e) : 1.0 - std::pow(e, 1.0 - select.entropy_q));
  c.threshold = static_cast<float>(select.entropy_threshold);
  return c;
}

}  // namespace mole::kernels
