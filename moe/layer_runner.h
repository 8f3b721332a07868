// How a training pass runs its decoder layers (the LayerRunner seam of forward_context.h): in
// order, telling the base weights what comes next, and optionally with activation checkpointing.
//
// Base weights: before layer i runs, layer i + 1 (after the last layer: the final norm and LM
// head) is prefetched; the last layer and the head stay acquired from the forward pass into the
// backward pass; in backward, a hook on each layer's output acquires that layer again just before
// its backward starts, prefetches the layer below and lets go of what ran above it (the next
// layer, or the head), whose backward is then over. The embedding is used only for its lookup.
// A whole-tensor base ignores all of it; a sharded one (parallel/) gathers and frees.
//
// Activation checkpointing: a layer runs without keeping its activations (only its input); in
// backward it runs again, from the generator state it started with (so dropout and router
// jitter draw the same values), and its backward runs through that recomputation. The layer's
// router records stay differentiable: their tensors are outputs of the checkpointed unit, so
// the auxiliary losses reach the routers as they do without checkpointing.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "moe/base_weights.h"
#include "moe/forward_context.h"

namespace mole::moe {

class TrainingLayers final : public LayerRunner {
 public:
  // `ctx` is the pass's context (generator, site records). The runner, `weights` and `ctx` must
  // live until the pass's backward is over; destroying the runner ends the pass (end_pass()).
  TrainingLayers(const BaseWeights& weights, int64_t num_layers, ForwardContext& ctx, bool checkpoint);
  ~TrainingLayers() override;
  TrainingLayers(const TrainingLayers&) = delete;
  TrainingLayers& operator=(const TrainingLayers&) = delete;

  at::Tensor run(int64_t layer, const at::Tensor& h_BSD, const LayerBody& body) const override;

  struct Checkpoint;  // what a checkpointed layer keeps for its backward

 private:
  at::Tensor run_checkpointed(int64_t layer, const at::Tensor& h_BSD, const LayerBody& body) const;

  const BaseWeights& weights_;
  int64_t num_layers_;
  ForwardContext& ctx_;
  bool checkpoint_;
  mutable std::vector<std::unique_ptr<Checkpoint>> checkpoints_;
};

}  // namespace mole::moe
