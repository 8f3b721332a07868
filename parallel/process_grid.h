// The process groups of a run, built in one place from its ParallelDims (DESIGN.md §4): the
// world, the expert-parallel (EP) groups of `ep` consecutive ranks and the expert-data-parallel
// (EDP) groups of ranks with the same ep_rank, and the base-shard groups.
#pragma once

#include <memory>

#include "dist/communicator.h"
#include "parallel/parallel_dims.h"

namespace mole::parallel {

class ProcessGrid {
 public:
  // Collective over `world`: every rank builds its grid at the same point with the same sizes.
  // The sizes are validated (ParallelDims) and compared across ranks at one sync point, so that a
  // layout that is invalid on some ranks, or differs between ranks, throws on every rank instead
  // of leaving the others waiting in a split. Then creates, in this order on every rank, the EP
  // group (color edp_rank) and the EDP group (color ep_rank), both ordered by world rank, with the
  // world's timeout.
  ProcessGrid(const ParallelSizes& sizes, std::shared_ptr<dist::Communicator> world);

  const ParallelDims& dims() const { return dims_; }
  int rank() const { return world_->rank(); }
  int ep_rank() const { return dims_.ep_rank(rank()); }
  int edp_rank() const { return dims_.edp_rank(rank()); }

  dist::Communicator& world() const { return *world_; }
  dist::Communicator& ep() const { return *ep_; }    // the ep consecutive ranks around this one
  dist::Communicator& edp() const { return *edp_; }  // the ranks with this rank's ep_rank
  // The base_shard consecutive ranks around this one that share one copy of the frozen base;
  // only with parallel.base_shard > 0 (created after EP and EDP).
  dist::Communicator& base() const;

 private:
  ParallelDims dims_;
  std::shared_ptr<dist::Communicator> world_;
  std::unique_ptr<dist::Communicator> ep_;
  std::unique_ptr<dist::Communicator> edp_;
  std::unique_ptr<dist::Communicator> base_;
};

}  // namespace mole::parallel
