// The local, whole-tensor BaseWeights (see base_weights.h).
#include "moe/base_weights.h"

#include <ATen/ATen.h>

#include "kernels/check.h"

namespace mole::moe {

at::Tensor LocalBaseWeights::declare(const std::string& name, int64_t, const std::vector<int64_t>& shape,
                                     const at::TensorOptions& options) {
  MOLE_CHECK(!tensors_.count(name), "frozen tensor '", name, "' declared twice");
  at::Tensor t = at::empty(shape, options);
  tensors_.emplace(name, t);
  order_.push_back(name);
  return t;
}

void LocalBaseWeights::assign(const std::string& name, const at::Tensor& value) {
  auto it = tensors_.find(name);
  MOLE_CHECK(it != tensors_.end(), "the model has no frozen tensor '", name, "'");
  MOLE_CHECK(value.sizes() == it->second.sizes(), "frozen tensor '", name, "': got shape ",
             value.sizes(), ", the model expects ", it->second.sizes());
  at::NoGradGuard no_grad;
  it->second.copy_(value);
}

at::Tensor LocalBaseWeights::kept_part(const std::string& name, const at::Tensor& value) const {
  MOLE_CHECK(tensors_.count(name), "the model has no frozen tensor '", name, "'");
  return value.reshape({-1});
}

std::pair<int64_t, int64_t> LocalBaseWeights::kept_range(const std::string& name) const {
  auto it = tensors_.find(name);
  MOLE_CHECK(it != tensors_.end(), "the model has no frozen tensor '", name, "'");
  return {0, it->second.numel()};
}

void LocalBaseWeights::assign_kept(const std::string& name, const at::Tensor& part) {
  auto it = tensors_.find(name);
  MOLE_CHECK(it != tensors_.end(), "the model has no frozen tensor '", name, "'");
  MOLE_CHECK(part.dim() == 1 && part.numel() == it->second.numel(), "frozen tensor '", name, "': got ",
             part.sizes(), " elements, it has ", it->second.numel());
  at::NoGradGuard no_grad;
  it->second.view({-1}).copy_(part);
}

int64_t LocalBaseWeights::held_bytes() const {
  int64_t bytes = 0;
  for (const auto& [name, t] : tensors_) bytes += t.numel() * static_cast<int64_t>(t.element_size());
  return bytes;
}

void LocalBaseWeights::for_each_kept(
    const std::function<void(const std::string&, const at::Tensor&)>& fn) const {
  for (const std::string& name : order_) fn(name, tensors_.at(name).reshape({-1}));
}

}  // namespace mole::moe
