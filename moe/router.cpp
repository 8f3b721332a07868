// Routers (see router.h). Selection works on experts sorted per token by descending logit (the
// same order as descending probability); a boolean keep mask over those sorted positions turns
// into (token, expert, weight) pairs that are token-major and in descending probability.
// CUDA float32 logits of every strategy but switch take the fused kernels of
// kernels/cuda/router_ops.h when they are built; everything else takes the ATen path below.
#include "moe/router.h"

#include <ATen/ATen.h>

#include <cfloat>
#include <cmath>
#include <tuple>

#include "kernels/check.h"
#include "kernels/cuda/router_ops.h"
#include "moe/precision.h"
#include "moe/random.h"

namespace mole::moe {

RoutingStrategy parse_routing_strategy(const std::string& name) {
  if (name == "topk") return RoutingStrategy::kTopK;
  if (name == "topp") return RoutingStrategy::kTopP;
  if (name == "switch") return RoutingStrategy::kSwitch;
  if (name == "dynmole") return RoutingStrategy::kDynMole;
  if (name == "dense") return RoutingStrategy::kDense;
  MOLE_FAIL("unknown routing strategy '", name,
            "' (expected one of: topk, topp, switch, dynmole, dense)");
}

const char* routing_strategy_name(RoutingStrategy strategy) {
  switch (strategy) {
    case RoutingStrategy::kTopK: return "topk";
    case RoutingStrategy::kTopP: return "topp";
    case RoutingStrategy::kSwitch: return "switch";
    case RoutingStrategy::kDynMole: return "dynmole";
    case RoutingStrategy::kDense: return "dense";
  }
  MOLE_FAIL("invalid RoutingStrategy value ", static_cast<int>(strategy));
}

// Only the options that the strategy reads are checked, so that e.g. a dense router with one
// expert does not trip over the default top_k = 2.
void RouterOptions::validate(int64_t num_experts) const {
  const char* name = routing_strategy_name(strategy);
  MOLE_CHECK(num_experts >= 1, "router (", name, ") needs at least one expert, got num_experts = ",
             num_experts);
  MOLE_CHECK(jitter_noise >= 0.0 && jitter_noise < 1.0,
             "router option jitter_noise must be in [0, 1), got ", jitter_noise);
  switch (strategy) {
    case RoutingStrategy::kTopK:
      MOLE_CHECK(top_k >= 1 && top_k <= num_experts, "router option top_k must be in [1, ",
                 num_experts, "] (num_experts), got ", top_k);
      break;
    case RoutingStrategy::kTopP:
      MOLE_CHECK(top_p > 0.0 && top_p <= 1.0, "router option top_p must be in (0, 1], got ",
                 top_p);
      break;
    case RoutingStrategy::kSwitch:
      MOLE_CHECK(capacity_factor > 0.0, "router option capacity_factor must be > 0, got ",
                 capacity_factor);
      break;
    case RoutingStrategy::kDynMole:
      MOLE_CHECK(top_p > 0.0 && top_p <= 1.0, "router option top_p must be in (0, 1], got ",
                 top_p);
      MOLE_CHECK(entropy_q > 0.0, "router option entropy_q must be > 0, got ", entropy_q);
      MOLE_CHECK(entropy_threshold >= 0.0 && entropy_threshold <= 1.0,
                 "router option entropy_threshold must be in [0, 1], got ", entropy_threshold);
      MOLE_CHECK(keep_top_k >= 1 && keep_top_k <= num_experts,
                 "router option keep_top_k must be in [1, ", num_experts,
                 "] (num_experts), got ", keep_top_k);
      break;
    case RoutingStrategy::kDense:
      break;
  }
}

at::Tensor router_logits(const at::Tensor& x_TD, const at::Tensor& weight_ED, double jitter_noise,
                         bool training, const std::optional<at::Generator>& gen) {
  MOLE_CHECK(x_TD.dim() == 2, "router input must be [T, D], got ", x_TD.sizes());
  MOLE_CHECK(weight_ED.dim() == 2 && weight_ED.size(1) == x_TD.size(1),
             "router weight must be [E, ", x_TD.size(1), "], got ", weight_ED.sizes());
  MOLE_CHECK(jitter_noise >= 0.0 && jitter_noise < 1.0,
             "router option jitter_noise must be in [0, 1), got ", jitter_noise);
  at::Tensor x = x_TD.to(adapter_dtype(x_TD.scalar_type()));
  if (training && jitter_noise > 0.0) {
    at::Tensor noise_TD = at::empty_like(x);
    noise_TD.uniform_(1.0 - jitter_noise, 1.0 + jitter_noise, require_generator(gen, "router jitter"));
    x = x * noise_TD;
  }
  return at::linear(x, weight_ED.to(x.scalar_type()));
}

at::Tensor normalized_tsallis_entropy(const at::Tensor& probs_TE, double q) {
  MOLE_CHECK(probs_TE.dim() >= 1, "entropy needs probabilities [..., E], got a scalar");
  MOLE_CHECK(q > 0.0, "Tsallis entropy q must be > 0, got ", q);
  const int64_t num_experts = probs_TE.size(-1);
  // Zero, but connected to the graph so that a loss made only of it can still run backward.
  if (num_experts <= 1) return probs_TE.sum(-1) * 0.0;
  // p log p and p^q = p * p^(q-1) with the second factor clamped: exact for p > 0, value 0 and a
  // finite gradient at p = 0 (where log p and, for q < 1, p^(q-1) are infinite).
  at::Tensor p = probs_TE.clamp_min(FLT_MIN);
  const double e = static_cast<double>(num_experts);
  at::Tensor s;
  if (std::abs(q - 1.0) < 1e-6) {
    s = -(probs_TE * p.log()).sum(-1) / std::log(e);
  } else {
    // (1 - sum p^q)/(q - 1) over (1 - E^(1-q))/(q - 1): the (q - 1) factors cancel.
    s = (1.0 - (probs_TE * p.pow(q - 1.0)).sum(-1)) / (1.0 - std::pow(e, 1.0 - q));
  }
  // Rounding can step just outside [0, 1] (uniform p); the clamp passes gradients inside it.
  return s.clamp(0.0, 1.0);
}

namespace {

// C = ceil(T/E * capacity_factor). A product that lands a rounding error above an integer (e.g.
// 25/3 * 1.8 = 15.000000000000002) still means that integer.
int64_t expert_capacity(int64_t num_tokens, int64_t num_experts, double capacity_factor) {
  const double c = static_cast<double>(num_tokens) / static_cast<double>(num_experts) *
                   capacity_factor;
  return static_cast<int64_t>(std::ceil(c * (1.0 - 1e-12)));
}

// Keep mask over sorted positions for top-p: position j is kept iff the probabilities before it
// sum to at most top_p, i.e. experts are taken until the cumulative sum first exceeds top_p, that
// expert included. top_p = 1 keeps everything (exact arithmetic never exceeds 1).
at::Tensor top_p_keep(const at::Tensor& sorted_p_TE, double top_p) {
  const at::TensorOptions bool_options = sorted_p_TE.options().dtype(at::kBool);
  if (top_p >= 1.0) return at::ones_like(sorted_p_TE, bool_options);
  const at::Tensor cum_TE = sorted_p_TE.detach().cumsum(1);
  const int64_t num_experts = cum_TE.size(1);
  const at::Tensor before_TE =
      at::cat({at::zeros({cum_TE.size(0), 1}, cum_TE.options()),
               cum_TE.narrow(1, 0, num_experts - 1)}, 1);
  return before_TE <= top_p;
}

// Pairs from a keep mask over sorted positions. nonzero() syncs device -> host (the pair count).
Routing pairs_from_keep(const at::Tensor& keep_TE, const at::Tensor& order_TE,
                        const at::Tensor& weight_TE) {
  const int64_t num_experts = keep_TE.size(1);
  const at::Tensor where_N2 = at::nonzero(keep_TE);
  Routing routing;
  routing.token_N = where_N2.select(1, 0).contiguous();
  const at::Tensor flat_N = routing.token_N * num_experts + where_N2.select(1, 1);
  routing.expert_N = order_TE.reshape({-1}).index_select(0, flat_N);
  routing.weight_N = weight_TE.reshape({-1}).index_select(0, flat_N);
  return routing;
}

// Pairs of the first `k` sorted positions of every token: N = T*k, no host sync.
Routing pairs_of_prefix(int64_t k, const at::Tensor& order_TE, const at::Tensor& weight_TE) {
  const int64_t num_tokens = order_TE.size(0);
  Routing routing;
  routing.token_N =
      at::arange(num_tokens, order_TE.options()).unsqueeze(1).expand({num_tokens, k}).reshape({-1});
  routing.expert_N = order_TE.narrow(1, 0, k).reshape({-1});
  routing.weight_N = weight_TE.narrow(1, 0, k).reshape({-1});
  return routing;
}

Routing route_switch(const at::Tensor& order_TE, const at::Tensor& sorted_p_TE,
                     int64_t num_experts, double capacity_factor) {
  const int64_t num_tokens = order_TE.size(0);
  const int64_t capacity = expert_capacity(num_tokens, num_experts, capacity_factor);
  const at::Tensor expert_T = order_TE.select(1, 0);
  // 1-based position of each token in its expert's queue, in token order.
  const at::Tensor position_T =
      at::one_hot(expert_T, num_experts).cumsum(0).gather(1, expert_T.unsqueeze(1)).squeeze(1);
  const at::Tensor kept_N = at::nonzero(position_T <= capacity).select(1, 0);  // host sync
  Routing routing;
  routing.token_N = kept_N.contiguous();
  routing.expert_N = expert_T.index_select(0, kept_N);
  routing.weight_N = sorted_p_TE.select(1, 0).index_select(0, kept_N);
  return routing;
}

// The fused CUDA router's rule for `options`; switch has none (its capacity is filled in token
// order, which the per-token kernels do not see).
int64_t fixed_pairs_per_token(const RouterOptions& options, int64_t num_experts) {
  if (options.strategy == RoutingStrategy::kTopK) return options.top_k;
  if (options.strategy == RoutingStrategy::kDense) return num_experts;
  return 0;
}

}  // namespace

std::optional<kernels::RouterSelect> fused_select(const RouterOptions& options) {
  kernels::RouterSelect select;
  switch (options.strategy) {
    case RoutingStrategy::kTopK: select.rule = kernels::RouterRule::kTopK; break;
    case RoutingStrategy::kTopP: select.rule = kernels::RouterRule::kTopP; break;
    case RoutingStrategy::kDynMole: select.rule = kernels::RouterRule::kDynMole; break;
    case RoutingStrategy::kDense: select.rule = kernels::RouterRule::kDense; break;
    case RoutingStrategy::kSwitch: return std::nullopt;
  }
  select.top_k = options.top_k;
  select.top_p = options.top_p;
  select.entropy_q = options.entropy_q;
  select.entropy_threshold = options.entropy_threshold;
  select.keep_top_k = options.keep_top_k;
  return select;
}

RouterOutput route(const at::Tensor& logits_TE, const RouterOptions& options) {
  MOLE_CHECK(logits_TE.dim() == 2, "router logits must be [T, E], got ", logits_TE.sizes());
  MOLE_CHECK(logits_TE.is_floating_point(),
             "router logits must be floating point, got ", logits_TE.scalar_type());
  const int64_t num_tokens = logits_TE.size(0);
  const int64_t num_experts = logits_TE.size(1);
  options.validate(num_experts);

  RouterOutput out;
  out.logits_TE = logits_TE.to(adapter_dtype(logits_TE.scalar_type()));
  const std::optional<kernels::RouterSelect> select = fused_select(options);
  if (select && kernels::cuda_router_kernels_built() &&
      kernels::cuda_router_supports(out.logits_TE)) {
    kernels::FusedRouting fused = kernels::route_cuda(out.logits_TE, *select);
    out.probs_TE = fused.probs_TE;
    out.routing.token_N = fused.token_N;
    out.routing.expert_N = fused.expert_N;
    out.routing.weight_N = fused.weight_N;
    out.routing.num_tokens = num_tokens;
    out.routing.num_experts = num_experts;
    out.routing.pairs_per_token = fixed_pairs_per_token(options, num_experts);
    return out;
  }
  out.probs_TE = at::softmax(out.logits_TE, 1);
  // Sorting the logits rather than the probabilities: equal logits are exact ties, whereas
  // softmax may round equal inputs differently (vectorised body vs scalar tail). The stable
  // sort puts the lower expert id first among ties.
  const at::Tensor order_TE = std::get<1>(
      at::sort(out.logits_TE.detach(), /*stable=*/true, /*dim=*/1, /*descending=*/true));
  const at::Tensor sorted_p_TE = out.probs_TE.gather(1, order_TE);

  switch (options.strategy) {
    case RoutingStrategy::kTopK: {
      const at::Tensor top_TK = sorted_p_TE.narrow(1, 0, options.top_k);
      out.routing = pairs_of_prefix(options.top_k, order_TE, top_TK / top_TK.sum(1, true));
      break;
    }
    case RoutingStrategy::kDense:
      out.routing = pairs_of_prefix(num_experts, order_TE, sorted_p_TE);
      break;
    case RoutingStrategy::kTopP:
      out.routing = pairs_from_keep(top_p_keep(sorted_p_TE, options.top_p), order_TE,
                                    sorted_p_TE);
      break;
    case RoutingStrategy::kSwitch:
      out.routing = route_switch(order_TE, sorted_p_TE, num_experts, options.capacity_factor);
      break;
    case RoutingStrategy::kDynMole: {
      const at::Tensor entropy_T =
          normalized_tsallis_entropy(out.probs_TE.detach(), options.entropy_q);
      const at::Tensor rank_E = at::arange(num_experts, order_TE.options());
      const at::Tensor keep_TE = top_p_keep(sorted_p_TE, options.top_p)
                                     .logical_or(rank_E.lt(options.keep_top_k).unsqueeze(0))
                                     .logical_or(entropy_T.gt(options.entropy_threshold)
                                                     .unsqueeze(1));
      out.routing = pairs_from_keep(keep_TE, order_TE, sorted_p_TE);
      break;
    }
  }
  out.routing.num_tokens = num_tokens;
  out.routing.num_experts = num_experts;
  out.routing.pairs_per_token = fixed_pairs_per_token(options, num_experts);
  return out;
}

}  // namespace mole::moe
