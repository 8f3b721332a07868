// CUDA kernels and launchers of the fused router (contract in router_kernels.h). A group of G
// lanes of one warp (G = E rounded up to a power of two, at most 32) handles one token: lane m
// holds experts m and m + G in registers, reductions over experts are butterfly shuffles within
// the group (a fixed tree, and every lane ends with the same bits), and a per-group scratch of 2G
// entries in shared memory holds the token's ranking. Blocks grid-stride over groups of tokens;
// every lane of a warp runs every iteration (groups past T compute on fillers and write nothing),
// so the full-warp shuffles and __syncwarp are always reached by all 32 lanes.
//
// Legend: T tokens, E experts, K top-k, C columns (K for top-k, else E), N routed pairs.
#include "kernels/cuda/router_kernels.h"

#include <cfloat>
#include <cmath>
#include <cstdint>

namespace mole::kernels::cuda {
namespace {

constexpr int kThreads = 128;         // 4 warps per block
constexpr int64_t kMaxBlocks = 2048;  // grid-stride beyond this many blocks of tokens
constexpr int kScanThreads = 1024;    // routing_offsets: one block
constexpr int kCompactThreads = 256;
constexpr unsigned int kFullMask = 0xffffffffu;

static_assert(kMaxRouterExperts == 64, "two experts per lane of a 32-lane group");

// Lanes per token: E rounded up to a power of two, at most a warp.
int group_size(int64_t num_experts) {
  int lanes = 1;
  while (lanes < num_experts && lanes < 32) lanes *= 2;
  return lanes;
}

unsigned int blocks_for(int64_t items, int64_t items_per_block) {
  const int64_t blocks = (items + items_per_block - 1) / items_per_block;
  return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

bool invalid_sizes(const RouterSelect& select, int64_t num_tokens, int64_t num_experts) {
  return num_tokens < 0 || num_experts < 1 || num_experts > kMaxRouterExperts ||
         router_select_error(select, num_experts) != nullptr;
}

template <int G>
__device__ float group_sum(float v) {
  for (int offset = G / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset, G);
  return v;
}

template <int G>
__device__ float group_max(float v) {
  for (int offset = G / 2; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset, G));
  }
  return v;
}

// Whether expert a (logit za) ranks before expert b (logit zb): larger logit first, the lower id
// among equals, NaN before every number (a strict total order, so ranks are a permutation).
__device__ bool ranks_before(float za, int a, float zb, int b) {
  const bool nan_a = za != za, nan_b = zb != zb;
  if (nan_a || nan_b) return nan_a && (!nan_b || a < b);
  return za > zb || (za == zb && a < b);
}

// n for top-p over probabilities in rank order: ranks are kept while the preceding ones sum
// (float64, in rank order, rounded to float32) to at most top_p. One lane, sequentially.
__device__ int top_p_count(const float* sorted_p, int num_experts, const RouterConstants& c) {
  if (c.keep_all_top_p) return num_experts;
  double before = 0.0;
  int n = 0;
  while (n < num_experts && static_cast<float>(before) <= c.top_p) before += sorted_p[n++];
  return n;
}

template <int G>
__global__ void __launch_bounds__(kThreads)
    route_forward_kernel(const float* __restrict__ logits_TE, RouterConstants c,
                         float* __restrict__ probs_TE, int64_t* __restrict__ expert_TC,
                         float* __restrict__ weight_TC, int64_t* __restrict__ token_TC,
                         int64_t* __restrict__ count_T, unsigned long long* __restrict__ count_E,
                         int64_t num_tokens, int num_experts, int num_columns) {
  constexpr int kSlots = G == 32 ? 2 : 1;  // experts per lane
  constexpr int kGroups = kThreads / G;    // tokens per block and iteration
  __shared__ int ranked_id[2 * kThreads];  // per group 2G >= E entries, in rank order
  __shared__ float ranked_p[2 * kThreads];
  __shared__ unsigned long long block_count[kMaxRouterExperts];
  const int group = static_cast<int>(threadIdx.x) / G, member = static_cast<int>(threadIdx.x) % G;
  int* ids = ranked_id + group * 2 * G;
  float* sorted_p = ranked_p + group * 2 * G;
  for (int e = static_cast<int>(threadIdx.x); e < num_experts; e += kThreads) block_count[e] = 0;
  __syncthreads();

  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kGroups; first < num_tokens;
       first += static_cast<int64_t>(gridDim.x) * kGroups) {
    const int64_t t = first + group;
    const bool active = t < num_tokens;
    bool valid[kSlots];
    float z[kSlots], p[kSlots];
    float largest = -INFINITY;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int e = member + s * G;
      valid[s] = active && e < num_experts;
      z[s] = valid[s] ? logits_TE[t * num_experts + e] : -INFINITY;
      largest = fmaxf(largest, z[s]);
    }
    largest = group_max<G>(largest);
    float sum = 0.0f;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      p[s] = valid[s] ? expf(z[s] - largest) : 0.0f;
      sum += p[s];
    }
    sum = group_sum<G>(sum);
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      p[s] /= sum;
      if (valid[s]) probs_TE[t * num_experts + member + s * G] = p[s];
    }

    // Rank of each held expert = the number of experts that rank before it.
    int rank[kSlots] = {};
#pragma unroll
    for (int src_slot = 0; src_slot < kSlots; ++src_slot) {
      for (int src = 0; src < G; ++src) {
        const float zj = __shfl_sync(kFullMask, z[src_slot], src, G);
        const int j = src + src_slot * G;
#pragma unroll
        for (int s = 0; s < kSlots; ++s) {
          if (j < num_experts) rank[s] += ranks_before(zj, j, z[s], member + s * G);
        }
      }
    }
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      if (valid[s]) {
        ids[rank[s]] = member + s * G;
        sorted_p[rank[s]] = p[s];
      }
    }
    __syncwarp();

    bool use_all = false;  // DynMoLE: entropy above the threshold
    if (c.rule == static_cast<int>(RouterRule::kDynMole)) {
      float terms = 0.0f;
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const float clamped = fmaxf(p[s], FLT_MIN);
        if (valid[s]) terms += p[s] * (c.shannon ? logf(clamped) : powf(clamped, c.q_minus_1));
      }
      terms = group_sum<G>(terms);
      float entropy = c.shannon ? -terms / c.entropy_max : (1.0f - terms) / c.entropy_max;
      entropy = num_experts == 1 ? 0.0f : fminf(fmaxf(entropy, 0.0f), 1.0f);
      use_all = entropy > c.threshold;
    }

    // The selection is a prefix of the ranking: its length n (and the top-k renormaliser) by the
    // group's first lane, in rank order, then broadcast.
    int n = num_experts;
    float renorm = 1.0f;
    if (member == 0 && active) {
      if (c.rule == static_cast<int>(RouterRule::kTopK)) {
        n = c.kept;
        renorm = 0.0f;
        for (int j = 0; j < n; ++j) renorm += sorted_p[j];
      } else if (c.rule == static_cast<int>(RouterRule::kTopP)) {
        n = top_p_count(sorted_p, num_experts, c);
      } else if (c.rule == static_cast<int>(RouterRule::kDynMole) && !use_all) {
        n = max(top_p_count(sorted_p, num_experts, c), c.kept);
      }
    }
    n = __shfl_sync(kFullMask, n, 0, G);
    renorm = __shfl_sync(kFullMask, renorm, 0, G);

    if (active) {
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const int j = member + s * G;
        if (j >= num_columns) continue;
        const int64_t at = t * num_columns + j;
        const bool selected = j < n;
        const int expert = selected ? ids[j] : -1;
        expert_TC[at] = expert;
        weight_TC[at] = !selected                                       ? 0.0f
                        : c.rule == static_cast<int>(RouterRule::kTopK) ? sorted_p[j] / renorm
                                                                        : sorted_p[j];
        if (token_TC != nullptr) token_TC[at] = selected ? t : -1;
        if (selected) atomicAdd(&block_count[expert], 1ull);
      }
      if (member == 0) count_T[t] = n;
    }
    __syncwarp();  // the next token of this group rewrites ids and sorted_p
  }

  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < num_experts; e += kThreads) {
    if (block_count[e] != 0) atomicAdd(&count_E[e], block_count[e]);
  }
}

// offsets_T1 = exclusive scan of count_T, one block of kScanThreads: tiles of kScanThreads tokens,
// each scanned by warp shuffles plus the warps' totals, carried from tile to tile.
__global__ void __launch_bounds__(kScanThreads)
    routing_offsets_kernel(const int64_t* __restrict__ count_T, int64_t num_tokens,
                           int64_t* __restrict__ offsets_T1) {
  constexpr int kWarps = kScanThreads / 32;
  __shared__ int64_t warp_total[kWarps];
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  if (threadIdx.x == 0) offsets_T1[0] = 0;
  int64_t carry = 0;  // the same in every thread: the sum of all earlier tiles
  for (int64_t first = 0; first < num_tokens; first += kScanThreads) {
    const int64_t t = first + threadIdx.x;
    int64_t inclusive = t < num_tokens ? count_T[t] : 0;
    for (int offset = 1; offset < 32; offset *= 2) {
      const int64_t lower = __shfl_up_sync(kFullMask, inclusive, offset);
      if (lane >= offset) inclusive += lower;
    }
    if (lane == 31) warp_total[warp] = inclusive;
    __syncthreads();
    int64_t before_warp = 0, tile_total = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) before_warp += warp_total[w];
      tile_total += warp_total[w];
    }
    if (t < num_tokens) offsets_T1[t + 1] = carry + before_warp + inclusive;
    carry += tile_total;
    __syncthreads();  // warp_total is rewritten by the next tile
  }
}

__global__ void compact_routing_kernel(const int64_t* __restrict__ expert_TC,
                                       const float* __restrict__ weight_TC,
                                       const int64_t* __restrict__ offsets_T1, int64_t num_tokens,
                                       int64_t num_columns, int64_t* __restrict__ token_N,
                                       int64_t* __restrict__ expert_N,
                                       float* __restrict__ weight_N) {
  const int64_t num_cells = num_tokens * num_columns;
  for (int64_t cell = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; cell < num_cells;
       cell += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = cell / num_columns, j = cell % num_columns;
    const int64_t begin = offsets_T1[t];
    if (j < offsets_T1[t + 1] - begin) {
      token_N[begin + j] = t;
      expert_N[begin + j] = expert_TC[cell];
      weight_N[begin + j] = weight_TC[cell];
    }
  }
}

// Closed-form backward (router_reference.h). The scatters of pair values to their experts go
// through the group's scratch: a token's experts are distinct, so no two lanes add to one entry.
template <int G>
__global__ void __launch_bounds__(kThreads)
    route_backward_kernel(int renormalised, int fixed_count, int num_columns,
                          const float* __restrict__ probs_TE,
                          const float* __restrict__ grad_probs_TE,
                          const int64_t* __restrict__ expert_N, const float* __restrict__ weight_N,
                          const float* __restrict__ grad_weight_N,
                          const int64_t* __restrict__ offsets_T1,
                          float* __restrict__ grad_logits_TE, int64_t num_tokens, int num_experts) {
  constexpr int kSlots = G == 32 ? 2 : 1;
  constexpr int kGroups = kThreads / G;
  __shared__ float scratch[2 * kThreads];  // per group 2G >= E entries, indexed by expert
  const int group = static_cast<int>(threadIdx.x) / G, member = static_cast<int>(threadIdx.x) % G;
  float* by_expert = scratch + group * 2 * G;

  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kGroups; first < num_tokens;
       first += static_cast<int64_t>(gridDim.x) * kGroups) {
    const int64_t t = first + group;
    const bool active = t < num_tokens;
    int64_t begin = 0, num_pairs = 0;
    if (active) {
      begin = fixed_count ? t * num_columns : offsets_T1[t];
      num_pairs = fixed_count ? num_columns : offsets_T1[t + 1] - begin;
    }
    bool valid[kSlots], paired[kSlots];  // holds expert e; holds pair j of the token
    float p[kSlots], dp[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int e = member + s * G;
      valid[s] = active && e < num_experts;
      paired[s] = e < num_pairs;  // j = e: lane m holds pairs m and m + G as well
      p[s] = valid[s] ? probs_TE[t * num_experts + e] : 0.0f;
      dp[s] = valid[s] ? grad_probs_TE[t * num_experts + e] : 0.0f;
    }

    if (!renormalised) {  // weights are p: dp += grad_weight scattered to the pairs' experts
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (valid[s]) by_expert[member + s * G] = dp[s];
      }
      __syncwarp();
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const int64_t pair = begin + member + s * G;
        if (paired[s]) by_expert[expert_N[pair]] += grad_weight_N[pair];
      }
      __syncwarp();
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (valid[s]) dp[s] = by_expert[member + s * G];
      }
      __syncwarp();
    }

    float dot = 0.0f;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) dot += dp[s] * p[s];
    dot = group_sum<G>(dot);
    float dz[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) dz[s] = p[s] * (dp[s] - dot);

    if (renormalised) {  // top-k: + w (g - sum g w) at the selected experts
      float g[kSlots], w[kSlots];
      float weighted = 0.0f;
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const int64_t pair = begin + member + s * G;
        g[s] = paired[s] ? grad_weight_N[pair] : 0.0f;
        w[s] = paired[s] ? weight_N[pair] : 0.0f;
        weighted += g[s] * w[s];
      }
      weighted = group_sum<G>(weighted);
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (valid[s]) by_expert[member + s * G] = dz[s];
      }
      __syncwarp();
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const int64_t pair = begin + member + s * G;
        if (paired[s]) by_expert[expert_N[pair]] += w[s] * (g[s] - weighted);
      }
      __syncwarp();
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (valid[s]) dz[s] = by_expert[member + s * G];
      }
      __syncwarp();
    }

#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      if (valid[s]) grad_logits_TE[t * num_experts + member + s * G] = dz[s];
    }
  }
}

template <int G>
cudaError_t launch_forward(const float* logits_TE, const RouterSelect& select, float* probs_TE,
                           int64_t* expert_TC, float* weight_TC, int64_t* token_TC,
                           int64_t* count_T, int64_t* count_E, int64_t num_tokens,
                           int64_t num_experts, cudaStream_t stream) {
  route_forward_kernel<G><<<blocks_for(num_tokens, kThreads / G), kThreads, 0, stream>>>(
      logits_TE, router_constants(select, num_experts), probs_TE, expert_TC, weight_TC, token_TC,
      count_T, reinterpret_cast<unsigned long long*>(count_E), num_tokens,
      static_cast<int>(num_experts), static_cast<int>(router_columns(select, num_experts)));
  return cudaGetLastError();
}

template <int G>
cudaError_t launch_backward(const RouterSelect& select, const float* probs_TE,
                            const float* grad_probs_TE, const int64_t* expert_N,
                            const float* weight_N, const float* grad_weight_N,
                            const int64_t* offsets_T1, float* grad_logits_TE, int64_t num_tokens,
                            int64_t num_experts, cudaStream_t stream) {
  route_backward_kernel<G><<<blocks_for(num_tokens, kThreads / G), kThreads, 0, stream>>>(
      select.rule == RouterRule::kTopK, router_fixed_count(select.rule),
      static_cast<int>(router_columns(select, num_experts)), probs_TE, grad_probs_TE, expert_N,
      weight_N, grad_weight_N, offsets_T1, grad_logits_TE, num_tokens,
      static_cast<int>(num_experts));
  return cudaGetLastError();
}

}  // namespace

cudaError_t route_forward(const float* logits_TE, const RouterSelect& select, float* probs_TE,
                          int64_t* expert_TC, float* weight_TC, int64_t* token_TC, int64_t* count_T,
                          int64_t* count_E, int64_t num_tokens, int64_t num_experts,
                          cudaStream_t stream) {
  if (invalid_sizes(select, num_tokens, num_experts)) return cudaErrorInvalidValue;
  const cudaError_t zeroed =
      cudaMemsetAsync(count_E, 0, static_cast<size_t>(num_experts) * sizeof(int64_t), stream);
  if (zeroed != cudaSuccess || num_tokens == 0) return zeroed;
  switch (group_size(num_experts)) {
    case 1:
      return launch_forward<1>(logits_TE, select, probs_TE, expert_TC, weight_TC, token_TC, count_T,
                               count_E, num_tokens, num_experts, stream);
    case 2:
      return launch_forward<2>(logits_TE, select, probs_TE, expert_TC, weight_TC, token_TC, count_T,
                               count_E, num_tokens, num_experts, stream);
    case 4:
      return launch_forward<4>(logits_TE, select, probs_TE, expert_TC, weight_TC, token_TC, count_T,
                               count_E, num_tokens, num_experts, stream);
    case 8:
      return launch_forward<8>(logits_TE, select, probs_TE, expert_TC, weight_TC, token_TC, count_T,
                               count_E, num_tokens, num_experts, stream);
    case 16:
      return launch_forward<16>(logits_TE, select, probs_TE, expert_TC, weight_TC, token_TC,
                                count_T, count_E, num_tokens, num_experts, stream);
    default:
      return launch_forward<32>(logits_TE, select, probs_TE, expert_TC, weight_TC, token_TC,
                                count_T, count_E, num_tokens, num_experts, stream);
  }
}

cudaError_t routing_offsets(const int64_t* count_T, int64_t num_tokens, int64_t* offsets_T1,
                            cudaStream_t stream) {
  if (num_tokens < 0) return cudaErrorInvalidValue;
  if (num_tokens == 0) return cudaMemsetAsync(offsets_T1, 0, sizeof(int64_t), stream);
  routing_offsets_kernel<<<1, kScanThreads, 0, stream>>>(count_T, num_tokens, offsets_T1);
  return cudaGetLastError();
}

cudaError_t compact_routing(const int64_t* expert_TC, const float* weight_TC,
                            const int64_t* offsets_T1, int64_t num_tokens, int64_t num_columns,
                            int64_t* token_N, int64_t* expert_N, float* weight_N,
                            cudaStream_t stream) {
  if (num_tokens < 0 || num_columns < 1 || num_columns > kMaxRouterExperts) {
    return cudaErrorInvalidValue;
  }
  if (num_tokens == 0) return cudaSuccess;
  compact_routing_kernel<<<blocks_for(num_tokens * num_columns, kCompactThreads), kCompactThreads,
                           0, stream>>>(expert_TC, weight_TC, offsets_T1, num_tokens, num_columns,
                                        token_N, expert_N, weight_N);
  return cudaGetLastError();
}

cudaError_t route_backward(const RouterSelect& select, const float* probs_TE,
                           const float* grad_probs_TE, const int64_t* expert_N,
                           const float* weight_N, const float* grad_weight_N,
                           const int64_t* offsets_T1, float* grad_logits_TE, int64_t num_tokens,
                           int64_t num_experts, cudaStream_t stream) {
  if (invalid_sizes(select, num_tokens, num_experts)) return cudaErrorInvalidValue;
  if (num_tokens == 0) return cudaSuccess;
  switch (group_size(num_experts)) {
    case 1:
      return launch_backward<1>(select, probs_TE, grad_probs_TE, expert_N, weight_N, grad_weight_N,
                                offsets_T1, grad_logits_TE, num_tokens, num_experts, stream);
    case 2:
      return launch_backward<2>(select, probs_TE, grad_probs_TE, expert_N, weight_N, grad_weight_N,
                                offsets_T1, grad_logits_TE, num_tokens, num_experts, stream);
    case 4:
      return launch_backward<4>(select, probs_TE, grad_probs_TE, expert_N, weight_N, grad_weight_N,
                                offsets_T1, grad_logits_TE, num_tokens, num_experts, stream);
    case 8:
      return launch_backward<8>(select, probs_TE, grad_probs_TE, expert_N, weight_N, grad_weight_N,
                                offsets_T1, grad_logits_TE, num_tokens, num_experts, stream);
    case 16:
      return launch_backward<16>(select, probs_TE, grad_probs_TE, expert_N, weight_N, grad_weight_N,
                                 offsets_T1, grad_logits_TE, num_tokens, num_experts, stream);
    default:
      return launch_backward<32>(select, probs_TE, grad_probs_TE, expert_N, weight_N, grad_weight_N,
                                 offsets_T1, grad_logits_TE, num_tokens, num_experts, stream);
  }
}

}  // namespace mole::kernels::cuda
