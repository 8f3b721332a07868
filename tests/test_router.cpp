// Routing by route(): hand-computed selections for every strategy (ties, top-p at exact equality,
// switch capacity, DynMoLE's entropy switch), gradients of the weights and option validation.
// router_logits (jitter) and the normalised Tsallis entropy: test_router_scores.cpp.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "moe/router.h"
#include "tests/test_util.h"

namespace mole {
namespace {

using moe::RouterOptions;
using moe::RoutingStrategy;
using test::error_of;
using Rows = std::vector<std::vector<double>>;

at::Tensor tensor_of(const Rows& rows, at::ScalarType dtype = at::kDouble) {
  std::vector<double> flat;
  for (const auto& row : rows) flat.insert(flat.end(), row.begin(), row.end());
  const int64_t cols = rows.empty() ? 0 : static_cast<int64_t>(rows[0].size());
  return at::tensor(flat, at::kDouble).view({static_cast<int64_t>(rows.size()), cols}).to(dtype);
}

// Logits whose softmax is `probs` (each row sums to 1).
at::Tensor logits_of(const Rows& probs) { return tensor_of(probs).log().to(at::kFloat); }

RouterOptions options_for(RoutingStrategy strategy) {
  RouterOptions o;
  o.strategy = strategy;
  return o;
}

std::vector<int64_t> to_vector(const at::Tensor& t) {
  at::Tensor c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

std::vector<double> to_doubles(const at::Tensor& t) {
  at::Tensor c = t.detach().to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

void expect_weights(const moe::Routing& r, const std::vector<double>& expected, double tol) {
  std::vector<double> got = to_doubles(r.weight_N);
  ASSERT_EQ(got.size(), expected.size());
  for (size_t n = 0; n < got.size(); ++n) EXPECT_NEAR(got[n], expected[n], tol) << "pair " << n;
}

// ---------------------------------------------------------------------------------------------
// Strategy names

TEST(RouterStrategy, NamesRoundTripAndUnknownNamesTheChoices) {
  for (RoutingStrategy s : {RoutingStrategy::kTopK, RoutingStrategy::kTopP,
                            RoutingStrategy::kSwitch, RoutingStrategy::kDynMole,
                            RoutingStrategy::kDense}) {
    EXPECT_EQ(moe::parse_routing_strategy(moe::routing_strategy_name(s)), s);
  }
  std::string msg = error_of([] { moe::parse_routing_strategy("top2"); });
  EXPECT_NE(msg.find("'top2'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("topk, topp, switch, dynmole, dense"), std::string::npos) << msg;
}

// ---------------------------------------------------------------------------------------------
// top-k

TEST(RouterTopK, HandComputedWithTiesToTheLowerId) {
  RouterOptions o = options_for(RoutingStrategy::kTopK);
  o.top_k = 2;
  // Row 0: no tie. Row 1: all equal -> experts 0, 1. Row 2: three-way tie for first -> 1, 2.
  // Row 3: tie straddling the cut (0.3, 0.3 at ids 1 and 3; 0.2, 0.2 at ids 0 and 2).
  const Rows p = {{0.1, 0.4, 0.2, 0.3},
                  {0.25, 0.25, 0.25, 0.25},
                  {0.1, 0.3, 0.3, 0.3},
                  {0.2, 0.3, 0.2, 0.3}};
  moe::RouterOutput out = moe::route(logits_of(p), o);
  EXPECT_EQ(to_vector(out.routing.token_N), (std::vector<int64_t>{0, 0, 1, 1, 2, 2, 3, 3}));
  EXPECT_EQ(to_vector(out.routing.expert_N), (std::vector<int64_t>{1, 3, 0, 1, 1, 2, 1, 3}));
  expect_weights(out.routing, {0.4 / 0.7, 0.3 / 0.7, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5}, 1e-6);
  EXPECT_EQ(out.routing.num_tokens, 4);
  EXPECT_EQ(out.routing.num_experts, 4);
  EXPECT_EQ(out.routing.weight_N.scalar_type(), at::kFloat);
  EXPECT_EQ(out.routing.token_N.scalar_type(), at::kLong);
  EXPECT_EQ(out.routing.expert_N.scalar_type(), at::kLong);

  // K = 3 on the straddling row: both 0.3s, then the lower-id 0.2 (expert 0, not 2).
  o.top_k = 3;
  out = moe::route(logits_of({p[3]}), o);
  EXPECT_EQ(to_vector(out.routing.expert_N), (std::vector<int64_t>{1, 3, 0}));
  expect_weights(out.routing, {0.375, 0.375, 0.25}, 1e-6);
}

TEST(RouterTopK, ExactTiesOfEqualLogitsAtAnyWidth) {
  // Equal logits at widths that exercise vectorised bodies and scalar tails: lowest ids first.
  RouterOptions o = options_for(RoutingStrategy::kTopK);
  o.top_k = 3;
  for (int64_t e : {3, 5, 8, 9, 17, 33}) {
    at::Tensor logits = at::full({2, e}, 0.7f);
    moe::RouterOutput out = moe::route(logits, o);
    EXPECT_EQ(to_vector(out.routing.expert_N), (std::vector<int64_t>{0, 1, 2, 0, 1, 2}))
        << "E = " << e;
    expect_weights(out.routing, std::vector<double>(6, 1.0 / 3.0), 1e-6);
  }
}

TEST(RouterTopK, KEqualsEAndKOne) {
  const Rows p = {{0.1, 0.4, 0.2, 0.3}, {0.5, 0.125, 0.125, 0.25}};
  RouterOptions o = options_for(RoutingStrategy::kTopK);
  o.top_k = 4;  // every expert, in descending p; renormalising a full row changes nothing
  moe::RouterOutput out = moe::route(logits_of(p), o);
  EXPECT_EQ(to_vector(out.routing.token_N), (std::vector<int64_t>{0, 0, 0, 0, 1, 1, 1, 1}));
  EXPECT_EQ(to_vector(out.routing.expert_N), (std::vector<int64_t>{1, 3, 2, 0, 0, 3, 1, 2}));
  expect_weights(out.routing, {0.4, 0.3, 0.2, 0.1, 0.5, 0.25, 0.125, 0.125}, 1e-6);

  o.top_k = 1;  // weight renormalised to exactly 1
  out = moe::route(logits_of(p), o);
  EXPECT_EQ(to_vector(out.routing.token_N), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(to_vector(out.routing.expert_N), (std::vector<int64_t>{1, 0}));
  EXPECT_EQ(to_doubles(out.routing.weight_N), (std::vector<double>{1.0, 1.0}));
}

TEST(RouterTopK, MatchesScalarReferenceOnRandomLogits) {
  // Reference: per token, softmax in double and a std::stable_sort of ids by descending logit.
  at::manual_seed(11);
  const int64_t num_tokens = 37, num_experts = 8;
  at::Tensor logits = at::randn({num_tokens, num_experts}) * 2.0;
  std::vector<double> z = to_doubles(logits);
  for (int64_t k = 1; k <= num_experts; ++k) {
    RouterOptions o = options_for(RoutingStrategy::kTopK);
    o.top_k = k;
    moe::RouterOutput out = moe::route(logits, o);
    std::vector<int64_t> token, expert;
    std::vector<double> weight;
    for (int64_t t = 0; t < num_tokens; ++t) {
      const double* zt = z.data() + t * num_experts;
      std::vector<int64_t> ids(num_experts);
      std::iota(ids.begin(), ids.end(), 0);
      std::stable_sort(ids.begin(), ids.end(), [&](int64_t a, int64_t b) { return zt[a] > zt[b]; });
      double sel = 0.0;
      for (int64_t j = 0; j < k; ++j) sel += std::exp(zt[ids[j]]);
      for (int64_t j = 0; j < k; ++j) {
        token.push_back(t);
        expert.push_back(ids[j]);
        weight.push_back(std::exp(zt[ids[j]]) / sel);
      }
    }
    EXPECT_EQ(to_vector(out.routing.token_N), token) << "K = " << k;
    EXPECT_EQ(to_vector(out.routing.expert_N), expert) << "K = " << k;
    expect_weights(out.routing, weight, 1e-6);
    at::Tensor sums = at::zeros({num_tokens}).index_add_(0, out.routing.token_N,
                                                         out.routing.weight_N.detach());
    EXPECT_LT((sums - 1.0).abs().max().item<double>(), 1e-6) << "K = " << k;
  }
}

// ---------------------------------------------------------------------------------------------
// top-p

TEST(RouterTopP, ExactEqualityIncludesTheExpertThatCrosses) {
  // Binary fractions: softmax(log p) == p exactly, cumulative sums exact.
  const Rows p = {{0.5, 0.25, 0.125, 0.125}, {0.125, 0.5, 0.125, 0.25}};
  at::Tensor logits = logits_of(p);
  moe::RouterOptions o = options_for(RoutingStrategy::kTopP);
  o.top_p = 0.75;
  moe::RouterOutput out = moe::route(logits, o);
  ASSERT_TRUE(at::equal(out.probs_TE, tensor_of(p, at::kFloat)))
      << "precondition: softmax(log p) is not exact here\n" << out.probs_TE;
  // Cumulative 0.5, 0.75 (= top_p, not exceeding), 0.875 (first to exceed: included).
  EXPECT_EQ(to_vector(out.routing.token_N), (std::vector<int64_t>{0, 0, 0, 1, 1, 1}));
  EXPECT_EQ(to_vector(out.routing.expert_N), (std::vector<int64_t>{0, 1, 2, 1, 3, 0}));
  expect_weights(out.routing, {0.5, 0.25, 0.125, 0.5, 0.25, 0.125}, 0.0);  // p, not renormalised

  o.top_p = 0.5;  // 0.5 does not exceed, 0.75 does: two experts
  EXPECT_EQ(to_vector(moe::route(logits, o).routing.expert_N),
            (std::vector<int64_t>{0, 1, 1, 3}));
  o.top_p = 0.4375;  // the first expert already exceeds: one expert
  EXPECT_EQ(to_vector(moe::route(logits, o).routing.expert_N), (std::vector<int64_t>{0, 1}));
  o.top_p = 0.875;  // 0.875 does not exceed, 1.0 does: all four
  EXPECT_EQ(to_vector(moe::route(logits, o).routing.expert_N),
            (std::vector<int64_t>{0, 1, 2, 3, 1, 3, 0, 2}));
}

TEST(RouterTopP, TopPOneKeepsAllAndADominantExpertStandsAlone) {
  moe::RouterOptions o = options_for(RoutingStrategy::kTopP);
  o.top_p = 1.0;
  at::manual_seed(3);
  at::Tensor logits = at::randn({9, 6});
  logits[4][2] = -30.0;  // a tiny probability is still selected at top_p = 1
  moe::RouterOutput out = moe::route(logits, o);
  EXPECT_EQ(out.routing.token_N.numel(), 9 * 6);
  // Found by search: here the float cumulative sum of the first four sorted p is 1.0000001
  // (x86-64, LibTorch 1.13), which must not drop the fifth expert.
  logits = at::tensor({-1.25f, -1.0f, 0.0f, -1.5f, -40.0f}).view({1, 5});
  out = moe::route(logits, o);
  EXPECT_EQ(to_vector(out.routing.expert_N), (std::vector<int64_t>{2, 1, 0, 3, 4}));

  o.top_p = 0.75;
  const Rows p = {{0.01, 0.97, 0.01, 0.01}, {0.25, 0.25, 0.25, 0.25}};
  out = moe::route(logits_of(p), o);
  // Token 0: 0.97 alone exceeds. Token 1: 0.25, 0.5, 0.75 (not exceeding), 1.0 -> all four.
  EXPECT_EQ(to_vector(out.routing.token_N), (std::vector<int64_t>{0, 1, 1, 1, 1}));
  EXPECT_EQ(to_vector(out.routing.expert_N), (std::vector<int64_t>{1, 0, 1, 2, 3}));
  expect_weights(out.routing, {0.97, 0.25, 0.25, 0.25, 0.25}, 1e-6);
}

// ---------------------------------------------------------------------------------------------
// switch

TEST(RouterSwitch, CapacityOverflowDropsLaterTokens) {
  // T = 6, E = 2, capacity_factor 1 -> C = 3. Tokens 0, 1, 3, 4 prefer expert 0: token 4 (the
  // fourth in token order) is dropped; tokens 2 and 5 go to expert 1.
  const Rows p = {{0.9, 0.1}, {0.6, 0.4}, {0.2, 0.8}, {0.7, 0.3}, {0.99, 0.01}, {0.3, 0.7}};
  moe::RouterOptions o = options_for(RoutingStrategy::kSwitch);
  o.capacity_factor = 1.0;
  moe::RouterOutput out = moe::route(logits_of(p), o);
  EXPECT_EQ(to_vector(out.routing.token_N), (std::vector<int64_t>{0, 1, 2, 3, 5}));
  EXPECT_EQ(to_vector(out.routing.expert_N), (std::vector<int64_t>{0, 0, 1, 0, 1}));
  expect_weights(out.routing, {0.9, 0.6, 0.8, 0.7, 0.7}, 1e-6);  // p of the chosen expert

  o.capacity_factor = 2.0;  // C = 6: nothing dropped
  EXPECT_EQ(to_vector(moe::route(logits_of(p), o).routing.token_N),
            (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
  o.capacity_factor = 0.5;  // C = ceil(1.5) = 2: tokens 0, 1 on expert 0; 2, 5 on expert 1
  EXPECT_EQ(to_vector(moe::route(logits_of(p), o).routing.token_N),
            (std::vector<int64_t>{0, 1, 2, 5}));
}

TEST(RouterSwitch, CapacityRoundsUp) {
  struct Case {
    int64_t num_tokens, num_experts;
    double capacity_factor;
    int64_t capacity;
  };
  // 25/3 * 1.8 = 15 and 50/11 * 1.1 = 5, but 15.000000000000002 and 5.000000000000001 in double:
  // still C = 15 and 5.
  for (const Case& c : {Case{5, 2, 1.0, 3}, Case{5, 2, 0.5, 2}, Case{4, 2, 1.25, 3},
                        Case{7, 4, 1.0, 2}, Case{1, 8, 1.0, 1}, Case{25, 3, 1.8, 15},
                        Case{50, 11, 1.1, 5}}) {
    // Every token prefers expert 0, so exactly C tokens (the first ones) are kept.
    at::Tensor logits = at::zeros({c.num_tokens, c.num_experts});
    logits.select(1, 0).fill_(3.0);
    moe::RouterOptions o = options_for(RoutingStrategy::kSwitch);
    o.capacity_factor = c.capacity_factor;
    std::vector<int64_t> expected(static_cast<size_t>(c.capacity));
    std::iota(expected.begin(), expected.end(), 0);
    moe::RouterOutput out = moe::route(logits, o);
    EXPECT_EQ(to_vector(out.routing.token_N), expected)
        << "T = " << c.num_tokens << ", E = " << c.num_experts << ", cf = " << c.capacity_factor;
    EXPECT_EQ(to_vector(out.routing.expert_N), std::vector<int64_t>(expected.size(), 0));
  }
}

// ---------------------------------------------------------------------------------------------
// DynMoLE

TEST(RouterDynMole, EntropyAboveThresholdUsesEveryExpert) {
  // Token 0 uniform (S = 1 > 0.9): all four with weight 1/4. Token 1 peaked: S_1.1 = 0.619 (see
  // TsallisEntropy.PeakedHandValue): top-p(0.5) = {0} united with top-2 = {0, 1}.
  const Rows p = {{0.25, 0.25, 0.25, 0.25}, {0.05, 0.2, 0.7, 0.05}};
  moe::RouterOptions o = options_for(RoutingStrategy::kDynMole);
  o.entropy_q = 1.1;
  o.entropy_threshold = 0.9;
  o.top_p = 0.5;
  o.keep_top_k = 2;
  moe::RouterOutput out = moe::route(logits_of(p), o);
  EXPECT_EQ(to_vector(out.routing.token_N), (std::vector<int64_t>{0, 0, 0, 0, 1, 1}));
  EXPECT_EQ(to_vector(out.routing.expert_N), (std::vector<int64_t>{0, 1, 2, 3, 2, 1}));
  expect_weights(out.routing, {0.25, 0.25, 0.25, 0.25, 0.7, 0.2}, 1e-6);  // not renormalised

  // keep_top_k = 1 and top_p = 0.75: top-p {2, 1} is now the larger set.
  o.keep_top_k = 1;
  o.top_p = 0.75;
  out = moe::route(logits_of({p[1]}), o);
  EXPECT_EQ(to_vector(out.routing.expert_N), (std::vector<int64_t>{2, 1}));
  // top_p small: only the keep_top_k = 1 expert.
  o.top_p = 0.1;
  EXPECT_EQ(to_vector(moe::route(logits_of({p[1]}), o).routing.expert_N),
            (std::vector<int64_t>{2}));
  // Threshold 0.6 < 0.619: the peaked token becomes dense too.
  o.entropy_threshold = 0.6;
  EXPECT_EQ(to_vector(moe::route(logits_of({p[1]}), o).routing.expert_N),
            (std::vector<int64_t>{2, 1, 0, 3}));
  // Threshold 1: never dense (S <= 1), even for the uniform token -> top-p of 0.1 = one expert.
  o.entropy_threshold = 1.0;
  EXPECT_EQ(to_vector(moe::route(logits_of({p[0]}), o).routing.expert_N),
            (std::vector<int64_t>{0}));
}

TEST(RouterDynMole, EntropyEqualToTheThresholdIsNotAbove) {
  // q = 2, uniform p over 4 experts: S = (1 - 4/16) / (1 - 1/4) = 1, exact in float32.
  moe::RouterOptions o = options_for(RoutingStrategy::kDynMole);
  o.entropy_q = 2.0;
  o.top_p = 0.1;
  o.keep_top_k = 1;
  o.entropy_threshold = 1.0;
  moe::RouterOutput out = moe::route(at::zeros({1, 4}), o);
  ASSERT_EQ(moe::normalized_tsallis_entropy(out.probs_TE, 2.0).item<float>(), 1.0f);
  EXPECT_EQ(to_vector(out.routing.expert_N), (std::vector<int64_t>{0}));
  o.entropy_threshold = 0.9999;
  EXPECT_EQ(to_vector(moe::route(at::zeros({1, 4}), o).routing.expert_N),
            (std::vector<int64_t>{0, 1, 2, 3}));
}

TEST(RouterDynMole, ShannonBranchAtQOne) {
  // Shannon / ln 4 of (0.7, 0.2, 0.05, 0.05) = 0.87113 / 1.38629 = 0.6284.
  const Rows p = {{0.7, 0.2, 0.05, 0.05}};
  moe::RouterOptions o = options_for(RoutingStrategy::kDynMole);
  o.entropy_q = 1.0;
  o.top_p = 0.5;
  o.keep_top_k = 1;
  o.entropy_threshold = 0.62;
  EXPECT_EQ(to_vector(moe::route(logits_of(p), o).routing.expert_N),
            (std::vector<int64_t>{0, 1, 2, 3}));
  o.entropy_threshold = 0.63;
  EXPECT_EQ(to_vector(moe::route(logits_of(p), o).routing.expert_N), (std::vector<int64_t>{0}));
}

// ---------------------------------------------------------------------------------------------
// dense

TEST(RouterDense, EveryExpertWithItsProbability) {
  const Rows p = {{0.1, 0.4, 0.2, 0.3}, {0.25, 0.25, 0.25, 0.25}};
  moe::RouterOutput out = moe::route(logits_of(p), options_for(RoutingStrategy::kDense));
  EXPECT_EQ(to_vector(out.routing.token_N), (std::vector<int64_t>{0, 0, 0, 0, 1, 1, 1, 1}));
  EXPECT_EQ(to_vector(out.routing.expert_N), (std::vector<int64_t>{1, 3, 2, 0, 0, 1, 2, 3}));
  expect_weights(out.routing, {0.4, 0.3, 0.2, 0.1, 0.25, 0.25, 0.25, 0.25}, 1e-6);
  // One expert: the options it does not read (top_k = 2 > E) are not checked.
  out = moe::route(at::zeros({3, 1}), options_for(RoutingStrategy::kDense));
  EXPECT_EQ(to_vector(out.routing.expert_N), (std::vector<int64_t>{0, 0, 0}));
  expect_weights(out.routing, {1.0, 1.0, 1.0}, 0.0);
}

TEST(RouterAll, ZeroTokensAndLowPrecisionLogits) {
  for (RoutingStrategy s : {RoutingStrategy::kTopK, RoutingStrategy::kTopP,
                            RoutingStrategy::kSwitch, RoutingStrategy::kDynMole,
                            RoutingStrategy::kDense}) {
    moe::RouterOutput out = moe::route(at::zeros({0, 4}), options_for(s));
    EXPECT_EQ(out.routing.token_N.numel(), 0) << moe::routing_strategy_name(s);
    EXPECT_EQ(out.routing.weight_N.numel(), 0) << moe::routing_strategy_name(s);
    // bfloat16 logits: router math and outputs in float32.
    out = moe::route(at::randn({5, 4}).to(at::kBFloat16), options_for(s));
    EXPECT_EQ(out.logits_TE.scalar_type(), at::kFloat);
    EXPECT_EQ(out.probs_TE.scalar_type(), at::kFloat);
    EXPECT_EQ(out.routing.weight_N.scalar_type(), at::kFloat);
  }
}

// ---------------------------------------------------------------------------------------------
// Gradients: weight_N is differentiable in the logits, for the fixed selection.

// f(z) = sum_n c_n w_n(z) in double for the selection of `routing`; w = p, renormalised over the
// token's selected experts when `renormalise`.
at::Tensor weight_objective(const at::Tensor& z_TE, const moe::Routing& routing,
                            const at::Tensor& c_N, bool renormalise) {
  at::Tensor p_TE = at::softmax(z_TE, 1);
  at::Tensor w_N = p_TE.index({routing.token_N, routing.expert_N});
  if (renormalise) {
    at::Tensor sel_T = at::zeros({z_TE.size(0)}, z_TE.options()).index_add(0, routing.token_N, w_N);
    w_N = w_N / sel_T.index_select(0, routing.token_N);
  }
  return (w_N * c_N).sum();
}

TEST(RouterGradient, WeightsFlowBackToTheLogits) {
  at::manual_seed(21);
  const int64_t num_tokens = 7, num_experts = 5;
  at::Tensor z0 = at::randn({num_tokens, num_experts}, at::kDouble);
  for (RoutingStrategy s : {RoutingStrategy::kTopK, RoutingStrategy::kTopP,
                            RoutingStrategy::kSwitch, RoutingStrategy::kDynMole,
                            RoutingStrategy::kDense}) {
    RouterOptions o = options_for(s);
    o.capacity_factor = 0.8;  // C = 2: some tokens dropped
    at::Tensor z = z0.to(at::kFloat).requires_grad_(true);
    moe::RouterOutput out = moe::route(z, o);
    const moe::Routing& r = out.routing;
    EXPECT_TRUE(r.weight_N.requires_grad());
    EXPECT_FALSE(r.token_N.requires_grad());
    EXPECT_FALSE(r.expert_N.requires_grad());
    at::Tensor c_N = at::arange(1, r.weight_N.numel() + 1, at::kDouble);  // c_n = n + 1
    (r.weight_N * c_N.to(at::kFloat)).sum().backward();

    // Central differences in double of the same objective with the selection held fixed.
    const bool renormalise = s == RoutingStrategy::kTopK;
    at::Tensor fd = at::zeros_like(z0);
    const double h = 1e-6;
    for (int64_t i = 0; i < z0.numel(); ++i) {
      at::Tensor zp = z0.clone(), zm = z0.clone();
      zp.view({-1})[i] += h;
      zm.view({-1})[i] -= h;
      fd.view({-1})[i] = (weight_objective(zp, r, c_N, renormalise) -
                          weight_objective(zm, r, c_N, renormalise)) / (2 * h);
    }
    EXPECT_LT(test::rel_error(z.grad(), fd), 1e-5) << moe::routing_strategy_name(s);
  }
}

// ---------------------------------------------------------------------------------------------
// Option validation

TEST(RouterOptions, ValidateNamesTheOptionAndTheValues) {
  struct Case {
    RoutingStrategy strategy;
    std::function<void(RouterOptions&)> set;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {RoutingStrategy::kTopK, [](RouterOptions& o) { o.top_k = 0; },
       "top_k must be in [1, 4] (num_experts), got 0"},
      {RoutingStrategy::kTopK, [](RouterOptions& o) { o.top_k = 5; },
       "top_k must be in [1, 4] (num_experts), got 5"},
      {RoutingStrategy::kTopP, [](RouterOptions& o) { o.top_p = 0.0; },
       "top_p must be in (0, 1], got 0"},
      {RoutingStrategy::kTopP, [](RouterOptions& o) { o.top_p = 1.5; },
       "top_p must be in (0, 1], got 1.5"},
      {RoutingStrategy::kDynMole, [](RouterOptions& o) { o.top_p = -0.25; },
       "top_p must be in (0, 1], got -0.25"},
      {RoutingStrategy::kTopK, [](RouterOptions& o) { o.jitter_noise = -0.5; },
       "jitter_noise must be in [0, 1), got -0.5"},
      {RoutingStrategy::kDense, [](RouterOptions& o) { o.jitter_noise = 1.0; },
       "jitter_noise must be in [0, 1), got 1"},
      {RoutingStrategy::kSwitch, [](RouterOptions& o) { o.capacity_factor = 0.0; },
       "capacity_factor must be > 0, got 0"},
      {RoutingStrategy::kDynMole, [](RouterOptions& o) { o.entropy_q = 0.0; },
       "entropy_q must be > 0, got 0"},
      {RoutingStrategy::kDynMole, [](RouterOptions& o) { o.entropy_threshold = 1.5; },
       "entropy_threshold must be in [0, 1], got 1.5"},
      {RoutingStrategy::kDynMole, [](RouterOptions& o) { o.entropy_threshold = -0.5; },
       "entropy_threshold must be in [0, 1], got -0.5"},
      {RoutingStrategy::kDynMole, [](RouterOptions& o) { o.keep_top_k = 0; },
       "keep_top_k must be in [1, 4] (num_experts), got 0"},
      {RoutingStrategy::kDynMole, [](RouterOptions& o) { o.keep_top_k = 6; },
       "keep_top_k must be in [1, 4] (num_experts), got 6"},
  };
  for (const Case& c : cases) {
    RouterOptions o = options_for(c.strategy);
    EXPECT_NO_THROW(o.validate(4));
    c.set(o);
    const std::string msg = error_of([&] { o.validate(4); });
    EXPECT_NE(msg.find(c.expected), std::string::npos) << "expected '" << c.expected << "' in '"
                                                       << msg << "'";
    // route() validates too.
    EXPECT_EQ(error_of([&] { moe::route(at::zeros({2, 4}), o); }), msg);
  }
  EXPECT_NE(error_of([] { options_for(RoutingStrategy::kDense).validate(0); })
                .find("at least one expert, got num_experts = 0"),
            std::string::npos);
  // Options a strategy does not read are not checked.
  RouterOptions o = options_for(RoutingStrategy::kSwitch);
  o.top_k = 9;
  o.top_p = 7.0;
  EXPECT_NO_THROW(o.validate(4));
}

}  // namespace
}  // namespace mole
