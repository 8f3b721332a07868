// The expert-parallel Dispatcher (see expert_dispatcher.h).
#include "parallel/expert_dispatcher.h"

#include <ATen/ATen.h>

#include <numeric>

#include "dist/communicator.h"
#include "parallel/parallel_dims.h"
#include "kernels/check.h"

namespace mole::parallel {

moe::ExpertShard place_experts(int64_t num_experts, int ep, int ep_rank) {
  MOLE_CHECK(num_experts > 0, "a site needs at least one expert, got ", num_experts);
  ParallelDims(ep, ep).check_experts(num_experts);
  if (ep == 1 || num_experts < ep) return {0, num_experts, num_experts};
  const int64_t e = num_experts / ep;
  return {ep_rank * e, e, num_experts};
}

ExpertParallelDispatcher::ExpertParallelDispatcher(dist::Communicator& ep,
                                                   std::map<std::string, moe::DispatchMode> modes)
    : ep_(ep), modes_(std::move(modes)) {}

moe::ExpertShard ExpertParallelDispatcher::shard(int64_t num_experts) const {
  return place_experts(num_experts, ep_.size(), ep_.rank());
}

moe::DispatchMode ExpertParallelDispatcher::mode(const std::string& site) const {
  auto it = modes_.find(site);
  MOLE_CHECK(it != modes_.end(), "no dispatch mode was chosen for MoE site '", site, "'");
  return it->second;
}

moe::Dispatched ExpertParallelDispatcher::dispatch(const at::Tensor& x_TD,
                                                   const kernels::PermutePlan& plan) const {
  const int64_t P = ep_.size();
  const int64_t E = plan.num_experts;
  const moe::ExpertShard mine = shard(E);
  MOLE_CHECK(!mine.is_full() || P == 1, "dispatch: a replicated site (", E,
             " experts over parallel.ep = ", P, ") runs locally");
  const int64_t e = mine.count;
  auto handle = std::make_shared<moe::DispatchHandle>();
  handle->plan = plan;
  // Rows for rank p are the plan's rows of experts [p e, (p + 1) e): contiguous, in expert order.
  handle->send_rows.assign(static_cast<size_t>(P), 0);
  for (int64_t g = 0; g < E; ++g) handle->send_rows[static_cast<size_t>(g / e)] += plan.counts[static_cast<size_t>(g)];
  // Sync point: every rank learns how many rows of each of its experts every peer sends.
  const std::vector<int64_t> recv_PE = exchange_counts(ep_, plan.counts);
  handle->recv_rows.assign(static_cast<size_t>(P), 0);
  handle->local_counts.assign(static_cast<size_t>(e), 0);
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t j = 0; j < e; ++j) {
      const int64_t c = recv_PE[static_cast<size_t>(p * e + j)];
      handle->recv_rows[static_cast<size_t>(p)] += c;
      handle->local_counts[static_cast<size_t>(j)] += c;
    }
  }
  // Received rows come by source rank, then by local expert; regroup them by local expert (then
  // source rank), so that each expert's rows are one segment.
  // Segment (p, j) of the received rows starts at start_PE[p e + j].
  std::vector<int64_t> start_PE(recv_PE.size(), 0);
  for (size_t s = 1; s < recv_PE.size(); ++s) start_PE[s] = start_PE[s - 1] + recv_PE[s - 1];
  std::vector<int64_t> regroup;
  for (int64_t j = 0; j < e; ++j) {
    for (int64_t p = 0; p < P; ++p) {
      const size_t s = static_cast<size_t>(p * e + j);
      for (int64_t k = 0; k < recv_PE[s]; ++k) regroup.push_back(start_PE[s] + k);
    }
  }
  std::vector<int64_t> ungroup(regroup.size());
  for (size_t i = 0; i < regroup.size(); ++i) ungroup[static_cast<size_t>(regroup[i])] = static_cast<int64_t>(i);
  handle->regroup_R = at::tensor(regroup, at::kLong).to(x_TD.device());
  handle->ungroup_R = at::tensor(ungroup, at::kLong).to(x_TD.device());

  at::Tensor received_RD = exchange_rows(ep_, kernels::permute_rows(x_TD, plan), handle->send_rows,
                                         handle->recv_rows, &traffic_);
  moe::Dispatched out;
  out.rows_RD = received_RD.index_select(0, handle->regroup_R);
  out.handle = std::move(handle);
  return out;
}

at::Tensor ExpertParallelDispatcher::return_rows(const at::Tensor& rows_RO,
                                                 const moe::DispatchHandle& handle) const {
  MOLE_CHECK(rows_RO.dim() == 2 && rows_RO.size(0) == handle.regroup_R.size(0),
             "return_rows: expected one row per received row (", handle.regroup_R.size(0),
             "), got ", rows_RO.sizes());
  at::Tensor by_source_RO = rows_RO.index_select(0, handle.ungroup_R.to(rows_RO.device()));
  return exchange_rows(ep_, by_source_RO, handle.recv_rows, handle.send_rows, &traffic_);
}

std::vector<at::Tensor> ExpertParallelDispatcher::gather_experts(
    const std::vector<at::Tensor>& local_stacks, int64_t num_experts) const {
  const int64_t P = ep_.size();
  const moe::ExpertShard mine = shard(num_experts);
  if (mine.is_full()) return local_stacks;
  std::vector<at::Tensor> flat;
  for (const at::Tensor& t : local_stacks) {
    MOLE_CHECK(t.dim() >= 1 && t.size(0) == mine.count, "gather_experts: expected stacks of ",
               mine.count, " experts, got ", t.sizes());
    flat.push_back(t.reshape({-1}));
  }
  // One collective for every stack of the site: [P, L] with each rank's stacks back to back.
  at::Tensor all_PL = all_gather_flat(ep_, at::cat(flat), &traffic_).view({P, -1});
  std::vector<at::Tensor> out;
  int64_t offset = 0;
  for (const at::Tensor& t : local_stacks) {
    const int64_t n = t.numel();
    std::vector<int64_t> shape = t.sizes().vec();
    shape[0] = num_experts;  // rank p's experts [p e, (p + 1) e) follow rank p - 1's
    out.push_back(all_PL.narrow(1, offset, n).reshape(shape));
    offset += n;
  }
  return out;
}

}  // namespace mole::parallel
