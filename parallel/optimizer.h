// The optimizer as the training step sees it (DESIGN.md §4): it owns the gradient reduction over
// each tensor's replica group, the norm of the whole unsharded gradient, clipping, the update,
// and the state a checkpoint saves. Two implementations: the replicated one keeps the full AdamW
// state of every tensor this rank holds; ZeRO-1/2 (zero_optimizer.h) keeps 1/N of it.
//
// Contract: every collective method (reduce_gradients, grad_norm) is called by every rank at the
// same point of the step, in the same order; both block until done.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
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

// Optimizer state in global terms, for sharded checkpoints that any layout can load: elements
// [begin, begin + values.numel()) of the row-major flattened whole tensor `name` (every expert of
// a site, under global expert ids), of moment `kind` ("exp_avg" or "exp_avg_sq").
struct StatePiece {
  std::string name;
  std::string kind;
  int64_t begin = 0;
  at::Tensor values;  // 1-D, a copy
};
// Elements [begin, begin + count) of moment `kind` of the flattened whole tensor `name`, as a 1-D
// tensor (throws naming what is missing).
using StateReader = std::function<at::Tensor(const std::string& name, const std::string& kind,
                                             int64_t begin, int64_t count)>;

// Where this rank's part of `slot` starts in the flattened whole tensor.
int64_t global_begin(const ParamSlot& slot);

// One of ZeRO's flat buffers: a bucket of one replica group's registry slots (consecutive in
// registry order, at most parallel.zero_bucket_mib of them unless one slot alone is larger) laid
// end to end, padded to a multiple of the group size; rank r of the group owns elements
// [r * slice, (r + 1) * slice). What a checkpoint needs to save and re-slice the state.
struct FlatEntry {
  std::string name;    // the slot's global name
  int64_t offset = 0;  // of its first element in the flat buffer
  int64_t numel = 0;   // of this rank's part of the slot (the rows it holds)
};
struct FlatLayout {
  std::string group;  // "world" or "edp"
  int bucket = 0;     // index of the bucket within its group, in registry order
  std::vector<FlatEntry> entries;
  int64_t numel = 0;   // sum of the entries
  int64_t padded = 0;  // numel rounded up to a multiple of the group size
  int64_t slice = 0;   // padded / group size
  int64_t slice_begin = 0;  // this rank's first element
};

// Bytes this rank keeps for the trainable state (for logs and summary.json).
struct OptimizerMemory {
  int64_t trainable_bytes = 0;  // the trainable tensors (whole on every rank that holds them)
  // Gradients at their peak (collectives' transient buffers aside): whole without ZeRO; the
  // reduced slices plus, at stage 1, the whole gradient backward wrote, at stage 2 the largest
  // bucket (gradients are held only until their bucket is reduce-scattered).
  int64_t grad_bytes = 0;
  int64_t optimizer_bytes = 0;  // AdamW moments (ZeRO-1/2: this rank's slices)
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // Collective over the world and the EDP group: afterwards every trainable tensor's gradient is
  // its sum over the tensor's replica group (a tensor without a gradient takes part with zeros).
  virtual void reduce_gradients() = 0;
  // Called after each backward pass of a step (each micro-batch), by every rank: ZeRO-2 reduces
  // there what the pass has not reduced yet. Nothing to do for the others.
  virtual void end_backward() {}
  // The L2 norm of the whole unsharded gradient, the same on every rank; non-finite when any
  // gradient is. A device -> host sync; collective over the EP group when there are shards.
  virtual double grad_norm() const = 0;
  // Scales the gradients by max_norm / norm when norm > max_norm (`norm` from grad_norm()).
  virtual void clip(double max_norm, double norm) = 0;
  // One update with base learning rate `lr` (per-slot multipliers from the registry).
  virtual void step(double lr) = 0;
  virtual void zero_grad() = 0;

  virtual OptimizerMemory memory() const = 0;
  // ZeRO's flat buffers; empty for the unsharded optimizer.
  virtual std::vector<FlatLayout> flat_layouts() const { return {}; }

  virtual OptimizerState state() const = 0;
  // Restores a state() of the same registry (names and shapes checked).
  virtual void load_state(const OptimizerState& state) = 0;

  // This rank's share of the moments for a checkpoint: over the world, every element of every
  // moment is in exactly one rank's pieces (a replicated tensor's by one holder, a ZeRO slice's
  // by its owner).
  virtual std::vector<StatePiece> state_pieces() const = 0;
  // Restores the moments this rank keeps from pieces saved under any layout, and the number of
  // updates taken.
  virtual void load_state_pieces(const StateReader& read, int64_t steps) = 0;
  virtual int64_t steps_taken() const = 0;
  virtual const ParameterRegistry& registry() const = 0;
};

// parallel.zero_bucket_mib's default.
constexpr int64_t kZeroBucketBytes = int64_t{32} << 20;

// AdamW for the run's layout: with grid->dims().zero() 1 or 2 the ZeRO optimizer
// (zero_optimizer.h, flat buffers of `zero_bucket_bytes`), else every rank keeping the full state
// of what it holds. `grid` null: one process (ZeRO on one process is the unsharded optimizer).
// The registry and the grid must outlive the optimizer. Collective over the grid with ZeRO-2.
std::unique_ptr<Optimizer> make_optimizer(const ParameterRegistry& registry,
                                          const ProcessGrid* grid, const AdamWOptions& options,
                                          int64_t zero_bucket_bytes = kZeroBucketBytes);

}  // namespace mole::parallel
