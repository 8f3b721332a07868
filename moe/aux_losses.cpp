// Auxiliary router losses (see aux_losses.h).
#include "moe/aux_losses.h"

#include <ATen/ATen.h>

#include <limits>

#include "kernels/check.h"

namespace mole::moe {

namespace {

bool stats_defined(const RouterStats& s) {
  return s.pairs_E.defined() && s.prob_sum_E.defined() && s.z_sum.defined() &&
         s.entropy_sum.defined();
}

void check_stats(const RouterStats& s, const char* loss) {
  MOLE_CHECK(stats_defined(s), loss, ": RouterStats is empty (made by router_stats or a sum)");
}

// A zero of the stats' dtype that stays connected to the graph of `like`.
at::Tensor zero_like_graph(const at::Tensor& like) { return like.sum() * 0.0; }

}  // namespace

RouterStats RouterStats::operator+(const RouterStats& other) const {
  // A default-constructed stats is the identity, so that sums can start from RouterStats{}.
  if (!stats_defined(*this)) return other;
  if (!stats_defined(other)) return *this;
  MOLE_CHECK(pairs_E.size(0) == other.pairs_E.size(0), "cannot add router stats of ",
             pairs_E.size(0), " and ", other.pairs_E.size(0), " experts");
  RouterStats sum;
  sum.pairs_E = pairs_E + other.pairs_E;
  sum.prob_sum_E = prob_sum_E + other.prob_sum_E;
  sum.z_sum = z_sum + other.z_sum;
  sum.entropy_sum = entropy_sum + other.entropy_sum;
  sum.num_pairs = num_pairs + other.num_pairs;
  sum.num_tokens = num_tokens + other.num_tokens;
  return sum;
}

RouterStats router_stats(const RouterOutput& out, const at::Tensor& valid_T, double entropy_q) {
  const at::Tensor& logits_TE = out.logits_TE;
  const at::Tensor& probs_TE = out.probs_TE;
  const Routing& routing = out.routing;
  MOLE_CHECK(logits_TE.dim() == 2 && probs_TE.sizes() == logits_TE.sizes(),
             "router stats: logits [T, E] and probs of the same shape expected, got ",
             logits_TE.sizes(), " and ", probs_TE.sizes());
  const int64_t num_tokens = logits_TE.size(0);
  const int64_t num_experts = logits_TE.size(1);
  MOLE_CHECK(routing.token_N.defined() && routing.expert_N.defined() &&
                 routing.token_N.sizes() == routing.expert_N.sizes(),
             "router stats: routing token_N and expert_N must be defined and of equal size");
  at::Tensor valid_bool_T;
  if (valid_T.defined()) {
    MOLE_CHECK(valid_T.dim() == 1 && valid_T.size(0) == num_tokens,
               "router stats: valid_T must be [", num_tokens, "] (one flag per token), got ",
               valid_T.sizes());
    // Flags on the host (training batches) go over without waiting for the device's queue.
    valid_bool_T = valid_T.to(probs_TE.device(), at::kBool, /*non_blocking=*/true);
  } else {
    valid_bool_T = at::ones({num_tokens}, probs_TE.options().dtype(at::kBool));
  }
  const at::Tensor valid_N = valid_bool_T.index_select(0, routing.token_N);

  RouterStats stats;
  stats.pairs_E = at::zeros({num_experts}, probs_TE.options())
                      .index_add_(0, routing.expert_N, valid_N.to(probs_TE.scalar_type()));
  const at::Tensor zeros_TE = at::zeros_like(probs_TE);
  stats.prob_sum_E = at::where(valid_bool_T.unsqueeze(1), probs_TE, zeros_TE).sum(0);
  const at::Tensor zeros_T = zeros_TE.select(1, 0);
  const at::Tensor log_z_T = at::logsumexp(logits_TE, {1});
  stats.z_sum = at::where(valid_bool_T, log_z_T * log_z_T, zeros_T).sum();
  stats.entropy_sum =
      at::where(valid_bool_T, normalized_tsallis_entropy(probs_TE, entropy_q), zeros_T).sum();
  // The counts are host integers: the token count comes from the flags where they are (no sync
  // for flags on the host or no flags at all); the pair count follows from it when every token
  // has the same number of pairs (top-k, dense), else it is one device -> host sync.
  stats.num_tokens = !valid_T.defined() ? num_tokens
                     : valid_T.is_cpu() ? valid_T.to(at::kBool).sum().item<int64_t>()
                                        : valid_bool_T.sum().item<int64_t>();
  stats.num_pairs = routing.pairs_per_token > 0 ? stats.num_tokens * routing.pairs_per_token
                                                : valid_N.sum().item<int64_t>();
  return stats;
}

at::Tensor load_balance_loss(const RouterStats& stats) {
  check_stats(stats, "load_balance_loss");
  if (stats.num_pairs == 0 || stats.num_tokens == 0) return zero_like_graph(stats.prob_sum_E);
  const double num_experts = static_cast<double>(stats.pairs_E.size(0));
  const at::Tensor f_E = stats.pairs_E / static_cast<double>(stats.num_pairs);
  const at::Tensor p_E = stats.prob_sum_E / static_cast<double>(stats.num_tokens);
  return (f_E * p_E).sum() * num_experts;
}

at::Tensor z_loss(const RouterStats& stats) {
  check_stats(stats, "z_loss");
  if (stats.num_tokens == 0) return zero_like_graph(stats.z_sum);
  return stats.z_sum / static_cast<double>(stats.num_tokens);
}

at::Tensor entropy_loss(const RouterStats& stats) {
  check_stats(stats, "entropy_loss");
  if (stats.num_tokens == 0) return zero_like_graph(stats.entropy_sum);
  return stats.entropy_sum / static_cast<double>(stats.num_tokens);
}

at::Tensor contrastive_loss(const at::Tensor& embeddings_MD, const at::Tensor& expert_M,
                            double temperature) {
  MOLE_CHECK(embeddings_MD.dim() == 2, "contrastive loss: embeddings must be [M, D], got ",
             embeddings_MD.sizes());
  MOLE_CHECK(expert_M.dim() == 1 && expert_M.size(0) == embeddings_MD.size(0),
             "contrastive loss: expert ids must be [", embeddings_MD.size(0), "], got ",
             expert_M.sizes());
  MOLE_CHECK(temperature > 0.0, "contrastive loss: temperature must be > 0, got ", temperature);
  const at::Tensor emb_MD = embeddings_MD.scalar_type() == at::kDouble
                                ? embeddings_MD
                                : embeddings_MD.to(at::kFloat);
  const int64_t num = emb_MD.size(0);
  if (num < 2) return zero_like_graph(emb_MD);

  const at::Tensor unit_MD = emb_MD / emb_MD.norm(2, {1}, /*keepdim=*/true).clamp_min(1e-12);
  const at::Tensor sim_MM = at::matmul(unit_MD, unit_MD.t()) / temperature;
  const at::Tensor self_MM = at::eye(num, emb_MD.options().dtype(at::kBool));
  const at::Tensor expert = expert_M.to(emb_MD.device());
  const at::Tensor positive_MM =
      expert.unsqueeze(1).eq(expert.unsqueeze(0)).logical_and(self_MM.logical_not());
  const at::Tensor has_positive_M = positive_MM.any(1);

  const double neg_inf = -std::numeric_limits<double>::infinity();
  const at::Tensor log_all_M = at::logsumexp(sim_MM.masked_fill(self_MM, neg_inf), {1});
  // -inf for anchors without a positive; where() discards them, and masked_fill's backward
  // zeroes the NaN that logsumexp's backward makes of an all -inf row.
  const at::Tensor log_pos_M =
      at::logsumexp(sim_MM.masked_fill(positive_MM.logical_not(), neg_inf), {1});
  const at::Tensor loss_M =
      at::where(has_positive_M, log_all_M - log_pos_M, at::zeros_like(log_all_M));
  const at::Tensor num_anchors = has_positive_M.sum().clamp_min(1).to(emb_MD.scalar_type());
  return loss_M.sum() / num_anchors;
}

}  // namespace mole::moe
