// ParallelDims validation (see parallel_dims.h).
#include "parallel/parallel_dims.h"

#include "kernels/check.h"

namespace mole::parallel {

ParallelDims::ParallelDims(const ParallelSizes& sizes) : sizes_(sizes) {
  const int world = sizes.world, ep = sizes.ep;
  MOLE_CHECK(world >= 1, "world size ", world, " must be at least 1");
  MOLE_CHECK(ep >= 1, "parallel.ep = ", ep, " must be at least 1");
  MOLE_CHECK(world % ep == 0, "world size ", world, " is not divisible by parallel.ep = ", ep);
  MOLE_CHECK(sizes.zero >= 0 && sizes.zero <= 2, "parallel.zero = ", sizes.zero,
             ": allowed values are 0 (off), 1 (optimizer state) and 2 (also gradients)");
  MOLE_CHECK(sizes.base_shard >= 0, "parallel.base_shard = ", sizes.base_shard,
             " must be 0 (off) or a number of ranks");
  MOLE_CHECK(sizes.base_shard == 0 || world % sizes.base_shard == 0, "world size ", world,
             " is not divisible by parallel.base_shard = ", sizes.base_shard);
}

void ParallelDims::check_experts(int64_t num_experts) const {
  const int ep = sizes_.ep;
  MOLE_CHECK(num_experts >= 0, "expert count ", num_experts, " is negative");
  if (num_experts >= ep) {
    MOLE_CHECK(num_experts % ep == 0, num_experts, " experts cannot be split over ",
               "parallel.ep = ", ep, " (use a multiple of ", ep, " experts, or fewer than ", ep,
               " to replicate them)");
  }
}

}  // namespace mole::parallel
