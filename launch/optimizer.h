// AdamW over the trainable tensors (LoRA, routers, experts: float32 whatever the base dtype, so
// they are their own float32 master copies), LoRA+ learning-rate ratio for B matrices, learning
// rate schedules, and global-norm gradient clipping.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "moe/llama.h"

namespace mole::launch {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double lora_plus_ratio = 1.0;  // lr multiplier for tensors whose name contains "lora_B"
};

// torch.optim.AdamW's update: p <- p (1 - lr wd); m, v moments; p <- p - lr m_hat/(sqrt(v_hat)+eps).
class AdamW {
 public:
  AdamW(std::vector<moe::NamedTensor> params, AdamWOptions options);
  // One update with base learning rate `lr`; tensors without a gradient are left alone.
  void step(double lr);
  void zero_grad();
  int64_t steps_taken() const { return step_; }
  const std::vector<moe::NamedTensor>& params() const { return params_; }
  // Moments of parameter i (for tests and checkpoints).
  const at::Tensor& exp_avg(size_t i) const { return exp_avg_[i]; }
  const at::Tensor& exp_avg_sq(size_t i) const { return exp_avg_sq_[i]; }

 private:
  std::vector<moe::NamedTensor> params_;
  std::vector<double> lr_scale_;
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;
  AdamWOptions options_;
  int64_t step_ = 0;
};

// Learning rate at 0-based `step` of `total` steps: linear warmup over `warmup` steps to `lr`
// (step s < warmup gives lr (s+1)/warmup), then constant, linear decay to 0 at `total`, or cosine
// decay to 0 at `total`.
double learning_rate(const std::string& schedule, double lr, int64_t step, int64_t warmup,
                     int64_t total);

// The L2 norm over every gradient (a device -> host sync); non-finite when any gradient is.
double global_grad_norm(const std::vector<moe::NamedTensor>& params);
// Scales every gradient by max_norm / norm when norm > max_norm (max_norm > 0).
void clip_grad_norm(const std::vector<moe::NamedTensor>& params, double max_norm, double norm);

}  // namespace mole::launch
