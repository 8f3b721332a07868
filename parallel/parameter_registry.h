// The parameter registry: one list of the run's trainable tensors as the parallel layer sees them
// (DESIGN.md §4). Built once, after the model is sharded, from the roles the model reports
// (moe::TrainableTensor); the gradient reduction, the optimizer, the gradient norm, export and
// checkpoints all read it, so nothing re-derives which group a tensor belongs to.
//
// Replica groups: a tensor every rank holds whole (plain LoRA, routers, experts of a replicated
// site) is replicated over the world; an expert stack that holds only this rank's experts of a
// split site is replicated over the expert-data-parallel (EDP) group, and the EP group holds each
// of its experts exactly once.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "moe/llama.h"

namespace mole::dist {
class Communicator;
}

namespace mole::parallel {

enum class ReplicaGroup { kWorld, kExpertData };

// Per-tensor optimizer settings derived from the config.
struct OptimizerHints {
  double lora_plus_ratio = 1.0;  // lr multiplier of LoRA B matrices (plain and expert)
  double weight_decay = 0.0;
};

struct ParamSlot {
  std::string name;                   // global name, as in CausalLM::trainable_parameters()
  std::vector<int64_t> global_shape;  // of the whole tensor (all experts of a site)
  at::Tensor tensor;                  // this rank's part: a trainable leaf
  int64_t first_row = 0;              // global dim-0 index of the part's first row
  moe::TensorRole role = moe::TensorRole::kLoraA;
  double lr_scale = 1.0;
  double weight_decay = 0.0;

  // True when this rank holds only part of the tensor (rows of an expert stack).
  bool sharded() const { return tensor.size(0) != global_shape.front(); }
  // The ranks that hold the same part: the EDP group for a shard, else the world.
  ReplicaGroup group() const { return sharded() ? ReplicaGroup::kExpertData : ReplicaGroup::kWorld; }
};

class ParameterRegistry {
 public:
  ParameterRegistry(const moe::CausalLM& model, const OptimizerHints& hints);
  // Given slots (benchmarks of the optimizer without a model).
  explicit ParameterRegistry(std::vector<ParamSlot> slots) : slots_(std::move(slots)) {}

  const std::vector<ParamSlot>& slots() const { return slots_; }
  // The tensors of one replica group, in registry order.
  std::vector<at::Tensor> tensors(ReplicaGroup group) const;
  std::vector<at::Tensor> tensors() const;
  int64_t local_numel() const;   // elements this rank holds
  int64_t global_numel() const;  // elements of the whole adapter

 private:
  std::vector<ParamSlot> slots_;
};

// Every slot's whole tensor (detached copies, global names and shapes) for export: sharded slots
// are all-gathered over `ep`, the EP group (every expert is held once there). Collective over
// `ep` when the registry has shards: every rank of the group calls it at the same point. `ep` may
// be null when there are none. The live model is not touched.
std::vector<moe::NamedTensor> gather_trainable(const ParameterRegistry& registry,
                                               dist::Communicator* ep);

}  // namespace mole::parallel
