// CUDA kernels of the grouped LoRA, launched by grouped_lora_kernels.cu (contract in
// grouped_lora_kernels.h). Four kernel shapes cover the forward and the backward; each stages the
// LoRA weights it needs in shared memory (converted to acc), so that every weight value read there
// feeds several rows.
// - rowdot: out[n, j] = sum over k of rows[n, k] * W_e(j, k), a reduction over a long K (I or O)
//   with a short r: shrink (x, A) and gxa (gy, B). A warp owns a few rows and its lanes split K;
//   a block's warps share the staged weights; K is split again over blocks (grid y) when there are
//   few rows. Lanes are summed by a fixed butterfly, blocks by sum_splits_kernel in split order.
// - expand: out[n, k] = sum over j of in[n, j] * W_e(j, k), a short reduction over r for each of
//   K outputs: y (xa, B) and gx (gxa, A). A thread owns a few rows times one 16-byte column vector.
// - weight_grad: partial[slot, k, j] = sum over a chunk of one expert's rows of rows[n, k] * v[n, j],
//   for gB (gy, xa) and gA (x, gxa); reduce_weight_grad_kernel adds an expert's chunks in order.
// W_e(j, k) is A_e[j, k] (rank-major, [r, I]) or B_e[k, j] (rank-minor, [O, r]).
// Row blocks that straddle expert segments are processed once per expert they meet, with the rows
// of other experts masked out.
//
// Legend: N rows (grouped by expert), I in features, O out features, E experts, r LoRA rank; K is
// the long dimension of a kernel (I or O).
#pragma once

#include <cstdint>

#include "kernels/cuda/elem.cuh"

// The device side of grouped_lora_kernels.cu: tile sizes, the kernels and their helpers.
namespace mole::kernels::cuda::grouped_lora_device {

constexpr int kWarp = 32;
constexpr unsigned int kFullMask = 0xffffffffu;
constexpr int kDotWarps = 8;                       // rowdot block: 8 warps, rows split among them
constexpr int kExpandWarps = 8;                    // expand block: likewise
constexpr int kExpandRanks = 16;                   // expand: ranks staged in shared memory at once
constexpr int kGradThreads = 128;                  // weight_grad block: threads split K
constexpr int kGradChunkRows = 128;                // weight_grad: rows of one expert per block
constexpr int64_t kSplitUnit = 256;                // rowdot splits K in multiples of this
constexpr int64_t kMinUnitsPerSplit = 2;           // ... and never below 512 columns per block
constexpr int64_t kTargetBlocks = 264;             // rowdot splits K until about this many blocks
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxBlocks = 65535;              // grid-stride beyond this many blocks
constexpr size_t kWorkspaceAlign = 256;

// Per-thread tiles, by accumulation type (float64 halves the rowdot tile to stay in registers).
template <typename Acc>
struct Tiles;

template <>
struct Tiles<float> {
  static constexpr int kDotRows = 4;      // rowdot: rows per warp
  static constexpr int kDotRanks = 8;     // rowdot: ranks per block (more blocks cover the rest)
  static constexpr int kExpandRows = 8;   // expand: rows per warp
  static constexpr int kGradRanks = 8;    // weight_grad: ranks per block (grid z)
};

template <>
struct Tiles<double> {
  static constexpr int kDotRows = 2;
  static constexpr int kDotRanks = 8;
  static constexpr int kExpandRows = 8;
  static constexpr int kGradRanks = 8;
};

// VEC consecutive elements, loaded or stored as one access (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// COUNT consecutive acc values from shared memory, 16 bytes at a time when COUNT allows (then `p`
// is 16-byte aligned: every caller's offset is a multiple of 16 bytes).
template <int COUNT, typename Acc>
__device__ void load_shared(const Acc* p, Acc (&out)[COUNT]) {
  constexpr int kPer16 = 16 / static_cast<int>(sizeof(Acc));
  if constexpr (COUNT % kPer16 == 0) {
#pragma unroll
    for (int c = 0; c < COUNT / kPer16; ++c) {
      const Vec<Acc, kPer16> chunk = reinterpret_cast<const Vec<Acc, kPer16>*>(p)[c];
#pragma unroll
      for (int i = 0; i < kPer16; ++i) out[c * kPer16 + i] = chunk.v[i];
    }
  } else {
#pragma unroll
    for (int i = 0; i < COUNT; ++i) out[i] = p[i];
  }
}

// W_e(j, k) of one expert's weights: A_e[j, k] (rank-major) or B_e[k, j] (rank-minor).
template <bool kRankMajor>
__device__ int64_t weight_index(int64_t j, int64_t k, int64_t rank, int64_t dim) {
  return kRankMajor ? j * dim + k : k * rank + j;
}

// w_s[j * pitch + c] = W_e(j0 + j, k0 + c) in acc for j < ranks, c < cols; zeros where j0 + j >= r
// or k0 + c >= k_end. Consecutive threads read consecutive addresses (along k for rank-major
// weights, along j for rank-minor ones). The whole block calls it.
template <bool kRankMajor, typename W, typename Acc>
__device__ void stage_weights(const W* w_e, int64_t rank, int64_t dim, int64_t j0, int64_t k0,
                              int64_t k_end, int ranks, int cols, int pitch, Acc* w_s) {
#pragma unroll 4
  for (int idx = threadIdx.x; idx < ranks * cols; idx += blockDim.x) {
    const int j = kRankMajor ? idx / cols : idx % ranks;
    const int c = kRankMajor ? idx % cols : idx / ranks;
    const int64_t jj = j0 + j, kk = k0 + c;
    w_s[j * pitch + c] = jj < rank && kk < k_end
                             ? Elem<W>::load(w_e[weight_index<kRankMajor>(jj, kk, rank, dim)])
                             : Acc(0);
  }
}

// The expert whose segment holds row n < N: the last e with offsets_E1[e] <= n.
__device__ int64_t expert_of_row(const int64_t* offsets_E1, int64_t num_experts, int64_t n) {
  int64_t lo = 0, hi = num_experts - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets_E1[mid] <= n) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Calls body(e, begin, end) for each expert whose segment meets rows [n0, n1), n0 < n1, in expert
// order, with the non-empty intersection [begin, end). Uniform over a block, so the body may
// synchronise the block.
template <typename Body>
__device__ void for_each_segment(const int64_t* offsets_E1, int64_t num_experts, int64_t n0,
                                 int64_t n1, Body body) {
  for (int64_t e = expert_of_row(offsets_E1, num_experts, n0);
       e < num_experts && offsets_E1[e] < n1; ++e) {
    const int64_t begin = max(n0, offsets_E1[e]), end = min(n1, offsets_E1[e + 1]);
    if (begin < end) body(e, begin, end);
  }
}

// One step of warp_sum_spread for lane bit OFFSET, then the next smaller bits.
template <int OFFSET, int COUNT, typename Acc>
__device__ void sum_spread_step(Acc (&v)[COUNT], int lane, int& first) {
  constexpr int kHalf = COUNT * OFFSET / kWarp;  // values kept after this step (0: plain butterfly)
  const bool upper = (lane & OFFSET) != 0;
  if constexpr (kHalf > 0) {
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      const Acc send = upper ? v[i] : v[i + kHalf];
      const Acc keep = upper ? v[i + kHalf] : v[i];
      v[i] = keep + __shfl_xor_sync(kFullMask, send, OFFSET);
    }
    if (upper) first += kHalf;
  } else {
    v[0] += __shfl_xor_sync(kFullMask, v[0], OFFSET);
  }
  if constexpr (OFFSET > 1) sum_spread_step<OFFSET / 2>(v, lane, first);
}

// Sums v over the 32 lanes of a warp in a fixed order and spreads the COUNT sums over the lanes:
// at each halving step a lane keeps one half of its values (the upper half when its lane bit is
// set) and adds its partner's copy of that half, so the shuffles halve too. Afterwards the lane
// holds the sums first .. first + max(COUNT / 32, 1) - 1 in v[0 ..]; with COUNT < 32 each sum is
// held by 32 / COUNT neighbouring lanes. Returns first.
template <int COUNT, typename Acc>
__device__ int warp_sum_spread(Acc (&v)[COUNT]) {
  static_assert((COUNT & (COUNT - 1)) == 0, "COUNT must be a power of two");
  int first = 0;
  sum_spread_step<kWarp / 2>(v, static_cast<int>(threadIdx.x % kWarp), first);
  return first;
}

// out[n, j0 + j] (+ split * N * r) = out_scale * sum over this split's k of rows[n, k] * W_e(j, k),
// for the row block blockIdx.x / rank_tiles, the rank tile blockIdx.x % rank_tiles (neighbouring
// blocks share rows, which the second one then finds in L2) and the K split blockIdx.y (columns
// [split * span, ...)). One split writes the final values (out_scale = scale); several write unscaled
// partials to the workspace [splits, N, r], summed by sum_splits_kernel.
template <typename T, typename W, bool kRankMajor, int VEC>
__global__ void __launch_bounds__(kDotWarps* kWarp, 2)
    rowdot_kernel(const T* __restrict__ rows_NK, const W* __restrict__ w,
                  const int64_t* __restrict__ offsets_E1, typename Elem<T>::Acc* __restrict__ out,
                  int64_t num_rows, int64_t dim, int64_t rank, int64_t num_experts, int64_t span,
                  typename Elem<T>::Acc out_scale) {
  using Acc = typename Elem<T>::Acc;
  constexpr int TM = Tiles<Acc>::kDotRows, JT = Tiles<Acc>::kDotRanks;
  constexpr int kCols = kWarp * VEC, kPitch = kCols + 16 / static_cast<int>(sizeof(Acc));
  constexpr int G = VEC < 16 / static_cast<int>(sizeof(Acc)) ? VEC : 16 / static_cast<int>(sizeof(Acc));
  __shared__ __align__(16) Acc w_s[JT * kPitch];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t rank_tiles = (rank + JT - 1) / JT;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) / rank_tiles * kDotWarps * TM;
  const int64_t n1 = min(n0 + kDotWarps * TM, num_rows);
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) % rank_tiles * JT;
  const int64_t col_begin = blockIdx.y * span, col_end = min(col_begin + span, dim);
  Acc* out_Nr = out + blockIdx.y * num_rows * rank;
  const int64_t row0 = n0 + warp * TM;
  for_each_segment(offsets_E1, num_experts, n0, n1, [&](int64_t e, int64_t begin, int64_t end) {
    const bool active = row0 < end && row0 + TM > begin;  // warp-uniform
    const W* w_e = w + e * rank * dim;
    Acc acc[TM * JT] = {};
    for (int64_t k0 = col_begin; k0 < col_end; k0 += kCols) {
      // This lane's VEC columns of the warp's rows, loaded before the block stages the weights so
      // that both loads are in flight together. Rows of other experts read as zeros.
      const int64_t col = k0 + lane * VEC;
      Vec<T, VEC> raw[TM];
#pragma unroll
      for (int tm = 0; tm < TM; ++tm) {
        const int64_t n = row0 + tm;
        raw[tm] = n >= begin && n < end && col < col_end
                      ? *reinterpret_cast<const Vec<T, VEC>*>(rows_NK + n * dim + col)
                      : Vec<T, VEC>{};
      }
      __syncthreads();  // the previous chunk's reads of w_s are done
      stage_weights<kRankMajor>(w_e, rank, dim, j0, k0, col_end, JT, kCols, kPitch, w_s);
      __syncthreads();
      if (!active) continue;
      // The columns in groups of G, converted to acc a group at a time to save registers.
#pragma unroll
      for (int g0 = 0; g0 < VEC; g0 += G) {
        Acc xf[TM][G];
#pragma unroll
        for (int tm = 0; tm < TM; ++tm) {
#pragma unroll
          for (int g = 0; g < G; ++g) xf[tm][g] = Elem<T>::load(raw[tm].v[g0 + g]);
        }
#pragma unroll
        for (int j = 0; j < JT; ++j) {
          Acc a[G];
          load_shared(w_s + j * kPitch + lane * VEC + g0, a);
#pragma unroll
          for (int tm = 0; tm < TM; ++tm) {
#pragma unroll
            for (int g = 0; g < G; ++g) acc[tm * JT + j] += xf[tm][g] * a[g];
          }
        }
      }
    }
    if (!active) return;
    const int first = warp_sum_spread(acc);
    constexpr int kHeld = TM * JT >= kWarp ? TM * JT / kWarp : 1;
    constexpr int kCopies = TM * JT >= kWarp ? 1 : kWarp / (TM * JT);
    if (lane % kCopies != 0) return;
#pragma unroll
    for (int i = 0; i < kHeld; ++i) {
      const int64_t n = row0 + (first + i) / JT, j = j0 + (first + i) % JT;
      if (n >= begin && n < end && j < rank) out_Nr[n * rank + j] = out_scale * acc[i];
    }
  });
}

// out[i] = scale * sum over s in increasing order of partial[s * count + i].
template <typename Acc>
__global__ void sum_splits_kernel(const Acc* __restrict__ partial, Acc* __restrict__ out,
                                  int64_t count, int64_t splits, Acc scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Acc sum = 0;
    for (int64_t s = 0; s < splits; ++s) sum += partial[s * count + i];
    out[i] = scale * sum;
  }
}

// out[n, k] = store(scale * sum over j in increasing order of in[n, j] * W_e(j, k)), for the row
// block blockIdx.x and the column block blockIdx.y (one VEC vector per lane).
template <typename T, typename W, bool kRankMajor, int VEC>
__global__ void __launch_bounds__(kExpandWarps* kWarp)
    expand_kernel(const typename Elem<T>::Acc* __restrict__ in_Nr, const W* __restrict__ w,
                  const int64_t* __restrict__ offsets_E1, T* __restrict__ out_NK,
                  int64_t num_rows, int64_t dim, int64_t rank, int64_t num_experts,
                  typename Elem<T>::Acc scale) {
  using Acc = typename Elem<T>::Acc;
  constexpr int TM = Tiles<Acc>::kExpandRows, JT = kExpandRanks, BM = kExpandWarps * TM;
  constexpr int kCols = kWarp * VEC, kPitch = kCols + 16 / static_cast<int>(sizeof(Acc));
  __shared__ __align__(16) Acc w_s[JT * kPitch];
  __shared__ __align__(16) Acc in_s[JT * BM];  // in_s[j * BM + m]: rank j of block row m
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BM, n1 = min(n0 + BM, num_rows);
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kCols, col = k0 + lane * VEC;
  const int64_t row0 = n0 + warp * TM;
  for_each_segment(offsets_E1, num_experts, n0, n1, [&](int64_t e, int64_t begin, int64_t end) {
    const bool active = row0 < end && row0 + TM > begin && col < dim;
    Acc acc[TM][VEC] = {};
    for (int64_t j0 = 0; j0 < rank; j0 += JT) {
      __syncthreads();  // the previous tile's reads of w_s and in_s are done
      stage_weights<kRankMajor>(w + e * rank * dim, rank, dim, j0, k0, dim, JT, kCols, kPitch,
                                w_s);
      for (int idx = threadIdx.x; idx < JT * BM; idx += blockDim.x) {
        const int64_t n = n0 + idx % BM, j = j0 + idx / BM;
        in_s[idx] = n >= begin && n < end && j < rank ? in_Nr[n * rank + j] : Acc(0);
      }
      __syncthreads();
      if (!active) continue;
#pragma unroll
      for (int j = 0; j < JT; ++j) {
        Acc a[VEC], b[TM];
        load_shared(w_s + j * kPitch + lane * VEC, a);
        load_shared(in_s + j * BM + warp * TM, b);
#pragma unroll
        for (int tm = 0; tm < TM; ++tm) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[tm][v] += b[tm] * a[v];
        }
      }
    }
    if (!active) return;
#pragma unroll
    for (int tm = 0; tm < TM; ++tm) {
      const int64_t n = row0 + tm;
      if (n < begin || n >= end) continue;
      Vec<T, VEC> packed;
#pragma unroll
      for (int v = 0; v < VEC; ++v) packed.v[v] = Elem<T>::store(scale * acc[tm][v]);
      *reinterpret_cast<Vec<T, VEC>*>(out_NK + n * dim + col) = packed;
    }
  });
}

// Chunks of weight_grad rows of expert e: ceil(rows of e / kGradChunkRows).
__device__ int64_t grad_chunks(const int64_t* offsets_E1, int64_t e) {
  return (offsets_E1[e + 1] - offsets_E1[e] + kGradChunkRows - 1) / kGradChunkRows;
}

// partial[slot, k, j0 + j] = sum over the rows n of one chunk, in increasing order, of
// rows[n, k] * v[n, j0 + j]. Slots number the chunks of all experts in expert order (slot
// blockIdx.x; slots past the last chunk have nothing to do); blockIdx.y picks the columns (one VEC
// vector per thread) and blockIdx.z the rank tile.
template <typename T, int VEC>
__global__ void __launch_bounds__(kGradThreads)
    weight_grad_kernel(const T* __restrict__ rows_NK,
                       const typename Elem<T>::Acc* __restrict__ v_Nr,
                       const int64_t* __restrict__ offsets_E1,
                       typename Elem<T>::Acc* __restrict__ partial_SKr, int64_t dim, int64_t rank,
                       int64_t num_experts) {
  using Acc = typename Elem<T>::Acc;
  constexpr int JT = Tiles<Acc>::kGradRanks;
  __shared__ __align__(16) Acc v_s[kGradChunkRows * JT];  // v_s[m * JT + j]
  const int64_t slot = blockIdx.x;
  int64_t first_slot = 0, e = 0;
  for (; e < num_experts; ++e) {
    const int64_t chunks = grad_chunks(offsets_E1, e);
    if (slot < first_slot + chunks) break;
    first_slot += chunks;
  }
  if (e == num_experts) return;  // the whole block
  const int64_t begin = offsets_E1[e] + (slot - first_slot) * kGradChunkRows;
  const int64_t end = min(begin + kGradChunkRows, offsets_E1[e + 1]);
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * JT;
  for (int idx = threadIdx.x; idx < kGradChunkRows * JT; idx += blockDim.x) {
    const int64_t n = begin + idx / JT, j = j0 + idx % JT;
    v_s[idx] = n < end && j < rank ? v_Nr[n * rank + j] : Acc(0);
  }
  __syncthreads();
  const int64_t k = (static_cast<int64_t>(blockIdx.y) * kGradThreads + threadIdx.x) * VEC;
  if (k >= dim) return;
  Acc acc[VEC][JT] = {};
#pragma unroll 4
  for (int64_t n = begin; n < end; ++n) {
    const Vec<T, VEC> raw = *reinterpret_cast<const Vec<T, VEC>*>(rows_NK + n * dim + k);
    Acc b[JT];
    load_shared(v_s + (n - begin) * JT, b);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const Acc x = Elem<T>::load(raw.v[v]);
#pragma unroll
      for (int j = 0; j < JT; ++j) acc[v][j] += x * b[j];
    }
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
#pragma unroll
    for (int j = 0; j < JT; ++j) {
      if (j0 + j < rank) partial_SKr[(slot * dim + k + v) * rank + j0 + j] = acc[v][j];
    }
  }
}

// grad[e, ...] = store(scale * sum over expert e's slots, in order, of partial[slot, k, j]), in the
// weights' layout (rank-major [E, r, K] or rank-minor [E, K, r]); zeros for experts without rows.
template <typename W, bool kRankMajor, typename Acc>
__global__ void reduce_weight_grad_kernel(const Acc* __restrict__ partial_SKr,
                                          const int64_t* __restrict__ offsets_E1,
                                          W* __restrict__ grad, int64_t dim, int64_t rank,
                                          int64_t num_experts, Acc scale) {
  const int64_t per_expert = rank * dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < num_experts * per_expert; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i / per_expert, within = i % per_expert;
    const int64_t j = kRankMajor ? within / dim : within % rank;
    const int64_t k = kRankMajor ? within % dim : within / rank;
    int64_t first_slot = 0;
    for (int64_t f = 0; f < e; ++f) first_slot += grad_chunks(offsets_E1, f);
    const int64_t chunks = grad_chunks(offsets_E1, e);
    Acc sum = 0;
    for (int64_t q = 0; q < chunks; ++q) sum += partial_SKr[((first_slot + q) * dim + k) * rank + j];
    grad[i] = Elem<W>::store(scale * sum);
  }
}

}  // namespace mole::kernels::cuda::grouped_lora_device
