// The construction of the EP and EDP groups (see process_grid.h).
#include "parallel/process_grid.h"

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "kernels/check.h"

namespace mole::parallel {
namespace {

// The validated dims, or the error that validation raised on this rank.
ParallelDims checked_dims(const ParallelSizes& sizes, const dist::Communicator& world,
                          std::string& error) {
  try {
    ParallelDims dims(sizes);
    MOLE_CHECK(sizes.world == world.size(), "ParallelDims.world = ", sizes.world, " but ",
               world.describe(), " has ", world.size(), " ranks");
    return dims;
  } catch (const Error& e) {
    error = e.what();
  }
  return ParallelDims(1, 1);  // never used: the caller throws
}

}  // namespace

ProcessGrid::ProcessGrid(const ParallelSizes& sizes, std::shared_ptr<dist::Communicator> world)
    : dims_(1, 1), world_(std::move(world)) {
  MOLE_CHECK(world_ != nullptr, "ProcessGrid: no world communicator");
  std::string local_error;
  dims_ = checked_dims(sizes, *world_, local_error);
  // Sync point: one all_reduce. Max of (ep, -ep, failed) gives the largest and the smallest ep and
  // whether any rank failed.
  at::Tensor verdict =
      at::tensor({int64_t{sizes.ep}, -int64_t{sizes.ep}, int64_t{!local_error.empty()}}, at::kLong)
          .to(world_->tensor_device());
  world_->all_reduce(verdict, dist::ReduceOp::kMax)->wait();
  verdict = verdict.cpu();
  MOLE_CHECK(local_error.empty(), "ProcessGrid: ", local_error);
  MOLE_CHECK(verdict[2].item<int64_t>() == 0,
             "ProcessGrid: the parallel layout is invalid on another rank (see its error)");
  const int64_t ep_max = verdict[0].item<int64_t>();
  const int64_t ep_min = -verdict[1].item<int64_t>();
  MOLE_CHECK(ep_min == ep_max, "ProcessGrid: parallel.ep differs between ranks (from ", ep_min,
             " to ", ep_max, "); rank ", rank(), " has ", sizes.ep);

  ep_ = world_->split(edp_rank(), rank(), "ep", world_->timeout_s());
  edp_ = world_->split(ep_rank(), rank(), "edp", world_->timeout_s());
  MOLE_CHECK(ep_->size() == dims_.ep() && ep_->rank() == ep_rank(),
             "ProcessGrid: internal error: EP group has rank ", ep_->rank(), " of ", ep_->size(),
             ", expected ", ep_rank(), " of ", dims_.ep());
  MOLE_CHECK(edp_->size() == dims_.edp() && edp_->rank() == edp_rank(),
             "ProcessGrid: internal error: EDP group has rank ", edp_->rank(), " of ", edp_->size(),
             ", expected ", edp_rank(), " of ", dims_.edp());
  // Frozen-base sharding: groups of base_shard consecutive ranks.
  if (dims_.base_shard() > 0) {
    base_ = world_->split(rank() / dims_.base_shard(), rank(), "base", world_->timeout_s());
  }
}

dist::Communicator& ProcessGrid::base() const {
  MOLE_CHECK(base_ != nullptr, "ProcessGrid: parallel.base_shard is off; there is no base-shard group");
  return *base_;
}

}  // namespace mole::parallel
