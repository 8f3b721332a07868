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

}  // namespace mole::moe
