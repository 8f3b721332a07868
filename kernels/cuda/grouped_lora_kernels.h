// CUDA launchers of the grouped LoRA (the twin of kernels/grouped_lora.h): rows grouped by expert
// in contiguous segments, y[rows of e] = scale * (x_e A_e^T) B_e^T, forward (shrink, expand) and
// backward. Torch-free: raw pointers, sizes and a stream. Each launcher has a CPU reference with
// the same contract in kernels/grouped_lora_reference.h.
//
// Legend: N rows (grouped by expert), I in features, O out features, E experts, r LoRA rank.
//
// Common contract of every launcher:
// - Pointers are device pointers to contiguous row-major data; outputs do not alias inputs.
// - Row data (x, y, gy, gx) is of `row_type`; the LoRA weights A [E, r, I] and B [E, O, r] and their
//   gradients are of `weight_type`: float32 (fp32 master weights) or the row type itself. Supported
//   pairs (row, weight): (f32, f32), (f64, f64), (bf16, f32), (bf16, bf16).
// - "acc" is the accumulation type of the row type: float32 for float32 and bfloat16, float64 for
//   float64. Every product and sum runs in it; xa_Nr (kept from the forward for the backward) is
//   of acc; `scale` is rounded to acc. Row outputs are rounded once, when stored (bf16: to nearest
//   even); weight gradients likewise in the weight type.
// - offsets_E1: [E + 1] int64 on the device, the prefix sums of the per-expert row counts:
//   non-decreasing, offsets_E1[0] = 0, offsets_E1[E] = N; expert e owns rows
//   [offsets_E1[e], offsets_E1[e + 1]). Not checked here (the tensor wrapper built it).
// - Workspace: a device buffer of at least the bytes the matching ..._workspace_bytes query returns
//   for the same sizes (null when that is 0), 16-byte aligned, contents ignored; it holds the
//   split partial sums that are then reduced in a fixed order. Reused only after the launch is done
//   (stream order).
// - Asynchronous: the work is queued on `stream` and the call returns at once. The caller waits (a
//   later operation on the same stream, or cudaStreamSynchronize) before reading an output on the
//   host or freeing an input or the workspace.
// - Returns the launch error (cudaGetLastError after the launches), cudaErrorInvalidValue for
//   negative sizes, an unsupported type pair or a grid beyond CUDA's limits (I or O over two
//   million), and cudaSuccess without launching when there is nothing to write.
// - Deterministic: no atomics. Long reductions (over I or O in shrink and in gxa, over a segment's
//   rows in the weight gradients) are split over lanes, warps and blocks, and the partial sums are
//   added in an order fixed by the sizes alone, so repeated calls give identical bits. The order is
//   not the sequential one of the CPU reference, so results agree with it to rounding only.
// - Vectorised: rows are read and written 16 bytes at a time when the row pointers are 16-byte
//   aligned and the row length is a multiple of 16 bytes; otherwise element by element.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/permute_kernels.h"  // RowType

namespace mole::kernels::cuda {

// Workspace bytes of grouped_lora_shrink for these sizes (0 when it needs none).
size_t grouped_lora_shrink_workspace_bytes(RowType row_type, int64_t num_rows,
                                           int64_t in_features, int64_t rank);

// xa_Nr[n, :] = x_NI[n, :] · A_e^T for the expert e of row n; the sum over I in acc.
// x_NI: [N, I] of row_type; a_ErI: [E, r, I] of weight_type; xa_Nr: [N, r] of acc.
cudaError_t grouped_lora_shrink(RowType row_type, RowType weight_type, const void* x_NI,
                                const void* a_ErI, const int64_t* offsets_E1, void* xa_Nr,
                                void* workspace, int64_t num_rows, int64_t in_features,
                                int64_t rank, int64_t num_experts, cudaStream_t stream);

// y_NO[n, :] = scale * xa_Nr[n, :] · B_e^T, summed in acc in increasing rank index, then rounded
// to row_type. With r = 0 the output is zeros. Needs no workspace.
// xa_Nr: [N, r] of acc; b_EOr: [E, O, r] of weight_type; y_NO: [N, O] of row_type.
cudaError_t grouped_lora_expand(RowType row_type, RowType weight_type, const void* xa_Nr,
                                const void* b_EOr, const int64_t* offsets_E1, double scale,
                                void* y_NO, int64_t num_rows, int64_t out_features, int64_t rank,
                                int64_t num_experts, cudaStream_t stream);

// Workspace bytes of grouped_lora_backward for these sizes.
size_t grouped_lora_backward_workspace_bytes(RowType row_type, int64_t num_rows,
                                             int64_t in_features, int64_t out_features,
                                             int64_t rank, int64_t num_experts);

// The gradients of y = scale * (x A_e^T) B_e^T given gy_NO = dL/dy, with gxa = scale * gy · B_e
// ([N, r] of acc, kept in the workspace):
//   gx_NI[n, :]  = gxa[n, :] · A_e                    (row_type)
//   gb_EOr[e]    = scale * gy_e^T · xa_e              (weight_type; rows of e only)
//   ga_ErI[e]    = gxa_e^T · x_e                      (weight_type)
// Experts with no rows get zero weight gradients. gy_NO: [N, O] and x_NI: [N, I] of row_type;
// a_ErI, b_EOr, ga_ErI, gb_EOr of weight_type; xa_Nr: the forward's [N, r] of acc.
cudaError_t grouped_lora_backward(RowType row_type, RowType weight_type, const void* gy_NO,
                                  const void* x_NI, const void* a_ErI, const void* b_EOr,
                                  const void* xa_Nr, const int64_t* offsets_E1, double scale,
                                  void* gx_NI, void* ga_ErI, void* gb_EOr, void* workspace,
                                  int64_t num_rows, int64_t in_features, int64_t out_features,
                                  int64_t rank, int64_t num_experts, cudaStream_t stream);

}  // namespace mole::kernels::cuda
