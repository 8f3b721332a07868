// Gradient reduction for data + expert parallelism (DESIGN.md §4): afterwards every rank holds
// the gradient of the one global-batch loss. Each trainable tensor is summed over its replica
// group from the parameter registry: tensors every rank holds whole over the world, expert shards
// over their expert-data-parallel group only (the owner already holds the contributions of every
// token its EP group routed to it). The loss is normalised once by the global target-token count,
// so the reduction is a plain sum.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace mole::dist {
class Communicator;
}

namespace mole::parallel {

class ParameterRegistry;
class ProcessGrid;

// Sums the gradients of `params` over `group` in flattened buckets of at most `bucket_elements`
// (a tensor without a gradient takes part with zeros, so every rank runs the same collectives).
// Blocking; collective.
void all_reduce_gradients(const std::vector<at::Tensor>& params, dist::Communicator& group,
                          int64_t bucket_elements = int64_t{8} << 20);

// The sum of squares of every defined gradient of `params`, in float64 (a device -> host sync);
// non-finite when any gradient is.
double grad_squared_sum(const std::vector<at::Tensor>& params);

class GradientReducer {
 public:
  // The grid and the registry must outlive the reducer.
  GradientReducer(const ProcessGrid& grid, const ParameterRegistry& registry);
  // Collective over the world and the EDP group.
  void reduce() const;
  // The L2 norm of the whole (unsharded) gradient, the same on every rank: replicated tensors
  // count once, expert shards are summed over the EP group (a device -> host sync; collective
  // over the EP group when there are shards).
  double global_norm() const;

 private:
  const ProcessGrid& grid_;
  std::vector<at::Tensor> replicated_;
  std::vector<at::Tensor> expert_shards_;
};

}  // namespace mole::parallel
