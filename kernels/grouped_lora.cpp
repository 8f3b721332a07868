// CPU reference grouped LoRA with its own backward (see grouped_lora.h), and the registration of
// its CUDA twin (kernels/cuda/grouped_lora_ops.h): CUDA tensors of the dtypes it handles take that
// when it is built. Composing per-expert `narrow`/`select` views under autograd would make every
// expert's backward allocate and add a zero tensor of the full [N, I] input and [E, r, I] weight;
// this function writes each expert's gradient slice in place instead.
#include "kernels/grouped_lora.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "kernels/check.h"
#include "kernels/cuda/grouped_lora_ops.h"

namespace mole::kernels {
namespace {

// Set by kernels/CMakeLists.txt when the CUDA kernels are compiled in. The CUDA wrapper is named
// only in an `if constexpr` branch that this discards otherwise, so it need not exist then.
#ifdef MOLE_HAVE_CUDA_KERNELS
constexpr bool kCudaKernelsBuilt = true;
#else
constexpr bool kCudaKernelsBuilt = false;
#endif

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class GroupedLoraFunction : public torch::autograd::Function<GroupedLoraFunction> {
 public:
  // x_NI, a_ErI, b_EOr in one dtype; returns y_NO = scale * (x_e A_e^T) B_e^T per segment.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x_NI, const at::Tensor& a_ErI,
                               const at::Tensor& b_EOr, std::vector<int64_t> counts, double scale) {
    const int64_t num_experts = a_ErI.size(0);
    at::Tensor x = x_NI.contiguous();
    at::Tensor xa_Nr = at::empty({x.size(0), a_ErI.size(1)}, x.options());
    at::Tensor y_NO = at::empty({x.size(0), b_EOr.size(1)}, x.options());
    int64_t begin = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
      const int64_t rows = counts[static_cast<size_t>(e)];
      if (rows == 0) continue;
      at::Tensor xa = xa_Nr.narrow(0, begin, rows);
      at::mm_out(xa, x.narrow(0, begin, rows), a_ErI[e].t());
      at::Tensor y = y_NO.narrow(0, begin, rows);
      at::mm_out(y, xa, b_EOr[e].t());
      begin += rows;
    }
    y_NO.mul_(scale);
    ctx->save_for_backward({x, a_ErI, b_EOr, xa_Nr});
    ctx->saved_data["counts"] = counts;
    ctx->saved_data["scale"] = scale;
    return {y_NO};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &a_ErI = saved[1], &b_EOr = saved[2], &xa_Nr = saved[3];
    const std::vector<int64_t> counts = ctx->saved_data["counts"].toIntVector();
    const double scale = ctx->saved_data["scale"].toDouble();
    at::Tensor gy_NO = grad_outputs[0].contiguous().mul(scale);
    // Experts without rows keep zero gradients.
    at::Tensor gx_NI = at::empty_like(x);
    at::Tensor ga_ErI = at::zeros_like(a_ErI);
    at::Tensor gb_EOr = at::zeros_like(b_EOr);
    at::Tensor gxa_Nr = at::empty_like(xa_Nr);
    int64_t begin = 0;
    for (size_t e = 0; e < counts.size(); ++e) {
      const int64_t rows = counts[e];
      if (rows == 0) continue;
      at::Tensor gy = gy_NO.narrow(0, begin, rows);
      at::Tensor gxa = gxa_Nr.narrow(0, begin, rows);
      at::mm_out(gxa, gy, b_EOr[e]);                                  // [rows, r]
      at::Tensor gb = gb_EOr[e];
      at::mm_out(gb, gy.t(), xa_Nr.narrow(0, begin, rows));           // [O, r]
      at::Tensor ga = ga_ErI[e];
      at::mm_out(ga, gxa.t(), x.narrow(0, begin, rows));              // [r, I]
      at::Tensor gx = gx_NI.narrow(0, begin, rows);
      at::mm_out(gx, gxa, a_ErI[e]);                                  // [rows, I]
      begin += rows;
    }
    return {gx_NI, ga_ErI, gb_EOr, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

bool cuda_grouped_lora_kernels_built() { return kCudaKernelsBuilt; }

at::Tensor grouped_lora(const at::Tensor& x_NI, const at::Tensor& a_ErI, const at::Tensor& b_EOr,
                        const std::vector<int64_t>& counts, double scale) {
  MOLE_CHECK(a_ErI.dim() == 3 && b_EOr.dim() == 3 && a_ErI.size(0) == b_EOr.size(0) &&
                 a_ErI.size(1) == b_EOr.size(2),
             "grouped_lora: expected A [E, r, I] and B [E, O, r], got ", a_ErI.sizes(), " and ",
             b_EOr.sizes());
  MOLE_CHECK(a_ErI.scalar_type() == b_EOr.scalar_type() && a_ErI.device() == b_EOr.device(),
             "grouped_lora: A and B differ in dtype or device");
  const int64_t num_experts = a_ErI.size(0);
  MOLE_CHECK(static_cast<int64_t>(counts.size()) == num_experts, "grouped_lora: ", counts.size(),
             " counts for ", num_experts, " experts");
  MOLE_CHECK(x_NI.dim() == 2 && x_NI.size(1) == a_ErI.size(2), "grouped_lora: expected x of [N, ",
             a_ErI.size(2), "], got ", x_NI.sizes());
  int64_t total = 0;
  for (int64_t c : counts) {
    MOLE_CHECK(c >= 0, "grouped_lora: negative row count ", c);
    total += c;
  }
  MOLE_CHECK(total == x_NI.size(0), "grouped_lora: counts sum to ", total, " but x has ",
             x_NI.size(0), " rows");
  if constexpr (kCudaKernelsBuilt) {
    // bfloat16 rows stay bfloat16 there: the kernels read them with float32 weights directly.
    if (cuda_grouped_lora_supports(x_NI, a_ErI, b_EOr)) {
      return grouped_lora_cuda(x_NI, a_ErI, b_EOr, counts, scale);
    }
  }
  at::Tensor x = x_NI.to(a_ErI.scalar_type());
  return GroupedLoraFunction::apply(x, a_ErI, b_EOr, counts, scale)[0].to(x_NI.scalar_type());
}

}  // namespace mole::kernels
