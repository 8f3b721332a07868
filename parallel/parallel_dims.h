// The parallel layout (DESIGN.md §4) as one value object, validated once, on construction.
//
// Every rank is a data-parallel replica (dp = world). The world is cut into expert-parallel (EP)
// groups of `ep` consecutive ranks that share one set of experts; each expert is replicated over
// edp = world / ep ranks, one per EP group. `zero` is the optimizer-sharding stage (0, 1, 2) over
// each trainable tensor's replica group; `base_shard` (0 = off) cuts the world into groups of
// that many consecutive ranks that each hold 1/base_shard of every frozen base tensor.
#pragma once

#include <cstdint>

namespace mole::parallel {

// The numbers a run asks for (config keys parallel.ep, parallel.zero, parallel.base_shard and the
// number of ranks mpirun started), before any check.
struct ParallelSizes {
  int world = 1;
  int ep = 1;
  int zero = 0;
  int base_shard = 0;
};

class ParallelDims {
 public:
  // Throws mole::Error naming the numbers and the config key: world >= 1; ep >= 1 dividing the
  // world; zero in {0, 1, 2}; base_shard 0 or a divisor of the world.
  explicit ParallelDims(const ParallelSizes& sizes);
  ParallelDims(int world, int ep, int zero = 0, int base_shard = 0)
      : ParallelDims(ParallelSizes{world, ep, zero, base_shard}) {}

  int world() const { return sizes_.world; }
  int ep() const { return sizes_.ep; }
  int zero() const { return sizes_.zero; }
  int base_shard() const { return sizes_.base_shard; }

  int dp() const { return sizes_.world; }
  int edp() const { return sizes_.world / sizes_.ep; }
  int ep_rank(int rank) const { return rank % sizes_.ep; }
  int edp_rank(int rank) const { return rank / sizes_.ep; }

  // The experts of a site split evenly over ep (a site with fewer experts than ep is replicated
  // instead, which is allowed). Throws naming the numbers.
  void check_experts(int64_t num_experts) const;

 private:
  ParallelSizes sizes_;
};

}  // namespace mole::parallel
