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

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  ++step_;
  const double bias1 = 1.0 - std::pow(options_.beta1, static_cast<double>(step_));
  const double bias2 = 1.0 - std::pow(options_.beta2, static_cast<double>(step_));
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor p = params_[i].tensor;
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
    const double step_lr = lr * params_[i].lr_scale;
    if (params_[i].weight_decay > 0.0) p.mul_(1.0 - step_lr * params_[i].weight_decay);
    exp_avg_[i].mul_(options_.beta1).add_(g, 1.0 - options_.beta1);
    exp_avg_sq_[i].mul_(options_.beta2).addcmul_(g, g, 1.0 - options_.beta2);
    at::Tensor denom = (exp_avg_sq_[i] / bias2).sqrt_().add_(options_.eps);
    p.addcdiv_(exp_avg_[i], denom, -step_lr / bias1);
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

void clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm, double norm) {
  if (max_norm <= 0.0 || !(norm > max_norm)) return;
  at::NoGradGuard no_grad;
  const double factor = max_norm / (norm + 1e-6);
  for (const at::Tensor& p : params) {
    if (p.grad().defined()) p.grad().mul_(factor);
  }
}

}  // namespace mole::parallel
