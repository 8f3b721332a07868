// The optimizer as the training step sees it (DESIGN.md §4): it owns the gradient reduction over
// each tensor's replica group, the norm of the whole unsharded gradient, clipping, the update,
// and the state a checkpoint saves. Today's implementation keeps the full AdamW state of every
// tensor this rank holds (no sharding of optimizer state); ZeRO is a second implementation of
// the same interface.
//
// Contract: every collective method (reduce_gradients, grad_norm) is called by every rank at the
// same point of the step, in the same order; both block until done.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "parallel/adamw.h"
#include "parallel/parameter_registry.h"

namespace mole::parallel {

class ProcessGrid;

// What a checkpoint needs to restore the optimizer: per registry slot (by global name) the moments
// this rank keeps, and the number of updates taken.
struct OptimizerSlotState {
  std::string name;
  at::Tensor exp_avg;
  at::Tensor exp_avg_sq;
};
struct OptimizerState {
  int64_t steps = 0;
  std::vector<OptimizerSlotState> slots;
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // Collective over the world and the EDP group: afterwards every trainable tensor's gradient is
  // its sum over the tensor's replica group (a tensor without a gradient takes part with zeros).
  virtual void reduce_gradients() = 0;
  // The L2 norm of the whole unsharded gradient, the same on every rank; non-finite when any
  // gradient is. A device -> host sync; collective over the EP group when there are shards.
  virtual double grad_norm() const = 0;
  // Scales the gradients by max_norm / norm when norm > max_norm (`norm` from grad_norm()).
  virtual void clip(double max_norm, double norm) = 0;
  // One update with base learning rate `lr` (per-slot multipliers from the registry).
  virtual void step(double lr) = 0;
  virtual void zero_grad() = 0;

  virtual OptimizerState state() const = 0;
  // Restores a state() of the same registry (names and shapes checked).
  virtual void load_state(const OptimizerState& state) = 0;
  virtual const ParameterRegistry& registry() const = 0;
};

// AdamW with every rank keeping the full state of what it holds. `grid` null: one process.
// The registry and the grid must outlive the optimizer.
std::unique_ptr<Optimizer> make_optimizer(const ParameterRegistry& registry,
                                          const ProcessGrid* grid, const AdamWOptions& options);

}  // namespace mole::parallel
