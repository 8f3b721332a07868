// Host launchers of the grouped LoRA (contract in grouped_lora_kernels.h): type dispatch, the
// split and workspace arithmetic, and the launch of the kernels in grouped_lora_device.cuh
// (which describes them).
#include "kernels/cuda/grouped_lora_kernels.h"

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "kernels/cuda/grouped_lora_device.cuh"

namespace mole::kernels::cuda {
namespace {

using namespace grouped_lora_device;  // NOLINT: the kernels and their tile constants


template <typename T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<T>{}, Tag<W>{}) for a supported (row, weight) type pair.
template <typename Fn>
cudaError_t dispatch(RowType row_type, RowType weight_type, Fn&& fn) {
  switch (row_type) {
    case RowType::kFloat32:
      if (weight_type == RowType::kFloat32) return fn(Tag<float>{}, Tag<float>{});
      break;
    case RowType::kFloat64:
      if (weight_type == RowType::kFloat64) return fn(Tag<double>{}, Tag<double>{});
      break;
    case RowType::kBFloat16:
      if (weight_type == RowType::kFloat32) return fn(Tag<uint16_t>{}, Tag<float>{});
      if (weight_type == RowType::kBFloat16) return fn(Tag<uint16_t>{}, Tag<uint16_t>{});
      break;
  }
  return cudaErrorInvalidValue;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

size_t align_up(size_t bytes) { return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

unsigned int grid_stride_blocks(int64_t count, int threads) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(ceil_div(count, threads), kMaxBlocks)));
}

// Rows of type T can be read VEC = kVec<T> at a time: 16-byte aligned rows of a multiple of VEC.
template <typename T>
bool vectorizable(const void* rows, int64_t dim) {
  return reinterpret_cast<uintptr_t>(rows) % 16 == 0 && dim % kVec<T> == 0;
}

size_t acc_size(RowType row_type) { return row_type == RowType::kFloat64 ? 8 : 4; }

// How rowdot splits K over blocks: `splits` blocks of `span` columns (a multiple of kSplitUnit, so
// of every kernel's chunk), chosen from the sizes alone so that the summation order is too.
struct DotSplit {
  int64_t splits = 1;
  int64_t span = kSplitUnit;
};

DotSplit dot_split(RowType row_type, int64_t num_rows, int64_t dim, int64_t rank) {
  const bool f64 = row_type == RowType::kFloat64;
  const int64_t rows_per_block = kDotWarps * (f64 ? Tiles<double>::kDotRows : Tiles<float>::kDotRows);
  const int64_t ranks_per_block = f64 ? Tiles<double>::kDotRanks : Tiles<float>::kDotRanks;
  const int64_t blocks = ceil_div(num_rows, rows_per_block) * ceil_div(rank, ranks_per_block);
  const int64_t units = ceil_div(dim, kSplitUnit);
  if (blocks == 0 || units == 0) return {};
  const int64_t wanted = ceil_div(kTargetBlocks, blocks);
  const int64_t per_split = std::max(ceil_div(units, wanted), kMinUnitsPerSplit);
  return {ceil_div(units, per_split), per_split * kSplitUnit};
}

size_t dot_workspace_bytes(RowType row_type, int64_t num_rows, int64_t dim, int64_t rank) {
  const DotSplit split = dot_split(row_type, num_rows, dim, rank);
  if (split.splits == 1) return 0;
  return align_up(static_cast<size_t>(split.splits * num_rows * rank) * acc_size(row_type));
}

// Upper bound on the weight_grad slots: sum over e of ceil(rows of e / chunk) <= N / chunk + E.
int64_t grad_slots(int64_t num_rows, int64_t num_experts) {
  return ceil_div(num_rows, kGradChunkRows) + num_experts;
}

size_t grad_workspace_bytes(RowType row_type, int64_t num_rows, int64_t dim, int64_t rank,
                            int64_t num_experts) {
  return align_up(static_cast<size_t>(grad_slots(num_rows, num_experts) * dim * rank) *
                  acc_size(row_type));
}

// out_Nr = scale * rows · W_e^T over K (see rowdot_kernel); N > 0, r > 0.
template <typename T, typename W, bool kRankMajor>
cudaError_t launch_rowdot(const void* rows_NK, const void* w, const int64_t* offsets_E1,
                          void* out_Nr, void* workspace, int64_t num_rows, int64_t dim,
                          int64_t rank, int64_t num_experts, double scale, cudaStream_t stream) {
  using Acc = typename Elem<T>::Acc;
  constexpr int TM = Tiles<Acc>::kDotRows, JT = Tiles<Acc>::kDotRanks;
  const RowType row_type = sizeof(Acc) == 8 ? RowType::kFloat64 : RowType::kFloat32;
  const DotSplit split = dot_split(row_type, num_rows, dim, rank);
  const int64_t blocks = ceil_div(num_rows, kDotWarps * TM) * ceil_div(rank, JT);
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(blocks), static_cast<unsigned int>(split.splits));
  Acc* target = static_cast<Acc*>(split.splits > 1 ? workspace : out_Nr);
  const Acc target_scale = split.splits > 1 ? Acc(1) : static_cast<Acc>(scale);
  const auto* rows = static_cast<const T*>(rows_NK);
  const auto* weights = static_cast<const W*>(w);
  if (vectorizable<T>(rows_NK, dim)) {
    rowdot_kernel<T, W, kRankMajor, kVec<T>><<<grid, kDotWarps * kWarp, 0, stream>>>(
        rows, weights, offsets_E1, target, num_rows, dim, rank, num_experts, split.span,
        target_scale);
  } else {
    rowdot_kernel<T, W, kRankMajor, 1><<<grid, kDotWarps * kWarp, 0, stream>>>(
        rows, weights, offsets_E1, target, num_rows, dim, rank, num_experts, split.span,
        target_scale);
  }
  if (split.splits > 1) {
    const int64_t count = num_rows * rank;
    sum_splits_kernel<Acc><<<grid_stride_blocks(count, 256), 256, 0, stream>>>(
        target, static_cast<Acc*>(out_Nr), count, split.splits, static_cast<Acc>(scale));
  }
  return cudaGetLastError();
}

// out_NK = store(scale * in_Nr · W_e) (see expand_kernel); N > 0, K > 0.
template <typename T, typename W, bool kRankMajor>
cudaError_t launch_expand(const void* in_Nr, const void* w, const int64_t* offsets_E1,
                          void* out_NK, int64_t num_rows, int64_t dim, int64_t rank,
                          int64_t num_experts, double scale, cudaStream_t stream) {
  using Acc = typename Elem<T>::Acc;
  constexpr int BM = kExpandWarps * Tiles<Acc>::kExpandRows;
  const bool vec = vectorizable<T>(out_NK, dim);
  const int64_t col_blocks = ceil_div(dim, kWarp * (vec ? kVec<T> : 1));
  if (col_blocks > kMaxGridYZ) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(ceil_div(num_rows, BM)),
                  static_cast<unsigned int>(col_blocks));
  const auto* in = static_cast<const Acc*>(in_Nr);
  const auto* weights = static_cast<const W*>(w);
  auto* out = static_cast<T*>(out_NK);
  if (vec) {
    expand_kernel<T, W, kRankMajor, kVec<T>><<<grid, kExpandWarps * kWarp, 0, stream>>>(
        in, weights, offsets_E1, out, num_rows, dim, rank, num_experts, static_cast<Acc>(scale));
  } else {
    expand_kernel<T, W, kRankMajor, 1><<<grid, kExpandWarps * kWarp, 0, stream>>>(
        in, weights, offsets_E1, out, num_rows, dim, rank, num_experts, static_cast<Acc>(scale));
  }
  return cudaGetLastError();
}

// grad = store(scale * rows^T · v per expert) in the weights' layout (see weight_grad_kernel);
// K > 0, r > 0, E > 0.
template <typename T, typename W, bool kRankMajor>
cudaError_t launch_weight_grad(const void* rows_NK, const void* v_Nr, const int64_t* offsets_E1,
                               void* grad, void* workspace, int64_t num_rows, int64_t dim,
                               int64_t rank, int64_t num_experts, double scale,
                               cudaStream_t stream) {
  using Acc = typename Elem<T>::Acc;
  auto* partial = static_cast<Acc*>(workspace);
  if (num_rows > 0) {
    const bool vec = vectorizable<T>(rows_NK, dim);
    const int64_t slots = grad_slots(num_rows, num_experts);
    const int64_t col_blocks = ceil_div(dim, kGradThreads * (vec ? kVec<T> : 1));
    if (slots > INT32_MAX || col_blocks > kMaxGridYZ) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned int>(slots), static_cast<unsigned int>(col_blocks),
                    static_cast<unsigned int>(ceil_div(rank, Tiles<Acc>::kGradRanks)));
    const auto* rows = static_cast<const T*>(rows_NK);
    const auto* v = static_cast<const Acc*>(v_Nr);
    if (vec) {
      weight_grad_kernel<T, kVec<T>><<<grid, kGradThreads, 0, stream>>>(
          rows, v, offsets_E1, partial, dim, rank, num_experts);
    } else {
      weight_grad_kernel<T, 1><<<grid, kGradThreads, 0, stream>>>(rows, v, offsets_E1, partial,
                                                                   dim, rank, num_experts);
    }
  }
  const int64_t count = num_experts * rank * dim;
  reduce_weight_grad_kernel<W, kRankMajor, Acc><<<grid_stride_blocks(count, 256), 256, 0, stream>>>(
      partial, offsets_E1, static_cast<W*>(grad), dim, rank, num_experts, static_cast<Acc>(scale));
  return cudaGetLastError();
}

bool negative(std::initializer_list<int64_t> sizes) {
  return std::any_of(sizes.begin(), sizes.end(), [](int64_t s) { return s < 0; });
}

}  // namespace

size_t grouped_lora_shrink_workspace_bytes(RowType row_type, int64_t num_rows,
                                           int64_t in_features, int64_t rank) {
  return dot_workspace_bytes(row_type, num_rows, in_features, rank);
}

cudaError_t grouped_lora_shrink(RowType row_type, RowType weight_type, const void* x_NI,
                                const void* a_ErI, const int64_t* offsets_E1, void* xa_Nr,
                                void* workspace, int64_t num_rows, int64_t in_features,
                                int64_t rank, int64_t num_experts, cudaStream_t stream) {
  if (negative({num_rows, in_features, rank, num_experts})) return cudaErrorInvalidValue;
  return dispatch(row_type, weight_type, [&](auto row_tag, auto weight_tag) {
    using T = typename decltype(row_tag)::type;
    using W = typename decltype(weight_tag)::type;
    if (num_rows == 0 || rank == 0) return cudaSuccess;
    return launch_rowdot<T, W, /*kRankMajor=*/true>(x_NI, a_ErI, offsets_E1, xa_Nr, workspace,
                                                    num_rows, in_features, rank, num_experts,
                                                    1.0, stream);
  });
}

cudaError_t grouped_lora_expand(RowType row_type, RowType weight_type, const void* xa_Nr,
                                const void* b_EOr, const int64_t* offsets_E1, double scale,
                                void* y_NO, int64_t num_rows, int64_t out_features, int64_t rank,
                                int64_t num_experts, cudaStream_t stream) {
  if (negative({num_rows, out_features, rank, num_experts})) return cudaErrorInvalidValue;
  return dispatch(row_type, weight_type, [&](auto row_tag, auto weight_tag) {
    using T = typename decltype(row_tag)::type;
    using W = typename decltype(weight_tag)::type;
    if (num_rows == 0 || out_features == 0) return cudaSuccess;
    return launch_expand<T, W, /*kRankMajor=*/false>(xa_Nr, b_EOr, offsets_E1, y_NO, num_rows,
                                                     out_features, rank, num_experts, scale,
                                                     stream);
  });
}

size_t grouped_lora_backward_workspace_bytes(RowType row_type, int64_t num_rows,
                                             int64_t in_features, int64_t out_features,
                                             int64_t rank, int64_t num_experts) {
  // gxa, then one region reused in turn by the gxa splits, gB's chunks and gA's chunks.
  const size_t gxa = align_up(static_cast<size_t>(num_rows * rank) * acc_size(row_type));
  return gxa + std::max({dot_workspace_bytes(row_type, num_rows, out_features, rank),
                         grad_workspace_bytes(row_type, num_rows, out_features, rank, num_experts),
                         grad_workspace_bytes(row_type, num_rows, in_features, rank, num_experts)});
}

cudaError_t grouped_lora_backward(RowType row_type, RowType weight_type, const void* gy_NO,
                                  const void* x_NI, const void* a_ErI, const void* b_EOr,
                                  const void* xa_Nr, const int64_t* offsets_E1, double scale,
                                  void* gx_NI, void* ga_ErI, void* gb_EOr, void* workspace,
                                  int64_t num_rows, int64_t in_features, int64_t out_features,
                                  int64_t rank, int64_t num_experts, cudaStream_t stream) {
  if (negative({num_rows, in_features, out_features, rank, num_experts})) {
    return cudaErrorInvalidValue;
  }
  return dispatch(row_type, weight_type, [&](auto row_tag, auto weight_tag) {
    using T = typename decltype(row_tag)::type;
    using W = typename decltype(weight_tag)::type;
    const size_t gxa_bytes =
        align_up(static_cast<size_t>(num_rows * rank) * acc_size(row_type));
    void* gxa_Nr = workspace;
    void* scratch = static_cast<char*>(workspace) + gxa_bytes;
    cudaError_t rc = cudaSuccess;
    if (num_rows > 0 && rank > 0) {  // gxa = scale * gy · B_e
      rc = launch_rowdot<T, W, /*kRankMajor=*/false>(gy_NO, b_EOr, offsets_E1, gxa_Nr, scratch,
                                                     num_rows, out_features, rank, num_experts,
                                                     scale, stream);
      if (rc != cudaSuccess) return rc;
    }
    if (num_rows > 0 && in_features > 0) {  // gx = gxa · A_e
      rc = launch_expand<T, W, /*kRankMajor=*/true>(gxa_Nr, a_ErI, offsets_E1, gx_NI, num_rows,
                                                    in_features, rank, num_experts, 1.0, stream);
      if (rc != cudaSuccess) return rc;
    }
    if (rank > 0 && num_experts > 0 && out_features > 0) {  // gB_e = scale * gy_e^T · xa_e
      rc = launch_weight_grad<T, W, /*kRankMajor=*/false>(gy_NO, xa_Nr, offsets_E1, gb_EOr,
                                                          scratch, num_rows, out_features, rank,
                                                          num_experts, scale, stream);
      if (rc != cudaSuccess) return rc;
    }
    if (rank > 0 && num_experts > 0 && in_features > 0) {  // gA_e = gxa_e^T · x_e
      rc = launch_weight_grad<T, W, /*kRankMajor=*/true>(x_NI, gxa_Nr, offsets_E1, ga_ErI,
                                                         scratch, num_rows, in_features, rank,
                                                         num_experts, 1.0, stream);
    }
    return rc;
  });
}

}  // namespace mole::kernels::cuda
