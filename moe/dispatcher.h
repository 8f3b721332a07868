// The interface through which MoE sites reach experts that may live on other ranks (DESIGN.md §4).
// moe/ knows nothing about ranks: a site asks its Dispatcher which experts it holds and how to
// reach the others; parallel/ implements it for expert parallelism (all-to-all of token rows, or
// an all-gather of the experts' LoRA weights). Without a dispatcher (ForwardContext::dispatcher
// null) every expert is local.
//
// Legend: T tokens, D row features, O output features, E experts of a site, e experts held here,
// N routed pairs of this rank, R rows received for this rank's experts.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/permute.h"

namespace mole::moe {

// Which experts of a site this rank holds: global ids [first, first + count) of `total`.
struct ExpertShard {
  int64_t first = 0;
  int64_t count = 0;
  int64_t total = 0;

  bool is_full() const { return first == 0 && count == total; }
};

// How a site reaches its experts:
//   local:   every expert is here (one rank, EP = 1, or a site replicated because it has fewer
//            experts than EP);
//   tokens:  routed rows travel to the expert's rank and back (all-to-all);
//   weights: the site's expert LoRA weights are all-gathered, routing stays local, and their
//            gradients are reduce-scattered back to the owners.
enum class DispatchMode { kLocal, kTokens, kWeights };
const char* dispatch_mode_name(DispatchMode mode);

// What dispatch() decided, consumed by return_rows()/combine(). Immutable once made.
struct DispatchHandle {
  kernels::PermutePlan plan;          // this rank's pairs, sorted by global expert
  std::vector<int64_t> send_rows;     // rows sent to each EP peer (sum = N)
  std::vector<int64_t> recv_rows;     // rows received from each EP peer (sum = R)
  at::Tensor regroup_R;               // int64: received row of each row of rows_RD
  at::Tensor ungroup_R;               // int64: regroup_R's inverse
  std::vector<int64_t> local_counts;  // rows per local expert (sum = R), on the host
};

struct Dispatched {
  at::Tensor rows_RD;  // rows for this rank's experts, grouped by local expert
  std::shared_ptr<const DispatchHandle> handle;
  const std::vector<int64_t>& counts() const { return handle->local_counts; }
};

// Contract for every collective method: all ranks of the expert-parallel group call them in the
// same order for the same sites (also with zero rows), and their backward passes run in the same
// order (autograd's order is deterministic for graphs of the same shape). Rows and weights keep
// their dtype and device.
class Dispatcher {
 public:
  virtual ~Dispatcher() = default;

  // The experts of a site with `num_experts` experts that this rank holds.
  virtual ExpertShard shard(int64_t num_experts) const = 0;
  // The mode of the site named `site` (chosen once, at start).
  virtual DispatchMode mode(const std::string& site) const = 0;

  // Tokens mode. Sends row x_TD[token] of every pair in `plan` (sorted by global expert) to the
  // rank of its expert; returns the rows this rank's experts receive, grouped by local expert.
  // Differentiable in x_TD. Collective.
  virtual Dispatched dispatch(const at::Tensor& x_TD, const kernels::PermutePlan& plan) const = 0;
  // The reverse: rows_RO (one output row per received row, same grouping) go back to the ranks
  // they came from; returns rows_NO in this rank's plan order (sorted by global expert).
  // Differentiable. Collective.
  virtual at::Tensor return_rows(const at::Tensor& rows_RO, const DispatchHandle& handle) const = 0;
  // return_rows() followed by the weighted sum per token: y_TO. `weight_N` in routing order.
  at::Tensor combine(const at::Tensor& rows_RO, const DispatchHandle& handle,
                     const at::Tensor& weight_N) const;

  // Weights mode. Each tensor of `local_stacks` is [e, ...] (this rank's experts of a site with
  // `num_experts` experts); returns the full [E, ...] stacks, differentiable (the backward
  // reduce-scatters their gradients to the owners). Collective.
  virtual std::vector<at::Tensor> gather_experts(const std::vector<at::Tensor>& local_stacks,
                                                 int64_t num_experts) const = 0;
};

}  // namespace mole::moe
