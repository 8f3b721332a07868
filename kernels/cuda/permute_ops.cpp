// Tensor-facing CUDA twins of the token permutation (see permute_ops.h): validation, then the
// launchers of permute_kernels.h inside autograd functions. The backward of the gather is the
// combine (weights 1) and the backward of the combine is the gather (scaled by the weights) plus
// row_dot for the weight gradient, as in the ATen reference of kernels/permute.cpp.
//
// Stream limitation: this file must compile against a CPU-only LibTorch (Debian's 1.13) as well as
// a CUDA one (PyTorch 2.x), so it includes no c10/cuda or ATen/cuda header and cannot ask for
// PyTorch's current stream. Everything is launched on the legacy default stream (stream 0), which
// is PyTorch's default stream: ordered with PyTorch's own work as long as the caller has not made
// another stream current (CUDAStreamGuard, a side stream). PyTorch's pool streams do not
// synchronise with stream 0, so under such a guard these kernels would race with that stream.
//
// Legend: T tokens, D features, N routed pairs (= rows).
#include "kernels/cuda/permute_ops.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "kernels/check.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops_util.h"
#include "kernels/cuda/permute_kernels.h"

namespace mole::kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool is_row_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16;
}

// The kernels' accumulation type: float64 for float64 rows, float32 otherwise.
at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The launchers' preconditions on each tensor handed to them; the callers have made them hold, so
// a failure here is a bug in this file, reported with the actual values.
void check_operand(const char* op, const char* name, const at::Tensor& t,
                   std::initializer_list<int64_t> sizes, at::ScalarType dtype, at::Device device) {
  MOLE_CHECK(t.sizes() == at::IntArrayRef(sizes), op, ": ", name, " has shape ", t.sizes(),
             ", expected ", at::IntArrayRef(sizes));
  MOLE_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(),
             ", expected ", dtype);
  MOLE_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), ", expected ", device);
  MOLE_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

// out_ND = x_TD[token_N] (times scale_N per row when defined).
void launch_gather(const at::Tensor& x_TD, const at::Tensor& token_N, const at::Tensor& scale_N,
                   const at::Tensor& out_ND) {
  const int64_t num_rows = token_N.size(0), dim = x_TD.size(1);
  const at::Device device = x_TD.device();
  const at::ScalarType dtype = x_TD.scalar_type();
  check_operand("gather_rows", "x", x_TD, {x_TD.size(0), dim}, dtype, device);
  check_operand("gather_rows", "token", token_N, {num_rows}, at::kLong, device);
  if (scale_N.defined()) {
    check_operand("gather_rows", "scale", scale_N, {num_rows}, acc_dtype(dtype), device);
  }
  check_operand("gather_rows", "out", out_ND, {num_rows, dim}, dtype, device);
  cuda::CurrentDevice current(device, "permute");
  MOLE_CUDA_CHECK(cuda::gather_rows(cuda::element_type(dtype, "permute"), x_TD.data_ptr(),
                                    token_N.data_ptr<int64_t>(),
                                    scale_N.defined() ? scale_N.data_ptr() : nullptr,
                                    out_ND.data_ptr(), num_rows, dim, cuda::kDefaultStream),
                  ::mole::detail::cat("gather_rows on ", device));
}

// Routing pairs grouped by token, for combine_rows: pairs_by_token_N (routing order within a
// token, by a stable sort) and offsets_T1 (each token's range; searchsorted, not bincount, so
// that nothing is copied to the host).
struct CombineIndex {
  at::Tensor pairs_by_token_N;
  at::Tensor offsets_T1;
};

CombineIndex make_combine_index(const at::Tensor& token_N, const at::Tensor& inverse_N,
                                int64_t num_tokens) {
  at::Tensor token_of_pair_N = token_N.index_select(0, inverse_N);
  auto sorted = at::sort(token_of_pair_N, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor offsets_T1 =
      at::searchsorted(std::get<0>(sorted), at::arange(num_tokens + 1, token_N.options()));
  return {std::get<1>(sorted).contiguous(), offsets_T1.contiguous()};
}

// y_TD[t] = sum over the pairs of t of weight * rows[row of the pair] (weights 1 when undefined).
void launch_combine(const at::Tensor& rows_ND, const at::Tensor& inverse_N,
                    const CombineIndex& index, const at::Tensor& weight_N, const at::Tensor& y_TD) {
  const int64_t num_rows = rows_ND.size(0), dim = rows_ND.size(1), num_tokens = y_TD.size(0);
  const at::Device device = rows_ND.device();
  const at::ScalarType dtype = rows_ND.scalar_type();
  check_operand("combine_rows", "rows", rows_ND, {num_rows, dim}, dtype, device);
  check_operand("combine_rows", "inverse", inverse_N, {num_rows}, at::kLong, device);
  check_operand("combine_rows", "pairs_by_token", index.pairs_by_token_N, {num_rows}, at::kLong,
                device);
  check_operand("combine_rows", "offsets", index.offsets_T1, {num_tokens + 1}, at::kLong, device);
  if (weight_N.defined()) {
    check_operand("combine_rows", "weight", weight_N, {num_rows}, acc_dtype(dtype), device);
  }
  check_operand("combine_rows", "y", y_TD, {num_tokens, dim}, dtype, device);
  cuda::CurrentDevice current(device, "permute");
  MOLE_CUDA_CHECK(
      cuda::combine_rows(cuda::element_type(dtype, "permute"), rows_ND.data_ptr(),
                         inverse_N.data_ptr<int64_t>(), index.pairs_by_token_N.data_ptr<int64_t>(),
                         index.offsets_T1.data_ptr<int64_t>(),
                         weight_N.defined() ? weight_N.data_ptr() : nullptr, y_TD.data_ptr(),
                         num_tokens, dim, cuda::kDefaultStream),
      ::mole::detail::cat("combine_rows on ", device));
}

// out_N[i] = <rows_ND[i], g_TD[token_N[i]]> in the accumulation type.
void launch_row_dot(const at::Tensor& rows_ND, const at::Tensor& g_TD, const at::Tensor& token_N,
                    const at::Tensor& out_N) {
  const int64_t num_rows = rows_ND.size(0), dim = rows_ND.size(1);
  const at::Device device = rows_ND.device();
  const at::ScalarType dtype = rows_ND.scalar_type();
  check_operand("row_dot", "rows", rows_ND, {num_rows, dim}, dtype, device);
  check_operand("row_dot", "g", g_TD, {g_TD.size(0), dim}, dtype, device);
  check_operand("row_dot", "token", token_N, {num_rows}, at::kLong, device);
  check_operand("row_dot", "out", out_N, {num_rows}, acc_dtype(dtype), device);
  cuda::CurrentDevice current(device, "permute");
  MOLE_CUDA_CHECK(cuda::row_dot(cuda::element_type(dtype, "permute"), rows_ND.data_ptr(),
                                g_TD.data_ptr(), token_N.data_ptr<int64_t>(), out_N.data_ptr(),
                                num_rows, dim, cuda::kDefaultStream),
                  ::mole::detail::cat("row_dot on ", device));
}

// x_TD -> rows_ND = x_TD[token_N]. Backward: grad_x[t] = sum of the grad rows of t's pairs.
class PermuteRowsFunction : public torch::autograd::Function<PermuteRowsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x_TD,
                               const at::Tensor& token_N, const at::Tensor& inverse_N) {
    at::Tensor rows_ND = at::empty({token_N.size(0), x_TD.size(1)}, x_TD.options());
    launch_gather(x_TD, token_N, at::Tensor(), rows_ND);
    ctx->save_for_backward({token_N, inverse_N});
    ctx->saved_data["num_tokens"] = x_TD.size(0);
    return {rows_ND};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &token_N = saved[0], &inverse_N = saved[1];
    const int64_t num_tokens = ctx->saved_data["num_tokens"].toInt();
    at::Tensor grad_rows_ND = grad_outputs[0].contiguous();
    at::Tensor grad_x_TD = at::empty({num_tokens, grad_rows_ND.size(1)}, grad_rows_ND.options());
    launch_combine(grad_rows_ND, inverse_N, make_combine_index(token_N, inverse_N, num_tokens),
                   at::Tensor(), grad_x_TD);
    return {grad_x_TD, at::Tensor(), at::Tensor()};
  }
};

// rows_ND, weight_N (routing order, rows' dtype) -> y_TD[t] = sum over t's pairs of w * row.
// Backward: grad_rows[i] = w_sorted[i] * grad_y[token[i]] (gather with scale) and
// grad_w[p] = <rows[inverse[p]], grad_y[token of p]> (row_dot, mapped to routing order).
class UnpermuteCombineFunction : public torch::autograd::Function<UnpermuteCombineFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& rows_ND,
                               const at::Tensor& weight_N, const at::Tensor& token_N,
                               const at::Tensor& order_N, const at::Tensor& inverse_N,
                               int64_t num_tokens) {
    // Exact for every supported dtype: bfloat16 widens to float32 without rounding.
    at::Tensor weight_acc_N = weight_N.to(acc_dtype(rows_ND.scalar_type())).contiguous();
    at::Tensor y_TD = at::empty({num_tokens, rows_ND.size(1)}, rows_ND.options());
    launch_combine(rows_ND, inverse_N, make_combine_index(token_N, inverse_N, num_tokens),
                   weight_acc_N, y_TD);
    ctx->save_for_backward({rows_ND, weight_acc_N, token_N, order_N, inverse_N});
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight_N.scalar_type());
    return {y_TD};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &rows_ND = saved[0], &weight_acc_N = saved[1], &token_N = saved[2],
                     &order_N = saved[3], &inverse_N = saved[4];
    const auto weight_dtype = static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt());
    at::Tensor grad_y_TD = grad_outputs[0].contiguous();
    at::Tensor grad_rows_ND, grad_weight_N;
    if (ctx->needs_input_grad(0)) {
      grad_rows_ND = at::empty_like(rows_ND);
      launch_gather(grad_y_TD, token_N, weight_acc_N.index_select(0, order_N), grad_rows_ND);
    }
    if (ctx->needs_input_grad(1)) {
      at::Tensor dot_sorted_N =
          at::empty({rows_ND.size(0)}, rows_ND.options().dtype(weight_acc_N.scalar_type()));
      launch_row_dot(rows_ND, grad_y_TD, token_N, dot_sorted_N);
      grad_weight_N = dot_sorted_N.index_select(0, inverse_N).to(weight_dtype);
    }
    return {grad_rows_ND, grad_weight_N, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The plan's index tensors on `device`, contiguous (copies only when they live elsewhere).
at::Tensor plan_index(const char* op, const char* name, const at::Tensor& index_N,
                      const PermutePlan& plan, at::Device device) {
  MOLE_CHECK(index_N.dim() == 1 && index_N.size(0) == plan.num_rows() &&
                 index_N.scalar_type() == at::kLong,
             op, ": plan.", name, " must be int64 of [", plan.num_rows(), "], got ",
             index_N.scalar_type(), " of ", index_N.sizes());
  return index_N.to(device).contiguous();
}

void check_rows_input(const char* op, const char* name, const at::Tensor& t) {
  MOLE_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  MOLE_CHECK(is_row_dtype(t.scalar_type()), op, ": ", name,
             " must be float32, float64 or bfloat16, got ", t.scalar_type());
}

}  // namespace

bool cuda_permute_supports(const at::Tensor& x) {
  return x.defined() && x.is_cuda() && is_row_dtype(x.scalar_type());
}

at::Tensor permute_rows_cuda(const at::Tensor& x_TD, const PermutePlan& plan) {
  const char* op = "permute_rows_cuda";
  check_rows_input(op, "x", x_TD);
  MOLE_CHECK(x_TD.dim() == 2 && x_TD.size(0) == plan.num_tokens, op, ": expected x of [",
             plan.num_tokens, ", D], got ", x_TD.sizes());
  const at::Device device = x_TD.device();
  return PermuteRowsFunction::apply(x_TD.contiguous(),
                                    plan_index(op, "token_N", plan.token_N, plan, device),
                                    plan_index(op, "inverse_N", plan.inverse_N, plan, device))[0];
}

at::Tensor unpermute_combine_cuda(const at::Tensor& rows_ND, const PermutePlan& plan,
                                  const at::Tensor& weight_N) {
  const char* op = "unpermute_combine_cuda";
  check_rows_input(op, "rows", rows_ND);
  MOLE_CHECK(rows_ND.dim() == 2 && rows_ND.size(0) == plan.num_rows(), op, ": expected rows of [",
             plan.num_rows(), ", D], got ", rows_ND.sizes());
  MOLE_CHECK(weight_N.dim() == 1 && weight_N.size(0) == plan.num_rows(), op, ": expected ",
             plan.num_rows(), " weights, got ", weight_N.sizes());
  MOLE_CHECK(at::isFloatingType(weight_N.scalar_type()), op,
             ": weights must be floating point, got ", weight_N.scalar_type());
  const at::Device device = rows_ND.device();
  // As in the ATen path, weights are cast to the rows' dtype (differentiably, outside the
  // function, so that their gradient comes back in their own dtype).
  return UnpermuteCombineFunction::apply(
      rows_ND.contiguous(), weight_N.to(device, rows_ND.scalar_type()),
      plan_index(op, "token_N", plan.token_N, plan, device),
      plan_index(op, "order_N", plan.order_N, plan, device),
      plan_index(op, "inverse_N", plan.inverse_N, plan, device), plan.num_tokens)[0];
}

}  // namespace mole::kernels
