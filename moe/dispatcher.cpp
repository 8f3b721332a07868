// Dispatch modes and the weighted combine shared by every Dispatcher (see dispatcher.h).
#include "moe/dispatcher.h"

#include <ATen/ATen.h>

namespace mole::moe {

const char* dispatch_mode_name(DispatchMode mode) {
  switch (mode) {
    case DispatchMode::kLocal: return "local";
    case DispatchMode::kTokens: return "tokens";
    case DispatchMode::kWeights: return "weights";
  }
  return "?";
}

at::Tensor Dispatcher::combine(const at::Tensor& rows_RO, const DispatchHandle& handle,
                               const at::Tensor& weight_N) const {
  return kernels::unpermute_combine(return_rows(rows_RO, handle), handle.plan, weight_N);
}

}  // namespace mole::moe
