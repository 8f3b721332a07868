// The expert-parallel Dispatcher (DESIGN.md §4): experts of a site are spread over the P ranks of
// an EP group (global expert g on rank g / (E / P)); a site with fewer experts than P, or any
// site when P = 1, is replicated and runs locally. Token mode moves routed rows with an uneven
// all-to-all; weight mode all-gathers the site's expert LoRA stacks.
//
// Legend: T tokens, D row features, O output features, E experts of a site, e = E / P experts per
// rank, P ranks of the EP group, N pairs routed on this rank, R rows received here.
#pragma once

#include <map>
#include <string>

#include "moe/dispatcher.h"
#include "parallel/exchange.h"

namespace mole::dist {
class Communicator;
}

namespace mole::parallel {

// The placement rule, in one place: a site of `num_experts` experts over an EP group of `ep`
// ranks. Split (e = E / ep experts per rank, rank r holding [r e, (r + 1) e)) when E >= ep;
// replicated (every rank holds all) when E < ep or ep = 1. Throws mole::Error naming the numbers
// when E >= ep is not a multiple of ep (ParallelDims::check_experts).
moe::ExpertShard place_experts(int64_t num_experts, int ep, int ep_rank);

class ExpertParallelDispatcher : public moe::Dispatcher {
 public:
  // `ep`: the expert-parallel group; it must outlive the dispatcher and every autograd graph the
  // dispatcher takes part in. `modes`: the mode of every split site by name (sites absent from
  // it are an error at their first forward unless they run locally).
  ExpertParallelDispatcher(dist::Communicator& ep, std::map<std::string, moe::DispatchMode> modes);

  moe::ExpertShard shard(int64_t num_experts) const override;
  moe::DispatchMode mode(const std::string& site) const override;
  moe::Dispatched dispatch(const at::Tensor& x_TD, const kernels::PermutePlan& plan) const override;
  at::Tensor return_rows(const at::Tensor& rows_RO, const moe::DispatchHandle& handle) const override;
  std::vector<at::Tensor> gather_experts(const std::vector<at::Tensor>& local_stacks,
                                         int64_t num_experts) const override;

  // Bytes this rank sent to its EP peers since the last reset (forward and backward).
  Traffic& traffic() const { return traffic_; }
  dist::Communicator& group() const { return ep_; }

 private:
  dist::Communicator& ep_;
  std::map<std::string, moe::DispatchMode> modes_;
  mutable Traffic traffic_;
};

}  // namespace mole::parallel
