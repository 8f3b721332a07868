// A frozen linear layer with an optional LoRA adapter, with PEFT's semantics:
//   y = x W^T + b + scale * dropout(x) A^T B^T,   A [r, in], B [out, r],
//   scale = alpha / r (rsLoRA: alpha / sqrt(r)).
// The base weight may be bf16; LoRA weights and their arithmetic stay float32 (PEFT casts the
// input to the LoRA dtype and the result back).
//
// Legend: I input features, O output features, r LoRA rank, N leading (token) dims.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace mole::moe {

struct LoraOptions {
  int64_t r = 16;
  double alpha = 32.0;
  bool rslora = false;
  double dropout = 0.0;

  double scale() const;  // alpha / r, or alpha / sqrt(r) with rsLoRA
};

struct LoraWeights {
  at::Tensor a_rI;  // trainable, float32
  at::Tensor b_Or;  // trainable, float32
  double scale = 1.0;
  double dropout = 0.0;
};

class LoraLinear {
 public:
  LoraLinear() = default;
  // weight_OI (and bias_O, if defined) are frozen.
  LoraLinear(at::Tensor weight_OI, at::Tensor bias_O);

  int64_t in_features() const { return weight_OI_.size(1); }
  int64_t out_features() const { return weight_OI_.size(0); }

  // x_NI -> y_NO. `training` enables dropout on the LoRA input, drawn from `gen` (required then,
  // when the dropout is not zero).
  at::Tensor forward(const at::Tensor& x_NI, bool training,
                     const std::optional<at::Generator>& gen = std::nullopt) const;
  // Only the base part W x + b (no LoRA).
  at::Tensor forward_base(const at::Tensor& x_NI) const;
  // Only the LoRA delta scale * B A dropout(x), in float32.
  at::Tensor lora_delta(const at::Tensor& x_NI, bool training,
                        const std::optional<at::Generator>& gen = std::nullopt) const;

  // A kaiming-uniform (PEFT's default: bound 1/sqrt(in)), B zero; drawn from `gen`.
  void init_lora(const LoraOptions& options, const at::Generator& gen);
  // Attach given weights (validated against the layer's shape; copied to float32 on the
  // layer's device and marked trainable). `what` names the source for error messages.
  void set_lora(const at::Tensor& a_rI, const at::Tensor& b_Or, double scale, double dropout,
                const std::string& what);
  bool has_lora() const { return lora_.has_value(); }
  const std::optional<LoraWeights>& lora() const { return lora_; }
  std::optional<LoraWeights>& lora() { return lora_; }

  at::Tensor& weight() { return weight_OI_; }
  at::Tensor& bias() { return bias_O_; }
  const at::Tensor& weight() const { return weight_OI_; }
  const at::Tensor& bias() const { return bias_O_; }

 private:
  at::Tensor weight_OI_;
  at::Tensor bias_O_;
  std::optional<LoraWeights> lora_;
};

}  // namespace mole::moe
