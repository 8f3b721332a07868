// AdamW over trainable tensors (LoRA, routers, experts: float32 whatever the base dtype, so they
// are their own float32 master copies), and the global-norm gradient clipping it is used with.
// Per-tensor learning-rate multipliers (LoRA+) and weight decay come from the parameter registry.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace mole::parallel {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
};

struct AdamWParam {
  std::string name;
  at::Tensor tensor;  // a leaf; its .grad() is read
  double lr_scale = 1.0;
  double weight_decay = 0.0;
};

// torch.optim.AdamW's update: p <- p (1 - lr wd); m, v moments; p <- p - lr m_hat/(sqrt(v_hat)+eps).
class AdamW {
 public:
  AdamW(std::vector<AdamWParam> params, AdamWOptions options);
  // One update with base learning rate `lr`; tensors without a gradient are left alone.
  void step(double lr);
  void zero_grad();
  int64_t steps_taken() const { return step_; }
  const std::vector<AdamWParam>& params() const { return params_; }
  // Moments of parameter i (for tests and checkpoints).
  const at::Tensor& exp_avg(size_t i) const { return exp_avg_[i]; }
  const at::Tensor& exp_avg_sq(size_t i) const { return exp_avg_sq_[i]; }
  // Restores the number of updates taken, and the moments of parameter i (copied; shapes
  // checked).
  void set_steps_taken(int64_t steps) { step_ = steps; }
  void restore(size_t i, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq);

 private:
  std::vector<AdamWParam> params_;
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;
  AdamWOptions options_;
  int64_t step_ = 0;
};

// torch.optim.AdamW's update of `p` in place from gradient `g`, with moments `m`, `v` (same shape
// as p; updated in place), learning rate `lr` (multiplier applied), weight decay, and `step` the
// 1-based number of this update. Element-wise: any slicing of p gives the same values.
void adamw_update(at::Tensor p, const at::Tensor& g, at::Tensor m, at::Tensor v, double lr,
                  double weight_decay, int64_t step, const AdamWOptions& options);

// What clipping scales the gradients by: max_norm / (norm + 1e-6) when norm > max_norm > 0,
// else 1.
double clip_factor(double max_norm, double norm);

// The L2 norm over every defined gradient of `params` (a device -> host sync); non-finite when
// any gradient is.
double global_grad_norm(const std::vector<at::Tensor>& params);
// Scales every gradient by max_norm / norm when norm > max_norm (max_norm > 0).
void clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm, double norm);

}  // namespace mole::parallel
