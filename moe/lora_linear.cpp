// LoRA linear layer (see lora_linear.h).
#include "moe/lora_linear.h"

#include <ATen/ATen.h>

#include <cmath>

#include "kernels/check.h"
#include "moe/precision.h"
#include "moe/random.h"

namespace mole::moe {

double LoraOptions::scale() const {
  MOLE_CHECK(r > 0, "LoRA rank r must be positive, got ", r);
  return rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
}

LoraLinear::LoraLinear(at::Tensor weight_OI, at::Tensor bias_O)
    : weight_OI_(std::move(weight_OI)), bias_O_(std::move(bias_O)) {
  MOLE_CHECK(weight_OI_.dim() == 2, "linear weight must be 2-D, got ", weight_OI_.sizes());
  MOLE_CHECK(!bias_O_.defined() || (bias_O_.dim() == 1 && bias_O_.size(0) == weight_OI_.size(0)),
             "linear bias must be [", weight_OI_.size(0), "], got ", bias_O_.sizes());
}

at::Tensor LoraLinear::forward_base(const at::Tensor& x_NI) const {
  return at::linear(x_NI, weight_OI_, bias_O_);
}

at::Tensor LoraLinear::lora_delta(const at::Tensor& x_NI, bool training,
                                  const std::optional<at::Generator>& gen) const {
  const LoraWeights& lora = *lora_;
  const at::ScalarType dtype = lora_compute_dtype(x_NI.scalar_type(), lora.a_rI.scalar_type());
  at::Tensor x = x_NI.to(dtype);
  if (training && lora.dropout > 0.0) {
    x = dropout(x, lora.dropout, require_generator(gen, "LoRA dropout"));
  }
  return at::linear(at::linear(x, lora.a_rI.to(dtype)), lora.b_Or.to(dtype)).mul(lora.scale);
}

at::Tensor LoraLinear::forward(const at::Tensor& x_NI, bool training,
                               const std::optional<at::Generator>& gen) const {
  at::Tensor y = forward_base(x_NI);
  if (!lora_) return y;
  return y + lora_delta(x_NI, training, gen).to(y.scalar_type());
}

void LoraLinear::init_lora(const LoraOptions& options, const at::Generator& gen) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_features()));
  at::TensorOptions opts = weight_OI_.options().dtype(adapter_dtype(weight_OI_.scalar_type()));
  at::Tensor a = at::empty({options.r, in_features()}, opts.device(at::kCPU));
  a.uniform_(-bound, bound, gen);
  at::Tensor b = at::zeros({out_features(), options.r}, opts);
  set_lora(a, b, options.scale(), options.dropout, "initialised LoRA");
}

void LoraLinear::set_lora(const at::Tensor& a_rI, const at::Tensor& b_Or, double scale,
                          double dropout, const std::string& what) {
  MOLE_CHECK(a_rI.dim() == 2 && a_rI.size(1) == in_features(), what, ": lora_A must be [r, ",
             in_features(), "], got ", a_rI.sizes());
  MOLE_CHECK(b_Or.dim() == 2 && b_Or.size(0) == out_features(), what, ": lora_B must be [",
             out_features(), ", r], got ", b_Or.sizes());
  MOLE_CHECK(a_rI.size(0) == b_Or.size(1), what, ": lora_A has rank ", a_rI.size(0),
             " but lora_B has rank ", b_Or.size(1));
  MOLE_CHECK(dropout >= 0.0 && dropout < 1.0, what, ": LoRA dropout must be in [0, 1), got ",
             dropout);
  at::TensorOptions opts = weight_OI_.options().dtype(adapter_dtype(weight_OI_.scalar_type()));
  LoraWeights lora;
  lora.a_rI = a_rI.detach().to(opts, /*non_blocking=*/false, /*copy=*/true).requires_grad_(true);
  lora.b_Or = b_Or.detach().to(opts, /*non_blocking=*/false, /*copy=*/true).requires_grad_(true);
  lora.scale = scale;
  lora.dropout = dropout;
  lora_ = std::move(lora);
}

}  // namespace mole::moe
