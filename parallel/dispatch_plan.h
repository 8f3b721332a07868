// Choosing, per MoE site, how expert parallelism reaches remote experts (DESIGN.md §4): move the
// routed token rows (all-to-all) or the experts' LoRA weights (all-gather + reduce-scatter).
// LoRA experts are small, so moving them is often far cheaper than moving tokens; an FFN-block
// site in token mode also runs its frozen base FFN once per routed pair instead of once per token.
// The rule weighs both: estimated seconds = bytes / link rate + extra FLOPs / compute rate.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "moe/dispatcher.h"
#include "moe/expert_shard.h"

namespace mole::parallel {

struct DispatchCostModel {
  double link_bytes_per_s = 25e9;  // per-rank all-to-all / all-gather rate
  double flops_per_s = 100e12;     // sustained matrix rate of the frozen base
};

struct DispatchPlanOptions {
  std::string requested = "auto";  // parallel.dispatch: auto | tokens | weights
  int ep = 1;                      // ranks of an EP group
  int64_t tokens = 0;              // T per micro-batch on one rank
  int64_t row_bytes = 4;           // bytes per element of token rows (model dtype)
  int64_t param_bytes = 4;         // bytes per element of expert LoRA weights
  DispatchCostModel cost;
};

// One site's estimate per training step (forward + backward), bytes this rank sends to its EP
// peers, assuming routing spreads evenly over experts.
struct SiteDispatch {
  std::string site;
  int64_t num_experts = 0;
  double pairs_per_token = 0;  // K (its estimate for top-p / DynMoLE / switch / dense)
  int64_t token_bytes = 0;     // 2 * T K (P - 1)/P * (D_in + D_out) * row bytes
  int64_t weight_bytes = 0;    // 2 * (E - e) * params per expert * param bytes
  double extra_flops = 0;      // token mode, FFN block: (K - 1) T * 12 D F
  double token_s = 0, weight_s = 0;
  moe::DispatchMode mode = moe::DispatchMode::kLocal;
};

// Validates each site's expert count against ep (throws naming the site) and picks its mode:
// local when its experts are replicated (fewer than ep, or ep = 1), else `requested`, where auto
// takes the cheaper estimate (weights on a tie).
std::vector<SiteDispatch> plan_dispatch(const std::vector<moe::MoeSiteInfo>& sites,
                                        const DispatchPlanOptions& options);
std::map<std::string, moe::DispatchMode> dispatch_modes(const std::vector<SiteDispatch>& plan);
// A few lines for the start-up log: the choice and byte counts per site (sites with the same
// numbers are grouped).
std::vector<std::string> describe_dispatch(const std::vector<SiteDispatch>& plan);

}  // namespace mole::parallel
