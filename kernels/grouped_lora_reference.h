// Plain-loop CPU references of the CUDA grouped LoRA launchers (kernels/cuda/grouped_lora_kernels.h),
// with the same raw-pointer contract minus the types' enums, the workspace and the stream: the row
// type T and the weight type W are the pointer types (bfloat16 as its uint16 storage, converted as
// the GPU does: widened exactly, rounded to nearest even on store), "acc" is ReferenceAcc<T>
// (double for double rows, float otherwise), and the calls are synchronous. Supported (T, W):
// (float, float), (double, double), (uint16_t, float), (uint16_t, uint16_t). offsets_E1 must be
// valid prefix sums (not checked). Every sum runs in acc in increasing index order. Tests drive
// these with host pointers and compare them with the ATen path of kernels/grouped_lora.h and with
// the CUDA kernels.
//
// Legend: N rows (grouped by expert), I in features, O out features, E experts, r LoRA rank.
#pragma once

#include <cstdint>
#include <type_traits>

namespace mole::kernels::reference {

template <typename T>
using ReferenceAcc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// xa_Nr[n, :] = x_NI[n, :] · A_e^T. x_NI [N, I]; a_ErI [E, r, I]; xa_Nr [N, r] of acc.
template <typename T, typename W>
void grouped_lora_shrink(const T* x_NI, const W* a_ErI, const int64_t* offsets_E1,
                         ReferenceAcc<T>* xa_Nr, int64_t num_rows, int64_t in_features,
                         int64_t rank, int64_t num_experts);

// y_NO[n, :] = scale * xa_Nr[n, :] · B_e^T, rounded to T. b_EOr [E, O, r]; y_NO [N, O].
template <typename T, typename W>
void grouped_lora_expand(const ReferenceAcc<T>* xa_Nr, const W* b_EOr, const int64_t* offsets_E1,
                         double scale, T* y_NO, int64_t num_rows, int64_t out_features,
                         int64_t rank, int64_t num_experts);

// With gxa = scale * gy · B_e (acc): gx = gxa · A_e (T), gB_e = scale * gy_e^T · xa_e and
// gA_e = gxa_e^T · x_e (W); zero weight gradients for experts without rows.
template <typename T, typename W>
void grouped_lora_backward(const T* gy_NO, const T* x_NI, const W* a_ErI, const W* b_EOr,
                           const ReferenceAcc<T>* xa_Nr, const int64_t* offsets_E1, double scale,
                           T* gx_NI, W* ga_ErI, W* gb_EOr, int64_t num_rows, int64_t in_features,
                           int64_t out_features, int64_t rank, int64_t num_experts);

}  // namespace mole::kernels::reference
