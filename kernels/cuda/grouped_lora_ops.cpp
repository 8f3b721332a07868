// Tensor-facing CUDA twin of grouped_lora (see grouped_lora_ops.h): validation, then the launchers
// of grouped_lora_kernels.h inside an autograd function. The forward runs shrink then expand and
// keeps x, the weights and xa = x A_e^T (in the accumulation type) for the backward, which runs
// the backward launcher.
//
// Stream limitation (as in permute_ops.cpp): this file must compile against a CPU-only LibTorch
// as well as a CUDA one, so it includes no c10/cuda or ATen/cuda header and cannot ask for
// PyTorch's current stream. Everything is launched on the legacy default stream (stream 0),
// PyTorch's default stream: ordered with PyTorch's own work as long as the caller has not made
// another stream current. The workspaces are PyTorch tensors freed when the call returns; the
// caching allocator hands their memory out again only to work ordered after ours on stream 0.
//
// Legend: N rows (grouped by expert), I in features, O out features, E experts, r LoRA rank.
#include "kernels/cuda/grouped_lora_ops.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "kernels/check.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/grouped_lora_kernels.h"
#include "kernels/cuda/ops_util.h"

namespace mole::kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool supported_pair(at::ScalarType rows, at::ScalarType weights) {
  return (rows == at::kFloat && weights == at::kFloat) ||
         (rows == at::kDouble && weights == at::kDouble) ||
         (rows == at::kBFloat16 && (weights == at::kFloat || weights == at::kBFloat16));
}

// The kernels' accumulation type: float64 for float64 rows, float32 otherwise.
at::ScalarType acc_dtype(at::ScalarType rows) {
  return rows == at::kDouble ? at::kDouble : at::kFloat;
}

// A workspace of at least `bytes` on `device` (undefined when 0); PyTorch allocations are
// 16-byte aligned or better.
at::Tensor workspace(size_t bytes, at::Device device) {
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions(device).dtype(at::kByte));
}

void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// The launchers' preconditions on each tensor handed to them; the callers have made them hold, so
// a failure here is a bug in this file, reported with the actual values.
void check_operand(const char* name, const at::Tensor& t, at::IntArrayRef sizes,
                   at::ScalarType dtype, at::Device device) {
  MOLE_CHECK(t.sizes() == sizes, "grouped_lora (CUDA): ", name, " has shape ", t.sizes(),
             ", expected ", sizes);
  MOLE_CHECK(t.scalar_type() == dtype, "grouped_lora (CUDA): ", name, " has dtype ",
             t.scalar_type(), ", expected ", dtype);
  MOLE_CHECK(t.device() == device, "grouped_lora (CUDA): ", name, " is on ", t.device(),
             ", expected ", device);
  MOLE_CHECK(t.is_contiguous(), "grouped_lora (CUDA): ", name, " must be contiguous, got strides ",
             t.strides());
}

// Sizes and types of one call, read off contiguous x_NI, a_ErI, b_EOr.
struct Problem {
  int64_t num_rows, in_features, out_features, rank, num_experts;
  at::ScalarType rows, weights;
  at::Device device;

  Problem(const at::Tensor& x_NI, const at::Tensor& a_ErI, const at::Tensor& b_EOr)
      : num_rows(x_NI.size(0)),
        in_features(a_ErI.size(2)),
        out_features(b_EOr.size(1)),
        rank(a_ErI.size(1)),
        num_experts(a_ErI.size(0)),
        rows(x_NI.scalar_type()),
        weights(a_ErI.scalar_type()),
        device(x_NI.device()) {}

  void check_inputs(const at::Tensor& x_NI, const at::Tensor& a_ErI, const at::Tensor& b_EOr,
                    const at::Tensor& xa_Nr, const at::Tensor& offsets_E1) const {
    check_operand("x", x_NI, {num_rows, in_features}, rows, device);
    check_operand("A", a_ErI, {num_experts, rank, in_features}, weights, device);
    check_operand("B", b_EOr, {num_experts, out_features, rank}, weights, device);
    check_operand("xa", xa_Nr, {num_rows, rank}, acc_dtype(rows), device);
    check_operand("offsets", offsets_E1, {num_experts + 1}, at::kLong, device);
  }
};

// x_NI, a_ErI, b_EOr, offsets_E1 (contiguous, on one device) -> y_NO = scale * (x_e A_e^T) B_e^T.
class GroupedLoraCudaFunction : public torch::autograd::Function<GroupedLoraCudaFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x_NI,
                               const at::Tensor& a_ErI, const at::Tensor& b_EOr,
                               const at::Tensor& offsets_E1, double scale) {
    const Problem p(x_NI, a_ErI, b_EOr);
    at::Tensor xa_Nr = at::empty({p.num_rows, p.rank}, x_NI.options().dtype(acc_dtype(p.rows)));
    at::Tensor y_NO = at::empty({p.num_rows, p.out_features}, x_NI.options());
    p.check_inputs(x_NI, a_ErI, b_EOr, xa_Nr, offsets_E1);
    check_operand("y", y_NO, {p.num_rows, p.out_features}, p.rows, p.device);
    const auto row_type = cuda::element_type(p.rows, "grouped_lora"),
               weight_type = cuda::element_type(p.weights, "grouped_lora");
    at::Tensor ws = workspace(
        cuda::grouped_lora_shrink_workspace_bytes(row_type, p.num_rows, p.in_features, p.rank),
        p.device);
    cuda::CurrentDevice current(p.device, "grouped_lora");
    MOLE_CUDA_CHECK(cuda::grouped_lora_shrink(
                        row_type, weight_type, x_NI.data_ptr(), a_ErI.data_ptr(),
                        offsets_E1.data_ptr<int64_t>(), xa_Nr.data_ptr(), data_or_null(ws),
                        p.num_rows, p.in_features, p.rank, p.num_experts, cuda::kDefaultStream),
                    ::mole::detail::cat("grouped_lora_shrink on ", p.device));
    MOLE_CUDA_CHECK(cuda::grouped_lora_expand(row_type, weight_type, xa_Nr.data_ptr(),
                                              b_EOr.data_ptr(), offsets_E1.data_ptr<int64_t>(),
                                              scale, y_NO.data_ptr(), p.num_rows, p.out_features,
                                              p.rank, p.num_experts, cuda::kDefaultStream),
                    ::mole::detail::cat("grouped_lora_expand on ", p.device));
    ctx->save_for_backward({x_NI, a_ErI, b_EOr, xa_Nr, offsets_E1});
    ctx->saved_data["scale"] = scale;
    return {y_NO};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x_NI = saved[0], &a_ErI = saved[1], &b_EOr = saved[2], &xa_Nr = saved[3],
                     &offsets_E1 = saved[4];
    const double scale = ctx->saved_data["scale"].toDouble();
    const Problem p(x_NI, a_ErI, b_EOr);
    p.check_inputs(x_NI, a_ErI, b_EOr, xa_Nr, offsets_E1);
    at::Tensor gy_NO = grad_outputs[0].to(p.rows).contiguous();
    check_operand("grad y", gy_NO, {p.num_rows, p.out_features}, p.rows, p.device);
    at::Tensor gx_NI = at::empty_like(x_NI), ga_ErI = at::empty_like(a_ErI),
               gb_EOr = at::empty_like(b_EOr);
    const auto row_type = cuda::element_type(p.rows, "grouped_lora");
    at::Tensor ws =
        workspace(cuda::grouped_lora_backward_workspace_bytes(
                      row_type, p.num_rows, p.in_features, p.out_features, p.rank, p.num_experts),
                  p.device);
    cuda::CurrentDevice current(p.device, "grouped_lora");
    MOLE_CUDA_CHECK(cuda::grouped_lora_backward(
                        row_type, cuda::element_type(p.weights, "grouped_lora"), gy_NO.data_ptr(),
                        x_NI.data_ptr(), a_ErI.data_ptr(), b_EOr.data_ptr(), xa_Nr.data_ptr(),
                        offsets_E1.data_ptr<int64_t>(), scale, gx_NI.data_ptr(), ga_ErI.data_ptr(),
                        gb_EOr.data_ptr(), data_or_null(ws), p.num_rows, p.in_features,
                        p.out_features, p.rank, p.num_experts, cuda::kDefaultStream),
                    ::mole::detail::cat("grouped_lora_backward on ", p.device));
    return {gx_NI, ga_ErI, gb_EOr, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

bool cuda_grouped_lora_supports(const at::Tensor& x_NI, const at::Tensor& a_ErI,
                                const at::Tensor& b_EOr) {
  return x_NI.defined() && x_NI.is_cuda() && a_ErI.device() == x_NI.device() &&
         b_EOr.device() == x_NI.device() && b_EOr.scalar_type() == a_ErI.scalar_type() &&
         supported_pair(x_NI.scalar_type(), a_ErI.scalar_type());
}

at::Tensor grouped_lora_cuda(const at::Tensor& x_NI, const at::Tensor& a_ErI,
                             const at::Tensor& b_EOr, const std::vector<int64_t>& counts,
                             double scale) {
  MOLE_CHECK(cuda_grouped_lora_supports(x_NI, a_ErI, b_EOr),
             "grouped_lora_cuda: expected CUDA x and weights on one device with dtypes (float32, "
             "float32), (float64, float64), (bfloat16, float32) or (bfloat16, bfloat16), got x ",
             x_NI.scalar_type(), " on ", x_NI.device(), ", A ", a_ErI.scalar_type(), " on ",
             a_ErI.device(), ", B ", b_EOr.scalar_type(), " on ", b_EOr.device());
  // Segment offsets (prefix sums of the counts), built on the host and copied to the device.
  std::vector<int64_t> offsets(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) offsets[e + 1] = offsets[e] + counts[e];
  // From pinned memory without waiting: a blocking copy would drain the device's queue.
  at::Tensor offsets_E1 =
      at::tensor(offsets, at::kLong).pin_memory().to(x_NI.device(), /*non_blocking=*/true);
  return GroupedLoraCudaFunction::apply(x_NI.contiguous(), a_ErI.contiguous(), b_EOr.contiguous(),
                                        offsets_E1, scale)[0];
}

}  // namespace mole::kernels
