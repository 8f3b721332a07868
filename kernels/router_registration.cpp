// Registration of the fused CUDA router (kernels/cuda/router_ops.h). Always compiled into
// mole_kernels, which alone sees MOLE_HAVE_CUDA_KERNELS, so that moe/router.cpp can ask whether
// the kernels are built and link route_cuda either way: without them it is this stub, which
// throws (moe::route never calls it then). cuda_router_supports, which needs no CUDA, lives here
// too.
#include "kernels/check.h"
#include "kernels/cuda/router_ops.h"

namespace mole::kernels {

#ifdef MOLE_HAVE_CUDA_KERNELS
bool cuda_router_kernels_built() { return true; }
#else
bool cuda_router_kernels_built() { return false; }

FusedRouting route_cuda(const at::Tensor& /*logits_TE*/, const RouterSelect& /*select*/) {
  MOLE_FAIL("route_cuda: mole was built without the CUDA kernels (MOLE_HAVE_CUDA_KERNELS off)");
}
#endif

bool cuda_router_supports(const at::Tensor& logits_TE) {
  return logits_TE.defined() && logits_TE.is_cuda() && logits_TE.scalar_type() == at::kFloat &&
         logits_TE.dim() == 2 && logits_TE.size(1) >= 1 && logits_TE.size(1) <= kMaxRouterExperts;
}

}  // namespace mole::kernels
