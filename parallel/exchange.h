// Differentiable collectives for expert parallelism: the uneven all-to-all of rows whose backward
// is the same exchange with the splits swapped, and the all-gather of flat tensors whose backward
// is a reduce-scatter. They run on any Communicator; tensors on another device than the
// communicator's are staged through it.
//
// Legend: n rows sent, R rows received, P ranks of the group, L elements per rank.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <vector>

namespace mole::dist {
class Communicator;
}

namespace mole::parallel {

// Bytes this rank sent to other ranks of the group (itself excluded), forward and backward.
struct Traffic {
  std::atomic<int64_t> bytes_sent{0};
  void reset() { bytes_sent = 0; }
};

// rows_nD -> rows_RD: send_rows[p] rows go to rank p and recv_rows[p] come from it, in rank
// order (see Communicator::all_to_all). Differentiable: the backward exchanges the gradient with
// send and recv swapped. Blocking; collective over `comm`, also in the backward. `traffic` (may
// be null) must outlive the autograd graph, as must `comm`.
at::Tensor exchange_rows(dist::Communicator& comm, const at::Tensor& rows_nD,
                         const std::vector<int64_t>& send_rows,
                         const std::vector<int64_t>& recv_rows, Traffic* traffic = nullptr);

// flat_L -> all_PL: every rank's flat tensor, in rank order. Differentiable: the backward sums
// the gradient over the group and gives each rank its own slice (reduce-scatter). Blocking;
// collective, also in the backward.
at::Tensor all_gather_flat(dist::Communicator& comm, const at::Tensor& flat_L,
                           Traffic* traffic = nullptr);

// The counts of an uneven exchange: counts_PE[p * e + j] rows for local expert j of rank p go
// out; returns in the same layout what every rank sends here. int64 on the host. Blocking;
// collective (no gradient).
std::vector<int64_t> exchange_counts(dist::Communicator& comm, const std::vector<int64_t>& counts);

}  // namespace mole::parallel
