// ParallelDims validation and the construction of the EP and EDP groups.
#include "dist/process_grid.h"

#include <ATen/ATen.h>

#include <string>

#include "kernels/check.h"

namespace mole::dist {

void ParallelDims::validate(int64_t num_experts_or_0) const {
  MOLE_CHECK(world >= 1, "world size ", world, " must be at least 1");
  MOLE_CHECK(ep >= 1, "parallel.ep = ", ep, " must be at least 1");
  MOLE_CHECK(world % ep == 0, "world size ", world, " is not divisible by parallel.ep = ", ep);
  MOLE_CHECK(num_experts_or_0 >= 0, "expert count ", num_experts_or_0, " is negative");
  if (num_experts_or_0 >= ep) {
    MOLE_CHECK(num_experts_or_0 % ep == 0, num_experts_or_0, " experts cannot be split over ",
               "parallel.ep = ", ep, " (use a multiple of ", ep, " experts, or fewer than ", ep,
               " to replicate them)");
  }
}

ProcessGrid::ProcessGrid(const ParallelDims& dims, std::shared_ptr<Communicator> world)
    : dims_(dims), world_(std::move(world)) {
  MOLE_CHECK(world_ != nullptr, "ProcessGrid: no world communicator");
  std::string local_error;
  try {
    dims_.validate();
    MOLE_CHECK(dims_.world == world_->size(), "ParallelDims.world = ", dims_.world, " but ",
               world_->describe(), " has ", world_->size(), " ranks");
  } catch (const Error& e) {
    local_error = e.what();
  }
  // Sync point: one all_reduce, so that a layout that is wrong on some ranks, or differs between
  // ranks, fails on all of them here instead of leaving the others waiting in a split.
  // Max of (ep, -ep, failed) gives the largest and the smallest ep and whether any rank failed.
  at::Tensor verdict =
      at::tensor({int64_t{dims_.ep}, -int64_t{dims_.ep}, int64_t{!local_error.empty()}}, at::kLong);
  world_->all_reduce(verdict, ReduceOp::kMax)->wait();
  MOLE_CHECK(local_error.empty(), "ProcessGrid: ", local_error);
  MOLE_CHECK(verdict[2].item<int64_t>() == 0,
             "ProcessGrid: the parallel layout is invalid on another rank (see its error)");
  const int64_t ep_max = verdict[0].item<int64_t>();
  const int64_t ep_min = -verdict[1].item<int64_t>();
  MOLE_CHECK(ep_min == ep_max, "ProcessGrid: parallel.ep differs between ranks (from ", ep_min,
             " to ", ep_max, "); rank ", rank(), " has ", dims_.ep);

  ep_ = world_->split(edp_rank(), rank(), "ep", world_->timeout_s());
  edp_ = world_->split(ep_rank(), rank(), "edp", world_->timeout_s());
  MOLE_CHECK(ep_->size() == dims_.ep && ep_->rank() == ep_rank(),
             "ProcessGrid: internal error: EP group has rank ", ep_->rank(), " of ", ep_->size(),
             ", expected ", ep_rank(), " of ", dims_.ep);
  MOLE_CHECK(edp_->size() == dims_.edp() && edp_->rank() == edp_rank(),
             "ProcessGrid: internal error: EDP group has rank ", edp_->rank(), " of ", edp_->size(),
             ", expected ", edp_rank(), " of ", dims_.edp());
}

}  // namespace mole::dist
