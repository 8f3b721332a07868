// ZeRO stages 1 and 2 (DESIGN.md §4): the AdamW state of each replica group sharded over the
// group. Every trainable tensor belongs to one group (the registry's: the world for tensors every
// rank holds, the EDP group for expert shards); per group, its tensors are laid end to end in one
// flat buffer padded to a multiple of the group size, and rank r owns the r-th contiguous slice:
// it keeps the AdamW moments of that slice only and updates those elements, and the updated
// slices are all-gathered back into every rank's tensors.
//   - Stage 1: gradients all-reduced as without ZeRO; each rank takes its slice of the sum.
//   - Stage 2: gradients reduce-scattered straight into the owner's slice (half the traffic of
//     the all-reduce). Backward still writes every tensor's whole gradient first: reducing
//     buckets during backward, which would bound that memory too, is not done yet.
// At both stages the tensors' own gradients are freed once reduced.
// The gradient norm is that of the whole unsharded gradient, from the slices (one scalar
// all-reduce over the world: the world's slices hold every element of the world group once, and
// the EDP slices of all EP ranks every expert once). Element-wise AdamW makes the update the
// same as the unsharded optimizer's, per-tensor LoRA+ multipliers and weight decay included.
#pragma once

#include <memory>

#include "parallel/optimizer.h"

namespace mole::parallel {

// `stage` 1 or 2. The registry and the grid must outlive the optimizer.
std::unique_ptr<Optimizer> make_zero_optimizer(const ParameterRegistry& registry,
                                               const ProcessGrid& grid, const AdamWOptions& options,
                                               int stage);

// The flat layout of the slots of `group` over `group_size` ranks, as seen by rank `group_rank`.
FlatLayout flat_layout(const ParameterRegistry& registry, ReplicaGroup group, int group_size,
                       int group_rank);

}  // namespace mole::parallel
