// Gradient reduction over the world and EDP groups (see gradient_reduction.h).
#include "parallel/gradient_reduction.h"

#include <ATen/ATen.h>

#include <cmath>

#include "dist/communicator.h"
#include "parallel/parameter_registry.h"
#include "parallel/process_grid.h"

namespace mole::parallel {

double grad_squared_sum(const std::vector<at::Tensor>& params) {
  at::NoGradGuard no_grad;
  at::Tensor total;
  for (const at::Tensor& p : params) {
    if (!p.grad().defined()) continue;
    at::Tensor sq = p.grad().to(at::kDouble).pow(2).sum();
    total = total.defined() ? total + sq : sq;
  }
  return total.defined() ? total.item<double>() : 0.0;
}

void all_reduce_gradients(const std::vector<at::Tensor>& params, dist::Communicator& group,
                          int64_t bucket_elements) {
  at::NoGradGuard no_grad;
  size_t begin = 0;
  while (begin < params.size()) {
    size_t end = begin;
    int64_t elements = 0;
    while (end < params.size() &&
           (end == begin || elements + params[end].numel() <= bucket_elements)) {
      elements += params[end].numel();
      ++end;
    }
    std::vector<at::Tensor> grads;
    for (size_t i = begin; i < end; ++i) {
      at::Tensor p = params[i];
      if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
      grads.push_back(p.grad().reshape({-1}).to(group.tensor_device()));
    }
    at::Tensor flat = at::cat(grads);
    group.all_reduce(flat, dist::ReduceOp::kSum)->wait();
    int64_t offset = 0;
    for (size_t i = begin; i < end; ++i) {
      at::Tensor p = params[i];
      const int64_t n = p.numel();
      p.mutable_grad().copy_(flat.narrow(0, offset, n).view(p.sizes()));
      offset += n;
    }
    begin = end;
  }
}

GradientReducer::GradientReducer(const ProcessGrid& grid, const ParameterRegistry& registry)
    : grid_(grid),
      replicated_(registry.tensors(ReplicaGroup::kWorld)),
      expert_shards_(registry.tensors(ReplicaGroup::kExpertData)) {}

void GradientReducer::reduce() const {
  if (grid_.dims().world() > 1) all_reduce_gradients(replicated_, grid_.world());
  if (grid_.dims().edp() > 1) all_reduce_gradients(expert_shards_, grid_.edp());
}

double GradientReducer::global_norm() const {
  double total = grad_squared_sum(replicated_);
  if (!expert_shards_.empty()) {
    // The EP group holds every expert of the split sites exactly once.
    at::Tensor shards =
        at::tensor({grad_squared_sum(expert_shards_)}, at::kDouble).to(grid_.ep().tensor_device());
    grid_.ep().all_reduce(shards, dist::ReduceOp::kSum)->wait();
    total += shards.cpu().item<double>();
  }
  return std::sqrt(total);
}

}  // namespace mole::parallel
