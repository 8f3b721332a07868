// The parallel layout (DESIGN.md §4): ParallelDims, the one value object that describes it, and
// ProcessGrid, which builds the world, expert-parallel (EP) and expert-data-parallel (EDP) groups
// from it in one place.
#pragma once

#include <cstdint>
#include <memory>

#include "dist/communicator.h"

namespace mole::dist {

// Every rank is a data-parallel replica (dp = world). The world is cut into EP groups of `ep`
// consecutive ranks that share one set of experts; each expert is replicated over edp = world / ep
// ranks, one per EP group.
struct ParallelDims {
  int world = 1;
  int ep = 1;

  int dp() const { return world; }
  int edp() const { return world / ep; }
  int ep_rank(int rank) const { return rank % ep; }
  int edp_rank(int rank) const { return rank / ep; }

  // Throws mole::Error naming the numbers: world >= 1, 1 <= ep, world divisible by ep, and, when
  // num_experts_or_0 > 0, the experts of a site split evenly over ep. A site with fewer experts
  // than ep is allowed: it is replicated instead of split.
  void validate(int64_t num_experts_or_0 = 0) const;
};

class ProcessGrid {
 public:
  // Collective over `world`: every rank builds its grid at the same point with the same dims
  // (checked: dims that differ between ranks throw on every rank). Creates, in this order on
  // every rank, the EP group (color edp_rank) and the EDP group (color ep_rank), both ordered by
  // world rank, with the world's timeout.
  ProcessGrid(const ParallelDims& dims, std::shared_ptr<Communicator> world);

  const ParallelDims& dims() const { return dims_; }
  int rank() const { return world_->rank(); }
  int ep_rank() const { return dims_.ep_rank(rank()); }
  int edp_rank() const { return dims_.edp_rank(rank()); }

  Communicator& world() const { return *world_; }
  Communicator& ep() const { return *ep_; }    // the ep consecutive ranks around this one
  Communicator& edp() const { return *edp_; }  // the ranks with this rank's ep_rank

 private:
  ParallelDims dims_;
  std::shared_ptr<Communicator> world_;
  std::unique_ptr<Communicator> ep_;
  std::unique_ptr<Communicator> edp_;
};

}  // namespace mole::dist
