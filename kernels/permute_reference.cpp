// Plain-loop CPU references of the CUDA permutation launchers (see permute_reference.h).
//
// Legend: T tokens, D features, N routed pairs (= rows).
#include "kernels/permute_reference.h"

namespace mole::kernels::reference {
namespace {

template <typename T>
void gather_rows_impl(const T* x_TD, const int64_t* token_N, const T* scale_N, T* out_ND,
                      int64_t num_rows, int64_t dim) {
  for (int64_t i = 0; i < num_rows; ++i) {
    const T* src_D = x_TD + token_N[i] * dim;
    T* dst_D = out_ND + i * dim;
    if (scale_N == nullptr) {
      for (int64_t d = 0; d < dim; ++d) dst_D[d] = src_D[d];
    } else {
      for (int64_t d = 0; d < dim; ++d) dst_D[d] = scale_N[i] * src_D[d];
    }
  }
}

template <typename T>
void combine_rows_impl(const T* rows_ND, const int64_t* row_of_pair_N,
                       const int64_t* pairs_by_token_N, const int64_t* offsets_T1,
                       const T* weight_N, T* y_TD, int64_t num_tokens, int64_t dim) {
  for (int64_t t = 0; t < num_tokens; ++t) {
    T* y_D = y_TD + t * dim;
    for (int64_t d = 0; d < dim; ++d) y_D[d] = T(0);
    for (int64_t j = offsets_T1[t]; j < offsets_T1[t + 1]; ++j) {
      const int64_t pair = pairs_by_token_N[j];
      const T* row_D = rows_ND + row_of_pair_N[pair] * dim;
      for (int64_t d = 0; d < dim; ++d) {
        y_D[d] += weight_N == nullptr ? row_D[d] : weight_N[pair] * row_D[d];
      }
    }
  }
}

template <typename T>
void row_dot_impl(const T* rows_ND, const T* g_TD, const int64_t* token_N, T* out_N,
                  int64_t num_rows, int64_t dim) {
  for (int64_t i = 0; i < num_rows; ++i) {
    const T* row_D = rows_ND + i * dim;
    const T* g_D = g_TD + token_N[i] * dim;
    T acc = 0;
    for (int64_t d = 0; d < dim; ++d) acc += row_D[d] * g_D[d];
    out_N[i] = acc;
  }
}

}  // namespace

void gather_rows(const float* x_TD, const int64_t* token_N, const float* scale_N, float* out_ND,
                 int64_t num_rows, int64_t dim) {
  gather_rows_impl(x_TD, token_N, scale_N, out_ND, num_rows, dim);
}
void gather_rows(const double* x_TD, const int64_t* token_N, const double* scale_N, double* out_ND,
                 int64_t num_rows, int64_t dim) {
  gather_rows_impl(x_TD, token_N, scale_N, out_ND, num_rows, dim);
}

void combine_rows(const float* rows_ND, const int64_t* row_of_pair_N,
                  const int64_t* pairs_by_token_N, const int64_t* offsets_T1, const float* weight_N,
                  float* y_TD, int64_t num_tokens, int64_t dim) {
  combine_rows_impl(rows_ND, row_of_pair_N, pairs_by_token_N, offsets_T1, weight_N, y_TD,
                    num_tokens, dim);
}
void combine_rows(const double* rows_ND, const int64_t* row_of_pair_N,
                  const int64_t* pairs_by_token_N, const int64_t* offsets_T1,
                  const double* weight_N, double* y_TD, int64_t num_tokens, int64_t dim) {
  combine_rows_impl(rows_ND, row_of_pair_N, pairs_by_token_N, offsets_T1, weight_N, y_TD,
                    num_tokens, dim);
}

void row_dot(const float* rows_ND, const float* g_TD, const int64_t* token_N, float* out_N,
             int64_t num_rows, int64_t dim) {
  row_dot_impl(rows_ND, g_TD, token_N, out_N, num_rows, dim);
}
void row_dot(const double* rows_ND, const double* g_TD, const int64_t* token_N, double* out_N,
             int64_t num_rows, int64_t dim) {
  row_dot_impl(rows_ND, g_TD, token_N, out_N, num_rows, dim);
}

}  // namespace mole::kernels::reference
