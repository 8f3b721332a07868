// CPU reference token permutation (see permute.h), and the registration of its CUDA twins
// (kernels/cuda/permute_ops.h): CUDA tensors take those when they are built.
#include "kernels/permute.h"

#include <ATen/ATen.h>

#include "kernels/check.h"
#include "kernels/cuda/permute_ops.h"

namespace mole::kernels {
namespace {

// Set by kernels/CMakeLists.txt when the CUDA kernels are compiled in. The CUDA wrappers are named
// only in `if constexpr` branches that this discards otherwise, so they need not exist then.
#ifdef MOLE_HAVE_CUDA_KERNELS
constexpr bool kCudaKernelsBuilt = true;
#else
constexpr bool kCudaKernelsBuilt = false;
#endif

}  // namespace

bool cuda_permute_kernels_built() { return kCudaKernelsBuilt; }

PermutePlan make_permute_plan(const at::Tensor& token_N, const at::Tensor& expert_N,
                              int64_t num_tokens, int64_t num_experts) {
  MOLE_CHECK(token_N.dim() == 1 && expert_N.dim() == 1 && token_N.size(0) == expert_N.size(0),
             "permute: token and expert lists must be 1-D of equal length, got ", token_N.sizes(),
             " and ", expert_N.sizes());
  MOLE_CHECK(token_N.scalar_type() == at::kLong && expert_N.scalar_type() == at::kLong,
             "permute: token and expert ids must be int64, got ", token_N.scalar_type(), " and ",
             expert_N.scalar_type());
  MOLE_CHECK(num_experts > 0 && num_tokens >= 0, "permute: need num_experts > 0, got ",
             num_experts);
  PermutePlan plan;
  plan.num_tokens = num_tokens;
  plan.num_experts = num_experts;
  const int64_t n = expert_N.size(0);
  plan.order_N = std::get<1>(at::sort(expert_N, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  plan.token_N = token_N.index_select(0, plan.order_N);
  plan.inverse_N = at::empty_like(plan.order_N);
  plan.inverse_N.index_put_({plan.order_N}, at::arange(n, plan.order_N.options()));
  // One sync point: the per-expert row counts (needed on the host to slice expert segments) and
  // the id ranges come over together. The counts are of clamped ids, so that an out-of-range id
  // reaches the range check below instead of failing inside bincount.
  const at::Tensor none = at::zeros({4}, expert_N.options());
  const at::Tensor ranges = n == 0 ? none
                                   : at::stack({expert_N.min(), expert_N.max(), token_N.min(),
                                                token_N.max()});
  const at::Tensor counts_E = at::bincount(expert_N.clamp(0, num_experts - 1), {}, num_experts);
  const at::Tensor host = at::cat({ranges, counts_E}).to(at::kCPU);
  const int64_t* v = host.data_ptr<int64_t>();
  const int64_t e_min = v[0], e_max = v[1], t_min = v[2], t_max = v[3];
  MOLE_CHECK(n == 0 || (e_min >= 0 && e_max < num_experts), "permute: expert id ",
             e_min < 0 ? e_min : e_max, " outside [0, ", num_experts, ")");
  MOLE_CHECK(n == 0 || (t_min >= 0 && t_max < num_tokens), "permute: token index ",
             t_min < 0 ? t_min : t_max, " outside [0, ", num_tokens, ")");
  plan.counts.assign(v + 4, v + 4 + num_experts);
  return plan;
}

at::Tensor permute_rows(const at::Tensor& x_TD, const PermutePlan& plan) {
  MOLE_CHECK(x_TD.dim() == 2 && x_TD.size(0) == plan.num_tokens, "permute_rows: expected x of [",
             plan.num_tokens, ", D], got ", x_TD.sizes());
  if constexpr (kCudaKernelsBuilt) {
    if (cuda_permute_supports(x_TD)) return permute_rows_cuda(x_TD, plan);
  }
  return x_TD.index_select(0, plan.token_N.to(x_TD.device()));
}

at::Tensor unpermute_combine(const at::Tensor& rows_ND, const PermutePlan& plan,
                             const at::Tensor& weight_N) {
  MOLE_CHECK(rows_ND.dim() == 2 && rows_ND.size(0) == plan.num_rows(),
             "unpermute_combine: expected rows of [", plan.num_rows(), ", D], got ",
             rows_ND.sizes());
  MOLE_CHECK(weight_N.dim() == 1 && weight_N.size(0) == plan.num_rows(),
             "unpermute_combine: expected ", plan.num_rows(), " weights, got ", weight_N.sizes());
  if constexpr (kCudaKernelsBuilt) {
    if (cuda_permute_supports(rows_ND)) return unpermute_combine_cuda(rows_ND, plan, weight_N);
  }
  at::Tensor order = plan.order_N.to(rows_ND.device());
  at::Tensor weight_sorted = weight_N.to(rows_ND.device(), rows_ND.scalar_type()).index_select(0, order);
  at::Tensor weighted_ND = rows_ND * weight_sorted.unsqueeze(1);
  at::Tensor out_TD = at::zeros({plan.num_tokens, rows_ND.size(1)}, rows_ND.options());
  return out_TD.index_add(0, plan.token_N.to(rows_ND.device()), weighted_ND);
}

}  // namespace mole::kernels
