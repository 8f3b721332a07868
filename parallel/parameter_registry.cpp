// The parameter registry (see parameter_registry.h).
#include "parallel/parameter_registry.h"

#include <ATen/ATen.h>

#include "dist/communicator.h"
#include "kernels/check.h"
#include "parallel/exchange.h"
#include "parallel/expert_dispatcher.h"

namespace mole::parallel {

ParameterRegistry::ParameterRegistry(const moe::CausalLM& model, const OptimizerHints& hints) {
  for (const moe::TrainableTensor& t : model.trainable_tensors()) {
    ParamSlot slot;
    slot.name = t.name;
    slot.tensor = t.tensor;
    slot.role = t.role;
    slot.global_shape = t.tensor.sizes().vec();
    if (moe::is_expert_stack(t.role)) {
      MOLE_CHECK(t.first_expert >= 0 && t.first_expert + t.tensor.size(0) <= t.num_experts, t.name,
                 ": holds experts [", t.first_expert, ", ", t.first_expert + t.tensor.size(0),
                 ") of ", t.num_experts);
      slot.global_shape.front() = t.num_experts;
      slot.first_row = t.first_expert;
    }
    slot.lr_scale = moe::is_lora_b(t.role) ? hints.lora_plus_ratio : 1.0;
    slot.weight_decay = hints.weight_decay;
    slots_.push_back(std::move(slot));
  }
}

std::vector<at::Tensor> ParameterRegistry::tensors(ReplicaGroup group) const {
  std::vector<at::Tensor> out;
  for (const ParamSlot& s : slots_) {
    if (s.group() == group) out.push_back(s.tensor);
  }
  return out;
}

std::vector<at::Tensor> ParameterRegistry::tensors() const {
  std::vector<at::Tensor> out;
  for (const ParamSlot& s : slots_) out.push_back(s.tensor);
  return out;
}

int64_t ParameterRegistry::local_numel() const {
  int64_t n = 0;
  for (const ParamSlot& s : slots_) n += s.tensor.numel();
  return n;
}

int64_t ParameterRegistry::global_numel() const {
  int64_t n = 0;
  for (const ParamSlot& s : slots_) {
    int64_t numel = 1;
    for (int64_t d : s.global_shape) numel *= d;
    n += numel;
  }
  return n;
}

std::vector<moe::NamedTensor> gather_trainable(const ParameterRegistry& registry,
                                               dist::Communicator* ep) {
  at::NoGradGuard no_grad;
  std::vector<moe::NamedTensor> out;
  for (const ParamSlot& s : registry.slots()) {
    if (!s.sharded()) {
      out.emplace_back(s.name, s.tensor.detach().clone());
      continue;
    }
    MOLE_CHECK(ep != nullptr, "gather_trainable: '", s.name, "' is sharded but no EP group was given");
    const int64_t rows = s.tensor.size(0);
    const moe::ExpertShard placed = place_experts(s.global_shape.front(), ep->size(), ep->rank());
    MOLE_CHECK(s.first_row == placed.first && rows == placed.count, "gather_trainable: '", s.name,
               "' holds rows [", s.first_row, ", ", s.first_row + rows, ") of ",
               s.global_shape.front(), " but EP rank ", ep->rank(), " of ", ep->size(), " places [",
               placed.first, ", ", placed.first + placed.count, ") there");
    // Rank p holds experts [p e, (p + 1) e) (place_experts): the gathered flat tensors, in rank
    // order, are the whole tensor.
    at::Tensor all = all_gather_flat(*ep, s.tensor.detach().contiguous().reshape({-1}));
    out.emplace_back(s.name, all.reshape(s.global_shape).to(s.tensor.device()).clone());
  }
  return out;
}

}  // namespace mole::parallel
