// AdamW and clipping (see adamw.h).
#include "parallel/adamw.h"

#include <ATen/ATen.h>

#include <cmath>

#include "kernels/check.h"
#include "parallel/gradient_reduction.h"

namespace mole::parallel {

AdamW::AdamW(std::vector<AdamWParam> params, AdamWOptions options)
    : params_(std::move(params)), options_(options) {
  for (const AdamWParam& p : params_) {
    MOLE_CHECK(p.tensor.scalar_type() == at::kFloat || p.tensor.scalar_type() == at::kDouble,
               "optimizer: trainable tensor '", p.name, "' must be float32 (or float64), got ",
               p.tensor.scalar_type());
    exp_avg_.push_back(at::zeros_like(p.tensor));
    exp_avg_sq_.push_back(at::zeros_like(p.tensor));
  }
}

void adamw_update(at::Tensor p, const at::Tensor& g, at::Tensor m, at::Tensor v, double lr,
                  double weight_decay, int64_t step, const AdamWOptions& options) {
  const double bias1 = 1.0 - std::pow(options.beta1, static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(options.beta2, static_cast<double>(step));
  if (weight_decay > 0.0) p.mul_(1.0 - lr * weight_decay);
  m.mul_(options.beta1).add_(g, 1.0 - options.beta1);
  v.mul_(options.beta2).addcmul_(g, g, 1.0 - options.beta2);
  at::Tensor denom = (v / bias2).sqrt_().add_(options.eps);
  p.addcdiv_(m, denom, -lr / bias1);
}

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  ++step_;
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& g = params_[i].tensor.grad();
    if (!g.defined()) continue;
    adamw_update(params_[i].tensor, g, exp_avg_[i], exp_avg_sq_[i], lr * params_[i].lr_scale,
                 params_[i].weight_decay, step_, options_);
  }
}

void AdamW::zero_grad() {
  for (AdamWParam& p : params_) {
    if (p.tensor.grad().defined()) p.tensor.mutable_grad() = at::Tensor();
  }
}

void AdamW::restore(size_t i, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq) {
  MOLE_CHECK(i < params_.size(), "optimizer state for parameter ", i, " of ", params_.size());
  MOLE_CHECK(exp_avg.sizes() == exp_avg_[i].sizes() && exp_avg_sq.sizes() == exp_avg_sq_[i].sizes(),
             "optimizer state of '", params_[i].name, "': moments ", exp_avg.sizes(), " / ",
             exp_avg_sq.sizes(), " for a tensor of ", exp_avg_[i].sizes());
  at::NoGradGuard no_grad;
  exp_avg_[i].copy_(exp_avg);
  exp_avg_sq_[i].copy_(exp_avg_sq);
}

double global_grad_norm(const std::vector<at::Tensor>& params) {
  // Device -> host sync: the norm decides skipping and clipping.
  return std::sqrt(grad_squared_sum(params));
}

double clip_factor(double max_norm, double norm) {
  return max_norm > 0.0 && norm > max_norm ? max_norm / (norm + 1e-6) : 1.0;
}

void clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm, double norm) {
  const double factor = clip_factor(max_norm, norm);
  if (factor == 1.0) return;
  at::NoGradGuard no_grad;
  for (const at::Tensor& p : params) {
    if (p.grad().defined()) p.grad().mul_(factor);
  }
}

}  // namespace mole::parallel
