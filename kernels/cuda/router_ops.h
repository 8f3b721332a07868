// Tensor-facing fused CUDA router, built on the launchers of router_kernels.h: the twin of
// moe::route for top-k, top-p, DynMoLE and dense on CUDA float32 logits. moe/router.cpp routes
// such logits here when the kernels are built, so callers normally use moe::route and never this
// header. No CUDA header is included: moe/ sees only LibTorch types and RouterSelect.
//
// Legend: T tokens, E experts, N routed pairs.
#pragma once

#include <ATen/core/Tensor.h>

#include "kernels/router_select.h"

namespace mole::kernels {

// Whether mole_kernels was built with the CUDA router kernels (CMake MOLE_HAVE_CUDA_KERNELS).
// Always defined (in kernels/router_registration.cpp); route_cuda works only when it returns true
// (otherwise it throws).
bool cuda_router_kernels_built();

// True for logits the kernels handle: a CUDA float32 tensor [T, E] with 1 <= E <= 64. Others take
// the ATen path of moe::route.
bool cuda_router_supports(const at::Tensor& logits_TE);

struct FusedRouting {
  at::Tensor probs_TE;  // float32 softmax of the logits, differentiable
  at::Tensor token_N;   // int64, token-major
  at::Tensor expert_N;  // int64, per token in rank order (descending p, ties to the lower id)
  at::Tensor weight_N;  // float32, differentiable
  at::Tensor count_E;   // int64, pairs per expert
};

// The routing of moe::route for `select` (same pairs; probabilities and weights within float32
// rounding of it: exp, log and pow are CUDA's and sums over experts run in a tree order).
// Differentiable once w.r.t. logits_TE through probs_TE and weight_N, with a closed-form backward
// (router_reference.h). Deterministic. A non-contiguous input is copied first.
//
// Stream: the work is queued on the legacy default stream (stream 0, PyTorch's default stream),
// never on a non-default current stream set by the caller; see permute_ops.cpp.
// Sync points: none for top-k and dense (N = T*K, T*E). For top-p and DynMoLE the pair count N is
// copied from the device to the host once per call, to size the pair tensors.
FusedRouting route_cuda(const at::Tensor& logits_TE, const RouterSelect& select);

}  // namespace mole::kernels
