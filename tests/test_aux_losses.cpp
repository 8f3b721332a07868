// Auxiliary router losses: router statistics (hand-computed, padding mask, sums of stats), load
// balance, z-loss, Tsallis entropy loss and the contrastive loss, with gradients checked against
// central finite differences in float64.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "kernels/check.h"
#include "moe/aux_losses.h"
#include "moe/router.h"
#include "tests/test_util.h"

namespace mole {
namespace {

using moe::RouterOptions;
using moe::RouterOutput;
using moe::RouterStats;
using moe::RoutingStrategy;
using Rows = std::vector<std::vector<double>>;

at::Tensor tensor_of(const Rows& rows) {
  std::vector<double> flat;
  for (const auto& row : rows) flat.insert(flat.end(), row.begin(), row.end());
  return at::tensor(flat, at::kDouble).view({static_cast<int64_t>(rows.size()), -1});
}

RouterOutput route_with(const at::Tensor& logits_TE, RoutingStrategy strategy, int64_t top_k = 2) {
  RouterOptions o;
  o.strategy = strategy;
  o.top_k = top_k;
  return moe::route(logits_TE, o);
}

// The same routing (selection) with float64 logits `z_TE`: losses become smooth float64
// functions of z for finite differences.
RouterOutput with_logits(const RouterOutput& out, const at::Tensor& z_TE) {
  RouterOutput d;
  d.routing = out.routing;
  d.logits_TE = z_TE;
  d.probs_TE = at::softmax(z_TE, 1);
  return d;
}

// Central differences of the scalar f at x (float64).
at::Tensor finite_difference(const std::function<at::Tensor(const at::Tensor&)>& f,
                             const at::Tensor& x, double h = 1e-6) {
  at::Tensor grad = at::zeros_like(x);
  for (int64_t i = 0; i < x.numel(); ++i) {
    at::Tensor xp = x.clone(), xm = x.clone();
    xp.view({-1})[i] += h;
    xm.view({-1})[i] -= h;
    grad.view({-1})[i] = (f(xp) - f(xm)) / (2 * h);
  }
  return grad;
}

at::Tensor autograd_gradient(const std::function<at::Tensor(const at::Tensor&)>& f,
                             const at::Tensor& x) {
  at::Tensor leaf = x.clone().requires_grad_(true);
  f(leaf).backward();
  return leaf.grad();
}

// at::tensor has no bool overload in LibTorch 1.13.
at::Tensor flags(const std::vector<int64_t>& values) {
  return at::tensor(values, at::kLong).to(at::kBool);
}

double value(const at::Tensor& t) { return t.item<double>(); }

using test::error_of;

// Three tokens, two experts: p = (0.75, 0.25), (0.75, 0.25), (0.5, 0.5) with logsumexp offsets
// 1, 2, -1 (logits = log p + offset), so sum of lse^2 = 1 + 4 + 1 = 6.
at::Tensor small_logits() {
  at::Tensor p = tensor_of({{0.75, 0.25}, {0.75, 0.25}, {0.5, 0.5}});
  at::Tensor offset = at::tensor({1.0, 2.0, -1.0}, at::kDouble).unsqueeze(1);
  return (p.log() + offset).to(at::kFloat);
}

// ---------------------------------------------------------------------------------------------
// Router statistics

TEST(AuxLossStats, HandComputedTopOne) {
  // Top-1: every token picks expert 0 (token 2's tie goes to the lower id).
  RouterStats s = moe::router_stats(route_with(small_logits(), RoutingStrategy::kTopK, 1),
                                    at::Tensor(), /*entropy_q=*/2.0);
  EXPECT_EQ(s.num_tokens, 3);
  EXPECT_EQ(s.num_pairs, 3);
  EXPECT_EQ(s.pairs_E.scalar_type(), at::kFloat);
  EXPECT_FALSE(s.pairs_E.requires_grad());
  EXPECT_TRUE(at::equal(s.pairs_E, at::tensor({3.0f, 0.0f})));
  EXPECT_LT(test::rel_error(s.prob_sum_E, at::tensor({2.0, 1.0})), 1e-6);
  EXPECT_NEAR(value(s.z_sum), 6.0, 1e-5);
  // S_2 of (0.75, 0.25) is 0.75 and of (0.5, 0.5) is 1: 0.75 + 0.75 + 1.
  EXPECT_NEAR(value(s.entropy_sum), 2.5, 1e-6);
  // E * sum f_i P_i = 2 * (1 * 2/3 + 0 * 1/3).
  EXPECT_NEAR(value(moe::load_balance_loss(s)), 4.0 / 3.0, 1e-6);
  EXPECT_NEAR(value(moe::z_loss(s)), 2.0, 1e-5);
  EXPECT_NEAR(value(moe::entropy_loss(s)), 2.5 / 3.0, 1e-6);
}

TEST(AuxLossStats, HandComputedTopTwoCountsPairs) {
  // Top-2 of two experts: both experts for every token, f = (1/2, 1/2), P = (2/3, 1/3).
  RouterStats s = moe::router_stats(route_with(small_logits(), RoutingStrategy::kTopK, 2),
                                    at::Tensor(), 2.0);
  EXPECT_EQ(s.num_pairs, 6);
  EXPECT_TRUE(at::equal(s.pairs_E, at::tensor({3.0f, 3.0f})));
  EXPECT_NEAR(value(moe::load_balance_loss(s)), 2.0 * (0.5 * 2.0 / 3.0 + 0.5 * 1.0 / 3.0), 1e-6);
}

TEST(AuxLossStats, ValidMaskExcludesTokens) {
  at::Tensor logits = small_logits();
  logits[1] += 50.0;  // token 1 is padding: its (shifted) logits must not matter
  RouterOutput out = route_with(logits, RoutingStrategy::kTopK, 1);
  at::Tensor valid = flags({1, 0, 1});
  RouterStats s = moe::router_stats(out, valid, 2.0);
  EXPECT_EQ(s.num_tokens, 2);
  EXPECT_EQ(s.num_pairs, 2);
  EXPECT_TRUE(at::equal(s.pairs_E, at::tensor({2.0f, 0.0f})));
  EXPECT_LT(test::rel_error(s.prob_sum_E, at::tensor({1.25, 0.75})), 1e-6);
  EXPECT_NEAR(value(s.z_sum), 2.0, 1e-5);
  EXPECT_NEAR(value(s.entropy_sum), 1.75, 1e-6);
  EXPECT_NEAR(value(moe::load_balance_loss(s)), 2.0 * (1.0 * 1.25 / 2.0), 1e-6);

  // Same as routing only the valid tokens.
  at::Tensor kept = at::tensor({0, 2}, at::kLong);
  RouterStats ref = moe::router_stats(
      route_with(logits.index_select(0, kept), RoutingStrategy::kTopK, 1), at::Tensor(), 2.0);
  EXPECT_TRUE(at::equal(s.pairs_E, ref.pairs_E));
  EXPECT_LT(test::rel_error(s.prob_sum_E, ref.prob_sum_E), 1e-6);
  EXPECT_NEAR(value(s.z_sum), value(ref.z_sum), 1e-5);
  EXPECT_NEAR(value(s.entropy_sum), value(ref.entropy_sum), 1e-6);

  // Masked tokens get no gradient from any of the stats.
  at::Tensor z = logits.clone().requires_grad_(true);
  RouterStats g = moe::router_stats(route_with(z, RoutingStrategy::kTopK, 1), valid, 1.1);
  (moe::load_balance_loss(g) + moe::z_loss(g) + moe::entropy_loss(g)).backward();
  EXPECT_EQ(z.grad()[1].abs().sum().item<double>(), 0.0);
  EXPECT_GT(z.grad()[0].abs().sum().item<double>(), 0.0);

  EXPECT_NE(error_of([&] { moe::router_stats(out, flags({1, 0}), 2.0); })
                .find("valid_T must be [3] (one flag per token), got [2]"),
            std::string::npos);
}

TEST(AuxLossStats, SumOfHalvesEqualsTheWhole) {
  at::manual_seed(31);
  const int64_t num_tokens = 10, num_experts = 4;
  at::Tensor logits = at::randn({num_tokens, num_experts}) * 1.5;
  at::Tensor valid = at::rand({num_tokens}) > 0.3;
  at::Tensor first = at::arange(0, 4, at::kLong), second = at::arange(4, num_tokens, at::kLong);
  const double q = 1.1;
  RouterStats whole = moe::router_stats(route_with(logits, RoutingStrategy::kTopK), valid, q);
  RouterStats a = moe::router_stats(
      route_with(logits.index_select(0, first), RoutingStrategy::kTopK),
      valid.index_select(0, first), q);
  RouterStats b = moe::router_stats(
      route_with(logits.index_select(0, second), RoutingStrategy::kTopK),
      valid.index_select(0, second), q);
  RouterStats sum = a + b;
  EXPECT_EQ(sum.num_tokens, whole.num_tokens);
  EXPECT_EQ(sum.num_pairs, whole.num_pairs);
  EXPECT_EQ(sum.num_pairs, 2 * whole.num_tokens);
  EXPECT_TRUE(at::equal(sum.pairs_E, whole.pairs_E));  // integer-valued floats: exact
  EXPECT_LT(test::rel_error(sum.prob_sum_E, whole.prob_sum_E), 1e-6);
  EXPECT_NEAR(value(sum.z_sum), value(whole.z_sum), 1e-5);
  EXPECT_NEAR(value(sum.entropy_sum), value(whole.entropy_sum), 1e-5);
  EXPECT_NEAR(value(moe::load_balance_loss(sum)), value(moe::load_balance_loss(whole)), 1e-6);
  EXPECT_NEAR(value(moe::z_loss(sum)), value(moe::z_loss(whole)), 1e-6);
  EXPECT_NEAR(value(moe::entropy_loss(sum)), value(moe::entropy_loss(whole)), 1e-6);
  // Summed stats are not the mean of the halves' losses (global-batch balancing).
  EXPECT_GT(std::abs(value(moe::load_balance_loss(sum)) -
                     0.5 * (value(moe::load_balance_loss(a)) + value(moe::load_balance_loss(b)))),
            1e-4);

  // A default-constructed stats is the identity; different expert counts do not add.
  RouterStats from_empty = RouterStats{} + a;
  EXPECT_TRUE(at::equal(from_empty.pairs_E, a.pairs_E));
  EXPECT_EQ(from_empty.num_tokens, a.num_tokens);
  RouterStats other = moe::router_stats(route_with(at::zeros({2, 3}), RoutingStrategy::kTopK),
                                        at::Tensor(), q);
  EXPECT_NE(error_of([&] { (void)(a + other); }).find("router stats of 4 and 3 experts"),
            std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Load balance

TEST(AuxLossLoadBalance, BalancedIsOneAndCollapsedIsE) {
  at::manual_seed(41);
  // Dense routing: f_i = 1/E whatever p, so the loss is sum_i P_i = 1.
  RouterStats dense = moe::router_stats(
      route_with(at::randn({12, 5}) * 3.0, RoutingStrategy::kDense), at::Tensor(), 1.1);
  EXPECT_NEAR(value(moe::load_balance_loss(dense)), 1.0, 1e-6);
  // Every token on expert 0 with p ~ 1: E * 1 * 1.
  at::Tensor logits = at::zeros({8, 4});
  logits.select(1, 0).fill_(40.0);
  RouterStats collapsed =
      moe::router_stats(route_with(logits, RoutingStrategy::kTopK, 1), at::Tensor(), 1.1);
  EXPECT_NEAR(value(moe::load_balance_loss(collapsed)), 4.0, 1e-6);
}

TEST(AuxLossLoadBalance, NoTokensOrPairsGiveZeroNotNaN) {
  at::Tensor z = at::randn({4, 3}).requires_grad_(true);
  RouterStats s = moe::router_stats(route_with(z, RoutingStrategy::kTopK),
                                    at::zeros({4}, at::kBool), 1.1);
  EXPECT_EQ(s.num_tokens, 0);
  EXPECT_EQ(s.num_pairs, 0);
  at::Tensor total = moe::load_balance_loss(s) + moe::z_loss(s) + moe::entropy_loss(s);
  EXPECT_EQ(value(total), 0.0);
  total.backward();
  EXPECT_EQ(z.grad().abs().sum().item<double>(), 0.0);

  RouterStats empty = moe::router_stats(route_with(at::zeros({0, 3}), RoutingStrategy::kSwitch),
                                        at::Tensor(), 1.1);
  EXPECT_EQ(value(moe::load_balance_loss(empty)), 0.0);
  EXPECT_EQ(value(moe::z_loss(empty)), 0.0);
  EXPECT_EQ(value(moe::entropy_loss(empty)), 0.0);

  EXPECT_NE(error_of([] { moe::load_balance_loss(RouterStats{}); })
                .find("load_balance_loss: RouterStats is empty"),
            std::string::npos);
}

TEST(AuxLossLoadBalance, GradientMatchesFiniteDifferencesAndClosedForm) {
  at::manual_seed(43);
  const int64_t num_tokens = 6, num_experts = 4;
  at::Tensor z0 = at::randn({num_tokens, num_experts}, at::kDouble);
  at::Tensor valid = flags({1, 1, 0, 1, 1, 1});
  RouterOutput out = route_with(z0.to(at::kFloat), RoutingStrategy::kTopK, 2);
  auto loss = [&](const at::Tensor& z) {
    return moe::load_balance_loss(moe::router_stats(with_logits(out, z), valid, 1.1));
  };
  at::Tensor grad = autograd_gradient(loss, z0);
  EXPECT_LT(test::rel_error(grad, finite_difference(loss, z0)), 1e-7);

  // dL/dz_tj = E/(N_tok) * p_tj (f_j - sum_i f_i p_ti) for counted tokens, 0 for padding.
  RouterStats s = moe::router_stats(with_logits(out, z0), valid, 1.1);
  at::Tensor f_E = s.pairs_E / static_cast<double>(s.num_pairs);
  at::Tensor p_TE = at::softmax(z0, 1);
  at::Tensor closed = p_TE * (f_E - (p_TE * f_E).sum(1, true)) *
                      (static_cast<double>(num_experts) / static_cast<double>(s.num_tokens));
  closed = closed * valid.to(at::kDouble).unsqueeze(1);
  EXPECT_LT(test::rel_error(grad, closed), 1e-10);
}

// ---------------------------------------------------------------------------------------------
// z-loss and entropy loss

TEST(AuxLossZ, GradientMatchesFiniteDifferencesAndClosedForm) {
  at::manual_seed(47);
  at::Tensor z0 = at::randn({5, 3}, at::kDouble) * 2.0;
  RouterOutput out = route_with(z0.to(at::kFloat), RoutingStrategy::kSwitch);
  auto loss = [&](const at::Tensor& z) {
    return moe::z_loss(moe::router_stats(with_logits(out, z), at::Tensor(), 1.1));
  };
  at::Tensor lse = at::logsumexp(z0, {1}, true);
  EXPECT_NEAR(value(loss(z0)), value((lse * lse).mean()), 1e-12);
  at::Tensor grad = autograd_gradient(loss, z0);
  EXPECT_LT(test::rel_error(grad, finite_difference(loss, z0)), 1e-7);
  EXPECT_LT(test::rel_error(grad, 2.0 * lse * at::softmax(z0, 1) / 5.0), 1e-10);
}

TEST(AuxLossEntropy, GradientMatchesFiniteDifferences) {
  at::manual_seed(53);
  at::Tensor z0 = at::randn({5, 4}, at::kDouble);
  RouterOutput out = route_with(z0.to(at::kFloat), RoutingStrategy::kDense);
  at::Tensor valid = flags({1, 0, 1, 1, 1});
  for (double q : {1.0, 1.1, 2.0, 0.5}) {
    auto loss = [&](const at::Tensor& z) {
      return moe::entropy_loss(moe::router_stats(with_logits(out, z), valid, q));
    };
    at::Tensor expected =
        moe::normalized_tsallis_entropy(at::softmax(z0, 1), q).index_select(
            0, at::tensor({0, 2, 3, 4}, at::kLong)).mean();
    EXPECT_NEAR(value(loss(z0)), value(expected), 1e-12) << "q " << q;
    EXPECT_LT(test::rel_error(autograd_gradient(loss, z0), finite_difference(loss, z0)), 1e-6)
        << "q " << q;
  }
}

// ---------------------------------------------------------------------------------------------
// Contrastive loss

TEST(AuxLossContrastive, HandComputed) {
  // Unit directions e0 = (1, 0), e1 = (0, 1), e2 = (2, 0) -> (1, 0); experts 0, 0, 1.
  // Anchor 0: positive 1 (s = 0), others {1, 2} (s = 0, 1/tau): log(1 + e^(1/tau)).
  // Anchor 1: positive 0 (s = 0), others {0, 2} (s = 0, 0): log 2. Anchor 2: no positive.
  at::Tensor emb = at::tensor({1.0, 0.0, 0.0, 1.0, 2.0, 0.0}, at::kDouble).view({3, 2});
  at::Tensor expert = at::tensor({0, 0, 1}, at::kLong);
  for (double tau : {1.0, 0.5}) {
    const double expected = 0.5 * (std::log(1.0 + std::exp(1.0 / tau)) + std::log(2.0));
    EXPECT_NEAR(value(moe::contrastive_loss(emb, expert, tau)), expected, 1e-12) << tau;
  }
  // float32 in, float32 out.
  at::Tensor f = moe::contrastive_loss(emb.to(at::kFloat), expert, 1.0);
  EXPECT_EQ(f.scalar_type(), at::kFloat);
  EXPECT_NEAR(value(f), 0.5 * (std::log(1.0 + std::exp(1.0)) + std::log(2.0)), 1e-6);
}

// Plain loops in double, straight from the definition.
double contrastive_reference(const at::Tensor& emb_MD, const std::vector<int64_t>& expert,
                             double tau) {
  const int64_t m = emb_MD.size(0);
  at::Tensor unit = emb_MD / emb_MD.norm(2, {1}, true);
  std::vector<std::vector<double>> s(m, std::vector<double>(m));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < m; ++j) s[i][j] = value((unit[i] * unit[j]).sum()) / tau;
  }
  double total = 0.0;
  int anchors = 0;
  for (int64_t i = 0; i < m; ++i) {
    double pos = 0.0, all = 0.0;
    bool has_positive = false;
    for (int64_t j = 0; j < m; ++j) {
      if (j == i) continue;
      all += std::exp(s[i][j]);
      if (expert[j] == expert[i]) {
        pos += std::exp(s[i][j]);
        has_positive = true;
      }
    }
    if (!has_positive) continue;
    total += -std::log(pos / all);
    ++anchors;
  }
  return anchors == 0 ? 0.0 : total / anchors;
}

TEST(AuxLossContrastive, MatchesScalarReferenceAndFiniteDifferences) {
  at::manual_seed(59);
  at::Tensor emb = at::randn({7, 5}, at::kDouble);
  const std::vector<int64_t> experts = {0, 1, 0, 2, 1, 3, 0};  // anchors 3 and 5 have no positive
  at::Tensor expert = at::tensor(experts, at::kLong);
  for (double tau : {1.0, 0.2}) {
    auto loss = [&](const at::Tensor& e) { return moe::contrastive_loss(e, expert, tau); };
    EXPECT_NEAR(value(loss(emb)), contrastive_reference(emb, experts, tau), 1e-12) << tau;
    EXPECT_LT(test::rel_error(autograd_gradient(loss, emb), finite_difference(loss, emb)), 1e-6)
        << tau;
    // Cosine similarities: scaling the embeddings changes nothing.
    EXPECT_NEAR(value(loss(3.0 * emb)), value(loss(emb)), 1e-12);
  }
}

TEST(AuxLossContrastive, NoPositiveIsZeroWithFiniteGradient) {
  at::Tensor emb = at::randn({4, 3}).requires_grad_(true);
  at::Tensor loss = moe::contrastive_loss(emb, at::tensor({0, 1, 2, 3}, at::kLong), 0.1);
  EXPECT_EQ(value(loss), 0.0);
  loss.backward();
  EXPECT_EQ(emb.grad().abs().sum().item<double>(), 0.0);
  EXPECT_EQ(value(moe::contrastive_loss(at::ones({1, 3}), at::zeros({1}, at::kLong), 0.1)), 0.0);
  EXPECT_EQ(value(moe::contrastive_loss(at::ones({0, 3}), at::zeros({0}, at::kLong), 0.1)), 0.0);
}

TEST(AuxLossContrastive, Errors) {
  at::Tensor emb = at::ones({3, 2});
  EXPECT_NE(error_of([&] { moe::contrastive_loss(emb, at::zeros({3}, at::kLong), 0.0); })
                .find("temperature must be > 0, got 0"),
            std::string::npos);
  EXPECT_NE(error_of([&] { moe::contrastive_loss(emb, at::zeros({2}, at::kLong), 1.0); })
                .find("expert ids must be [3], got [2]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { moe::contrastive_loss(at::ones({3}), at::zeros({3}, at::kLong), 1.0); })
                .find("embeddings must be [M, D], got [3]"),
            std::string::npos);
}

}  // namespace
}  // namespace mole
