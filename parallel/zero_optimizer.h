// ZeRO stages 1 and 2 (DESIGN.md §4): the AdamW state of each replica group sharded over the
// group. Every trainable tensor belongs to one group (the registry's: the world for tensors every
// rank holds, the EDP group for expert shards). A group's tensors are cut, in registry order, into
// buckets of at most parallel.zero_bucket_mib (a larger tensor is a bucket of its own); a bucket's
// tensors are laid end to end in one flat buffer padded to a multiple of the group size, and rank
// r owns the r-th contiguous slice of it: it keeps the AdamW moments of that slice only and
// updates those elements, and the updated slices are all-gathered back into every rank's tensors.
//   - Stage 1: gradients all-reduced after backward as without ZeRO; each rank takes its slice.
//   - Stage 2: gradients reduce-scattered straight into the owner's slice during backward. A hook
//     on each tensor's gradient accumulator takes the gradient out of the tensor as soon as
//     backward has written it; once every tensor of a bucket has one, the bucket is handed to a
//     thread of the replica group that reduce-scatters it on a communicator of its own (so it
//     never interleaves with the training thread's collectives) and adds the result to the
//     rank's slice. Buckets go in one fixed order on every rank (reverse registry order: the
//     order backward produces them); end_backward() sends those still incomplete (zeros for a
//     tensor without a gradient), so every rank runs the same collectives in every pass. A
//     gradient is thus held only until its bucket is reduced: per rank, the slices plus about a
//     bucket, instead of the whole gradient (more while a bucket early in the order waits for a
//     late gradient, or when the thread falls behind: the queue is not capped). With
//     accumulation every micro-batch is reduced (as DeepSpeed's stage 2 does). Needs a backend
//     whose communicators may be used from two threads (MPI_THREAD_MULTIPLE; checked). On CUDA
//     the thread reads gradients on its default stream: backward must run on the legacy default
//     stream, as everything in mole does today.
// The gradient norm is that of the whole unsharded gradient, from the slices (one scalar
// all-reduce over the world: the world's slices hold every element of the world group once, and
// the EDP slices of all EP ranks every expert once). Element-wise AdamW makes the update the
// same as the unsharded optimizer's, per-tensor LoRA+ multipliers and weight decay included.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "parallel/optimizer.h"

namespace mole::parallel {

// `stage` 1 or 2; buckets of at most `bucket_bytes` of trainable tensors. The registry and the
// grid must outlive the optimizer. Collective over the world and the EDP group at stage 2 (each
// group's gradient thread gets a communicator of its own).
std::unique_ptr<Optimizer> make_zero_optimizer(const ParameterRegistry& registry,
                                               const ProcessGrid& grid, const AdamWOptions& options,
                                               int stage, int64_t bucket_bytes);

// The flat buffers (buckets) of the slots of `group` over `group_size` ranks, as seen by rank
// `group_rank`, with at most `bucket_elements` per bucket unless one slot alone has more.
std::vector<FlatLayout> flat_layouts(const ParameterRegistry& registry, ReplicaGroup group,
                                     int group_size, int group_rank, int64_t bucket_elements);

// What a ZeRO `stage` optimizer keeps with these buckets, whose elements have `element_bytes`
// each (one entry per layout): the whole trainable tensors, the reduced gradient slices plus, at
// stage 1, the whole gradient backward writes, at stage 2 the largest bucket, and the moments of
// the slices.
OptimizerMemory zero_memory(const std::vector<FlatLayout>& layouts,
                            const std::vector<int64_t>& element_bytes, int stage);

}  // namespace mole::parallel
