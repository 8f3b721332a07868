// CUDA launchers of the fused router (the twins of moe::route for top-k, top-p, DynMoLE and dense;
// rules in kernels/router_select.h): one kernel per token group computes the softmax, ranks the
// experts and selects them; a scan and a compaction turn variable per-token selections into
// token-major pairs; one kernel computes the logits' gradient in closed form. Torch-free: raw
// pointers, sizes and a stream. Each launcher has a CPU reference with the same contract in
// kernels/router_reference.h (where the contract of each output is spelled out).
//
// Switch routing (top-1 with a per-expert capacity filled in token order) stays on the ATen path of
// moe::route: its keep decision depends on every earlier token, not on the token alone.
//
// Legend: T tokens, E experts, K top-k, C columns (K for top-k, else E), N routed pairs.
//
// Common contract of every launcher:
// - Pointers are device pointers to contiguous row-major data; outputs do not alias inputs.
// - float32 throughout; ids, counts and offsets are int64. Index arrays are in range (not checked).
// - 1 <= E <= kMaxRouterExperts; `select` must pass router_select_error.
// - Asynchronous: the work is queued on `stream` and the call returns at once. The caller waits
//   (a later operation on the same stream, or cudaStreamSynchronize) before reading an output on
//   the host or freeing an input.
// - Returns the launch error (cudaGetLastError after the launch), cudaErrorInvalidValue for a
//   negative size, E out of range or an invalid `select`, and cudaSuccess without launching a
//   kernel when there is nothing to compute (T = 0).
// - Deterministic: sums over experts run in a fixed tree order per token; the per-expert counts
//   are integer atomics (exact in any order); no float atomics.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/router_select.h"

namespace mole::kernels::cuda {

// reference::route_forward on the device: probs_TE [T, E]; expert_TC, weight_TC, token_TC (null to
// skip) [T, C]; count_T [T]; count_E [E] (zeroed on `stream`, then counted with atomics).
cudaError_t route_forward(const float* logits_TE, const RouterSelect& select, float* probs_TE,
                          int64_t* expert_TC, float* weight_TC, int64_t* token_TC, int64_t* count_T,
                          int64_t* count_E, int64_t num_tokens, int64_t num_experts,
                          cudaStream_t stream);

// reference::routing_offsets on the device: offsets_T1 [T + 1] from count_T [T], by one block.
// offsets_T1[0] = 0 is written even for T = 0. The host reads N = offsets_T1[T] to size the pairs
// (a device-to-host copy, the caller's sync point).
cudaError_t routing_offsets(const int64_t* count_T, int64_t num_tokens, int64_t* offsets_T1,
                            cudaStream_t stream);

// reference::compact_routing on the device: token_N, expert_N, weight_N [N] from the per-token
// selection [T, C] and offsets_T1 [T + 1].
cudaError_t compact_routing(const int64_t* expert_TC, const float* weight_TC,
                            const int64_t* offsets_T1, int64_t num_tokens, int64_t num_columns,
                            int64_t* token_N, int64_t* expert_N, float* weight_N,
                            cudaStream_t stream);

// reference::route_backward on the device: grad_logits_TE [T, E] from probs_TE and grad_probs_TE
// [T, E] and the pairs' expert_N, weight_N (top-k only) and grad_weight_N [N]; offsets_T1
// [T + 1] for top-p and DynMoLE, unused for top-k and dense.
cudaError_t route_backward(const RouterSelect& select, const float* probs_TE,
                           const float* grad_probs_TE, const int64_t* expert_N,
                           const float* weight_N, const float* grad_weight_N,
                           const int64_t* offsets_T1, float* grad_logits_TE, int64_t num_tokens,
                           int64_t num_experts, cudaStream_t stream);

}  // namespace mole::kernels::cuda
