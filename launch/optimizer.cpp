// AdamW, schedules and clipping (see optimizer.h).
#include "launch/optimizer.h"

#include <ATen/ATen.h>

#include <cmath>

#include "kernels/check.h"
#include "parallel/gradient_reduction.h"

namespace mole::launch {

AdamW::AdamW(std::vector<moe::NamedTensor> params, AdamWOptions options)
    : params_(std::move(params)), options_(options) {
  for (const auto& [name, p] : params_) {
    MOLE_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble,
               "optimizer: trainable tensor '", name, "' must be float32 (or float64), got ",
               p.scalar_type());
    lr_scale_.push_back(name.find("lora_B") != std::string::npos ? options_.lora_plus_ratio : 1.0);
    exp_avg_.push_back(at::zeros_like(p));
    exp_avg_sq_.push_back(at::zeros_like(p));
  }
}

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  ++step_;
  const double bias1 = 1.0 - std::pow(options_.beta1, static_cast<double>(step_));
  const double bias2 = 1.0 - std::pow(options_.beta2, static_cast<double>(step_));
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor p = params_[i].second;
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
    const double step_lr = lr * lr_scale_[i];
    if (options_.weight_decay > 0.0) p.mul_(1.0 - step_lr * options_.weight_decay);
    exp_avg_[i].mul_(options_.beta1).add_(g, 1.0 - options_.beta1);
    exp_avg_sq_[i].mul_(options_.beta2).addcmul_(g, g, 1.0 - options_.beta2);
    at::Tensor denom = (exp_avg_sq_[i] / bias2).sqrt_().add_(options_.eps);
    p.addcdiv_(exp_avg_[i], denom, -step_lr / bias1);
  }
}

void AdamW::zero_grad() {
  for (auto& [name, p] : params_) {
    if (p.grad().defined()) p.mutable_grad() = at::Tensor();
  }
}

double learning_rate(const std::string& schedule, double lr, int64_t step, int64_t warmup,
                     int64_t total) {
  if (step < warmup) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  if (schedule == "constant") return lr;
  const double span = static_cast<double>(std::max<int64_t>(1, total - warmup));
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / span);
  if (schedule == "linear") return lr * (1.0 - progress);
  if (schedule == "cosine") return lr * 0.5 * (1.0 + std::cos(M_PI * progress));
  MOLE_FAIL("unknown schedule '", schedule, "' (allowed: constant, linear, cosine)");
}

double global_grad_norm(const std::vector<moe::NamedTensor>& params) {
  std::vector<at::Tensor> tensors;
  for (const auto& [name, p] : params) tensors.push_back(p);
  // Device -> host sync: the norm decides skipping and clipping.
  return std::sqrt(parallel::grad_squared_sum(tensors));
}

void clip_grad_norm(const std::vector<moe::NamedTensor>& params, double max_norm, double norm) {
  if (max_norm <= 0.0 || !(norm > max_norm)) return;
  at::NoGradGuard no_grad;
  const double factor = max_norm / (norm + 1e-6);
  for (const auto& [name, p] : params) {
    if (p.grad().defined()) p.grad().mul_(factor);
  }
}

}  // namespace mole::launch
