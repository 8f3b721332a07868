// CUDA kernels and launchers of the token permutation (contract in permute_kernels.h). One block
// per row (gather, row_dot) or per token (combine), grid-striding when there are more rows than
// blocks; threads stride over the D features, so consecutive threads touch consecutive elements.
//
// Legend: T tokens, D features, N routed pairs (= rows).
#include "kernels/cuda/permute_kernels.h"

#include <cstdint>

#include "kernels/cuda/elem.cuh"

namespace mole::kernels::cuda {
namespace {

constexpr int kMaxThreads = 256;       // a power of two: row_dot reduces by halving
constexpr int64_t kMaxBlocks = 65535;  // grid-stride beyond this many rows or tokens

// Threads per block: D rounded up to a warp, at most kMaxThreads, always a power of two.
int threads_for(int64_t dim) {
  int threads = 32;
  while (threads < kMaxThreads && threads < dim) threads *= 2;
  return threads;
}

unsigned int blocks_for(int64_t items) {
  return static_cast<unsigned int>(items < kMaxBlocks ? items : kMaxBlocks);
}

template <typename T>
__global__ void gather_rows_kernel(const T* __restrict__ x_TD, const int64_t* __restrict__ token_N,
                                   const typename Elem<T>::Acc* __restrict__ scale_N,
                                   T* __restrict__ out_ND, int64_t num_rows, int64_t dim) {
  for (int64_t i = blockIdx.x; i < num_rows; i += gridDim.x) {
    const T* src_D = x_TD + token_N[i] * dim;
    T* dst_D = out_ND + i * dim;
    if (scale_N == nullptr) {
      for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) dst_D[d] = src_D[d];
    } else {
      const typename Elem<T>::Acc scale = scale_N[i];
      for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
        dst_D[d] = Elem<T>::store(scale * Elem<T>::load(src_D[d]));
      }
    }
  }
}

template <typename T>
__global__ void combine_rows_kernel(const T* __restrict__ rows_ND,
                                    const int64_t* __restrict__ row_of_pair_N,
                                    const int64_t* __restrict__ pairs_by_token_N,
                                    const int64_t* __restrict__ offsets_T1,
                                    const typename Elem<T>::Acc* __restrict__ weight_N,
                                    T* __restrict__ y_TD, int64_t num_tokens, int64_t dim) {
  using Acc = typename Elem<T>::Acc;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    const int64_t begin = offsets_T1[t], end = offsets_T1[t + 1];
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      Acc acc = 0;
      for (int64_t j = begin; j < end; ++j) {
        const int64_t pair = pairs_by_token_N[j];
        const Acc value = Elem<T>::load(rows_ND[row_of_pair_N[pair] * dim + d]);
        acc += weight_N == nullptr ? value : weight_N[pair] * value;
      }
      y_TD[t * dim + d] = Elem<T>::store(acc);
    }
  }
}

template <typename T>
__global__ void row_dot_kernel(const T* __restrict__ rows_ND, const T* __restrict__ g_TD,
                               const int64_t* __restrict__ token_N,
                               typename Elem<T>::Acc* __restrict__ out_N, int64_t num_rows,
                               int64_t dim) {
  using Acc = typename Elem<T>::Acc;
  __shared__ Acc partial[kMaxThreads];
  for (int64_t i = blockIdx.x; i < num_rows; i += gridDim.x) {
    const T* row_D = rows_ND + i * dim;
    const T* g_D = g_TD + token_N[i] * dim;
    Acc acc = 0;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      acc += Elem<T>::load(row_D[d]) * Elem<T>::load(g_D[d]);
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) out_N[i] = partial[0];
    __syncthreads();  // the next row reuses `partial`
  }
}

template <typename T>
cudaError_t launch_gather(const void* x_TD, const int64_t* token_N, const void* scale_N,
                          void* out_ND, int64_t num_rows, int64_t dim, cudaStream_t stream) {
  using Acc = typename Elem<T>::Acc;
  gather_rows_kernel<T><<<blocks_for(num_rows), threads_for(dim), 0, stream>>>(
      static_cast<const T*>(x_TD), token_N, static_cast<const Acc*>(scale_N),
      static_cast<T*>(out_ND), num_rows, dim);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_combine(const void* rows_ND, const int64_t* row_of_pair_N,
                           const int64_t* pairs_by_token_N, const int64_t* offsets_T1,
                           const void* weight_N, void* y_TD, int64_t num_tokens, int64_t dim,
                           cudaStream_t stream) {
  using Acc = typename Elem<T>::Acc;
  combine_rows_kernel<T><<<blocks_for(num_tokens), threads_for(dim), 0, stream>>>(
      static_cast<const T*>(rows_ND), row_of_pair_N, pairs_by_token_N, offsets_T1,
      static_cast<const Acc*>(weight_N), static_cast<T*>(y_TD), num_tokens, dim);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_row_dot(const void* rows_ND, const void* g_TD, const int64_t* token_N,
                           void* out_N, int64_t num_rows, int64_t dim, cudaStream_t stream) {
  using Acc = typename Elem<T>::Acc;
  row_dot_kernel<T><<<blocks_for(num_rows), threads_for(dim), 0, stream>>>(
      static_cast<const T*>(rows_ND), static_cast<const T*>(g_TD), token_N,
      static_cast<Acc*>(out_N), num_rows, dim);
  return cudaGetLastError();
}

}  // namespace

cudaError_t gather_rows(RowType type, const void* x_TD, const int64_t* token_N, const void* scale_N,
                        void* out_ND, int64_t num_rows, int64_t dim, cudaStream_t stream) {
  if (num_rows < 0 || dim < 0) return cudaErrorInvalidValue;
  if (num_rows == 0 || dim == 0) return cudaSuccess;
  switch (type) {
    case RowType::kFloat32:
      return launch_gather<float>(x_TD, token_N, scale_N, out_ND, num_rows, dim, stream);
    case RowType::kFloat64:
      return launch_gather<double>(x_TD, token_N, scale_N, out_ND, num_rows, dim, stream);
    case RowType::kBFloat16:
      return launch_gather<uint16_t>(x_TD, token_N, scale_N, out_ND, num_rows, dim, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t combine_rows(RowType type, const void* rows_ND, const int64_t* row_of_pair_N,
                         const int64_t* pairs_by_token_N, const int64_t* offsets_T1,
                         const void* weight_N, void* y_TD, int64_t num_tokens, int64_t dim,
                         cudaStream_t stream) {
  if (num_tokens < 0 || dim < 0) return cudaErrorInvalidValue;
  if (num_tokens == 0 || dim == 0) return cudaSuccess;
  switch (type) {
    case RowType::kFloat32:
      return launch_combine<float>(rows_ND, row_of_pair_N, pairs_by_token_N, offsets_T1, weight_N,
                                   y_TD, num_tokens, dim, stream);
    case RowType::kFloat64:
      return launch_combine<double>(rows_ND, row_of_pair_N, pairs_by_token_N, offsets_T1, weight_N,
                                    y_TD, num_tokens, dim, stream);
    case RowType::kBFloat16:
      return launch_combine<uint16_t>(rows_ND, row_of_pair_N, pairs_by_token_N, offsets_T1,
                                      weight_N, y_TD, num_tokens, dim, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t row_dot(RowType type, const void* rows_ND, const void* g_TD, const int64_t* token_N,
                    void* out_N, int64_t num_rows, int64_t dim, cudaStream_t stream) {
  if (num_rows < 0 || dim < 0) return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  switch (type) {
    case RowType::kFloat32:
      return launch_row_dot<float>(rows_ND, g_TD, token_N, out_N, num_rows, dim, stream);
    case RowType::kFloat64:
      return launch_row_dot<double>(rows_ND, g_TD, token_N, out_N, num_rows, dim, stream);
    case RowType::kBFloat16:
      return launch_row_dot<uint16_t>(rows_ND, g_TD, token_N, out_N, num_rows, dim, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mole::kernels::cuda
