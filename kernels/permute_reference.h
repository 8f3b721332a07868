// Plain-loop CPU references of the CUDA permutation launchers (kernels/cuda/permute_kernels.h),
// with the same raw-pointer contract minus the stream: the row type is the pointer type, "acc" is
// the same type (float32 rows: float32 scales, weights and sums; float64 rows: float64), and the
// calls are synchronous. Index arrays must be in range (not checked). Tests drive these with host
// pointers and compare them with the ATen paths of kernels/permute.h and with the CUDA kernels.
//
// Legend: T tokens, D features, N routed pairs (= rows).
#pragma once

#include <cstdint>

namespace mole::kernels::reference {

// out_ND[i, :] = scale_N ? scale_N[i] * x_TD[token_N[i], :] : x_TD[token_N[i], :].
void gather_rows(const float* x_TD, const int64_t* token_N, const float* scale_N, float* out_ND,
                 int64_t num_rows, int64_t dim);
void gather_rows(const double* x_TD, const int64_t* token_N, const double* scale_N, double* out_ND,
                 int64_t num_rows, int64_t dim);

// y_TD[t, :] = sum over j in [offsets_T1[t], offsets_T1[t + 1]) of
//              weight_N[p] * rows_ND[row_of_pair_N[p], :],   p = pairs_by_token_N[j],
// summed in increasing j; weight_N null means weights of 1; empty ranges give zeros.
void combine_rows(const float* rows_ND, const int64_t* row_of_pair_N,
                  const int64_t* pairs_by_token_N, const int64_t* offsets_T1, const float* weight_N,
                  float* y_TD, int64_t num_tokens, int64_t dim);
void combine_rows(const double* rows_ND, const int64_t* row_of_pair_N,
                  const int64_t* pairs_by_token_N, const int64_t* offsets_T1,
                  const double* weight_N, double* y_TD, int64_t num_tokens, int64_t dim);

// out_N[i] = sum over d of rows_ND[i, d] * g_TD[token_N[i], d], summed in increasing d.
void row_dot(const float* rows_ND, const float* g_TD, const int64_t* token_N, float* out_N,
             int64_t num_rows, int64_t dim);
void row_dot(const double* rows_ND, const double* g_TD, const int64_t* token_N, double* out_N,
             int64_t num_rows, int64_t dim);

}  // namespace mole::kernels::reference
