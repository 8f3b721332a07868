// Per-site choice of token or weight dispatch (see dispatch_plan.h).
#include "parallel/dispatch_plan.h"

#include <algorithm>
#include <cstdio>

#include "kernels/check.h"
#include "parallel/expert_dispatcher.h"

namespace mole::parallel {
namespace {

double pairs_per_token(const moe::RouterOptions& r, int64_t num_experts) {
  switch (r.strategy) {
    case moe::RoutingStrategy::kTopK: return static_cast<double>(r.top_k);
    case moe::RoutingStrategy::kSwitch: return 1.0;
    case moe::RoutingStrategy::kDense: return static_cast<double>(num_experts);
    case moe::RoutingStrategy::kTopP: return std::min<double>(2.0, static_cast<double>(num_experts));
    case moe::RoutingStrategy::kDynMole:
      return std::min<double>(static_cast<double>(std::max<int64_t>(r.keep_top_k, 2)),
                              static_cast<double>(num_experts));
  }
  return 1.0;
}

std::string mib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return buf;
}

}  // namespace

std::vector<SiteDispatch> plan_dispatch(const std::vector<moe::MoeSiteInfo>& sites,
                                        const DispatchPlanOptions& o) {
  MOLE_CHECK(o.requested == "auto" || o.requested == "tokens" || o.requested == "weights",
             "parallel.dispatch must be auto, tokens or weights, got '", o.requested, "'");
  MOLE_CHECK(o.ep >= 1, "parallel.ep = ", o.ep, " must be at least 1");
  std::vector<SiteDispatch> plan;
  const int64_t P = o.ep;
  for (const moe::MoeSiteInfo& s : sites) {
    SiteDispatch d;
    d.site = s.name;
    d.num_experts = s.num_experts;
    d.pairs_per_token = pairs_per_token(s.router, s.num_experts);
    moe::ExpertShard placed;
    try {
      placed = place_experts(s.num_experts, o.ep, 0);
    } catch (const Error& e) {
      MOLE_FAIL(s.name, ": ", e.what());
    }
    if (!placed.is_full()) {
      const double remote = static_cast<double>(P - 1) / static_cast<double>(P);
      const double pairs = static_cast<double>(o.tokens) * d.pairs_per_token;
      d.token_bytes = static_cast<int64_t>(2.0 * pairs * remote *
                                           static_cast<double>(s.in_features + s.out_features) *
                                           static_cast<double>(o.row_bytes));
      const int64_t remote_experts = s.num_experts - placed.count;
      d.weight_bytes = 2 * remote_experts * s.params_per_expert * o.param_bytes;
      if (s.ffn_block) {
        d.extra_flops = std::max(0.0, d.pairs_per_token - 1.0) * static_cast<double>(o.tokens) *
                        12.0 * static_cast<double>(s.in_features) * static_cast<double>(s.intermediate);
      }
      d.token_s = static_cast<double>(d.token_bytes) / o.cost.link_bytes_per_s +
                  d.extra_flops / o.cost.flops_per_s;
      d.weight_s = static_cast<double>(d.weight_bytes) / o.cost.link_bytes_per_s;
      if (o.requested == "tokens") d.mode = moe::DispatchMode::kTokens;
      else if (o.requested == "weights") d.mode = moe::DispatchMode::kWeights;
      else d.mode = d.token_s < d.weight_s ? moe::DispatchMode::kTokens : moe::DispatchMode::kWeights;
    }
    plan.push_back(d);
  }
  return plan;
}

std::map<std::string, moe::DispatchMode> dispatch_modes(const std::vector<SiteDispatch>& plan) {
  std::map<std::string, moe::DispatchMode> modes;
  for (const SiteDispatch& d : plan) modes[d.site] = d.mode;
  return modes;
}

std::vector<std::string> describe_dispatch(const std::vector<SiteDispatch>& plan) {
  // Group consecutive sites whose numbers agree (e.g. every layer of a uniform allocation).
  std::vector<std::string> lines;
  size_t i = 0;
  while (i < plan.size()) {
    size_t j = i + 1;
    while (j < plan.size() && plan[j].mode == plan[i].mode && plan[j].token_bytes == plan[i].token_bytes &&
           plan[j].weight_bytes == plan[i].weight_bytes && plan[j].num_experts == plan[i].num_experts) {
      ++j;
    }
    const SiteDispatch& d = plan[i];
    std::string sites = d.site + (j - i > 1 ? " (+" + std::to_string(j - i - 1) + " alike)" : "");
    if (d.mode == moe::DispatchMode::kLocal) {
      lines.push_back(sites + ": " + std::to_string(d.num_experts) + " experts replicated, local");
    } else {
      char buf[160];
      std::snprintf(buf, sizeof buf, ": %s | per step tokens %s (%.3g ms) vs weights %s (%.3g ms)",
                    moe::dispatch_mode_name(d.mode), mib(d.token_bytes).c_str(), 1e3 * d.token_s,
                    mib(d.weight_bytes).c_str(), 1e3 * d.weight_s);
      lines.push_back(sites + buf);
    }
    i = j;
  }
  return lines;
}

}  // namespace mole::parallel
