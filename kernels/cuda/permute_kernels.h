// CUDA launchers of the token permutation (the twins of kernels/permute.h): gather rows by token,
// sum rows back per token with routing weights, and the per-row dot product behind the weight
// gradient. Torch-free: raw pointers, sizes and a stream. Each launcher has a CPU reference with
// the same contract in kernels/permute_reference.h.
//
// Legend: T tokens, D features, N routed pairs (= rows).
//
// Common contract of every launcher:
// - Pointers are device pointers to contiguous row-major data; outputs do not alias inputs.
// - Index arrays are int64 and in range; they are not checked here (make_permute_plan checked
//   them on the host).
// - "acc" is the accumulation type of the row type: float32 for float32 and bfloat16, float64 for
//   float64. Scales, weights and dot products are given and returned in it; sums run in it.
// - Asynchronous: the work is queued on `stream` and the call returns at once. The caller waits
//   (a later operation on the same stream, or cudaStreamSynchronize) before reading an output on
//   the host or freeing an input.
// - Returns the launch error (cudaGetLastError after the launch), cudaErrorInvalidValue for
//   negative sizes or an unknown row type, and cudaSuccess without launching when there is nothing
//   to write (N = 0, T = 0, or D = 0 for the row outputs).
// - Deterministic: no atomics; each output element is summed by one thread in a fixed order.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mole::kernels::cuda {

// Element type of the row data. bfloat16 is passed as its uint16 storage.
enum class RowType : int {
  kFloat32 = 0,
  kFloat64 = 1,
  kBFloat16 = 2,
};

// out_ND[i, :] = scale_N ? scale_N[i] * x_TD[token_N[i], :] : x_TD[token_N[i], :].
// x_TD: [T, D] of `type` (T is implied by the token ids); token_N: [N] int64 in [0, T);
// scale_N: [N] of acc or null (then rows are copied bit for bit); out_ND: [N, D] of `type`.
cudaError_t gather_rows(RowType type, const void* x_TD, const int64_t* token_N, const void* scale_N,
                        void* out_ND, int64_t num_rows, int64_t dim, cudaStream_t stream);

// y_TD[t, :] = sum over j in [offsets_T1[t], offsets_T1[t + 1]) of
//              weight_N[p] * rows_ND[row_of_pair_N[p], :],   p = pairs_by_token_N[j],
// summed in acc in increasing j. Tokens with an empty range get zeros.
// rows_ND: [N, D] of `type`; row_of_pair_N: [N] int64, the row of each routing pair (the plan's
// inverse_N); pairs_by_token_N: [N] int64, routing pairs grouped by token; offsets_T1: [T + 1]
// int64, non-decreasing, offsets_T1[0] = 0; weight_N: [N] of acc in routing-pair order, or null for
// weights of 1; y_TD: [T, D] of `type`.
cudaError_t combine_rows(RowType type, const void* rows_ND, const int64_t* row_of_pair_N,
                         const int64_t* pairs_by_token_N, const int64_t* offsets_T1,
                         const void* weight_N, void* y_TD, int64_t num_tokens, int64_t dim,
                         cudaStream_t stream);

// out_N[i] = sum over d of rows_ND[i, d] * g_TD[token_N[i], d], summed in acc (a fixed tree order
// per row, so not bit-equal to the sequential CPU reference). With D = 0 the output is zeros.
// rows_ND: [N, D] and g_TD: [T, D] of `type`; token_N: [N] int64 in [0, T); out_N: [N] of acc.
cudaError_t row_dot(RowType type, const void* rows_ND, const void* g_TD, const int64_t* token_N,
                    void* out_N, int64_t num_rows, int64_t dim, cudaStream_t stream);

}  // namespace mole::kernels::cuda
