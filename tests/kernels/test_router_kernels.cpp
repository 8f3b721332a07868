// The fused router against moe::route. On the CPU: the plain-loop references of
// kernels/router_reference.h (the contract of the CUDA launchers) against the ATen path of
// moe::route, forward (pairs, weights, probabilities, counts) and the closed-form backward against
// ATen's autograd through it. On a GPU: moe::route on CUDA float32 logits (which takes the fused
// kernels of kernels/cuda/router_ops.h) against moe::route on the CPU, forward and backward.
//
// Tolerances (float32, max abs difference): the references and the CUDA kernels differ from ATen
// only in exp/log/pow and summation order, a few ulp of values in [0, 1] (probabilities, weights)
// or of order 1 (gradients for N(0, 1) probes). The pairs must be identical, which holds as long as
// no top-p partial sum or entropy lies within that rounding of its threshold: top_p and the DynMoLE
// threshold are moved into gaps between the data's partial sums and entropies (`fitted`), and the
// exact boundary cases use sums that every implementation computes exactly (all-equal logits over
// four experts).
//
// Legend: T tokens, E experts, N routed pairs.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cuda/router_ops.h"
#include "kernels/router_reference.h"
#include "moe/router.h"
#include "tests/test_util.h"

namespace mole {
namespace {

using kernels::RouterRule;
using kernels::RouterSelect;
using moe::RouterOptions;
using moe::RoutingStrategy;

constexpr double kForwardTol = 1e-6;   // probabilities and weights; measured 2.4e-7 on the CPU
constexpr double kBackwardTol = 5e-6;  // the logits' gradient; measured 7.2e-7 on the CPU

RouterSelect select_of(const RouterOptions& options) {
  const std::optional<RouterSelect> select = moe::fused_select(options);
  EXPECT_TRUE(select.has_value()) << "switch has no fused rule";
  return select.value_or(RouterSelect{});
}

// The reference launchers on host tensors, chained as router_ops.cpp chains the CUDA ones.
struct RefRouting {
  at::Tensor probs_TE, token_N, expert_N, weight_N, count_T, count_E, offsets_T1;
};

RefRouting reference_route(const at::Tensor& logits, const RouterOptions& options) {
  const at::Tensor logits_TE = logits.detach().to(at::kFloat).contiguous();
  const RouterSelect select = select_of(options);
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1);
  const int64_t C = kernels::router_columns(select, E);
  RefRouting r;
  r.probs_TE = at::empty({T, E}, at::kFloat);
  r.count_T = at::empty({T}, at::kLong);
  r.count_E = at::empty({E}, at::kLong);
  at::Tensor expert_TC = at::empty({T, C}, at::kLong), weight_TC = at::empty({T, C}, at::kFloat);
  at::Tensor token_TC = at::empty({T, C}, at::kLong);
  kernels::reference::route_forward(
      logits_TE.data_ptr<float>(), select, r.probs_TE.data_ptr<float>(),
      expert_TC.data_ptr<int64_t>(), weight_TC.data_ptr<float>(), token_TC.data_ptr<int64_t>(),
      r.count_T.data_ptr<int64_t>(), r.count_E.data_ptr<int64_t>(), T, E);
  r.offsets_T1 = at::empty({T + 1}, at::kLong);
  kernels::reference::routing_offsets(r.count_T.data_ptr<int64_t>(), T,
                                      r.offsets_T1.data_ptr<int64_t>());
  const int64_t N = r.offsets_T1[T].item<int64_t>();
  if (kernels::router_fixed_count(select.rule)) {
    EXPECT_EQ(N, T * C);
    r.token_N = token_TC.reshape({-1});
    r.expert_N = expert_TC.reshape({-1});
    r.weight_N = weight_TC.reshape({-1});
  } else {
    r.token_N = at::empty({N}, at::kLong);
    r.expert_N = at::empty({N}, at::kLong);
    r.weight_N = at::empty({N}, at::kFloat);
    kernels::reference::compact_routing(
        expert_TC.data_ptr<int64_t>(), weight_TC.data_ptr<float>(),
        r.offsets_T1.data_ptr<int64_t>(), T, C, r.token_N.data_ptr<int64_t>(),
        r.expert_N.data_ptr<int64_t>(), r.weight_N.data_ptr<float>());
  }
  return r;
}

at::Tensor reference_backward(const RefRouting& r, const RouterOptions& options,
                              const at::Tensor& grad_probs_TE, const at::Tensor& grad_weight_N) {
  const at::Tensor grad_p = grad_probs_TE.to(at::kFloat).contiguous();
  const at::Tensor grad_w = grad_weight_N.to(at::kFloat).contiguous();
  at::Tensor grad_logits_TE = at::empty_like(r.probs_TE);
  kernels::reference::route_backward(
      select_of(options), r.probs_TE.data_ptr<float>(), grad_p.data_ptr<float>(),
      r.expert_N.data_ptr<int64_t>(), r.weight_N.data_ptr<float>(), grad_w.data_ptr<float>(),
      r.offsets_T1.data_ptr<int64_t>(), grad_logits_TE.data_ptr<float>(), r.probs_TE.size(0),
      r.probs_TE.size(1));
  return grad_logits_TE;
}

// Max abs difference below `tol`, naming the worst element on failure.
void expect_near(const at::Tensor& got, const at::Tensor& want, double tol,
                 const std::string& what) {
  const at::Tensor a = got.detach().to(at::kCPU, at::kDouble).flatten();
  const at::Tensor b = want.detach().to(at::kCPU, at::kDouble).flatten();
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  if (a.numel() == 0) return;
  const at::Tensor diff = (a - b).abs();
  const int64_t worst = diff.argmax().item<int64_t>();
  const double err = diff[worst].item<double>();
  EXPECT_LE(err, tol) << what << ": max abs difference " << test::sci(err) << " at element "
                      << worst << ": got " << a[worst].item<double>() << ", want "
                      << b[worst].item<double>();
}

// Same pairs exactly, weights and probabilities within kForwardTol; counts from the pairs.
void expect_same_routing(const at::Tensor& token_N, const at::Tensor& expert_N,
                         const at::Tensor& weight_N, const at::Tensor& probs_TE,
                         const at::Tensor& count_E, const moe::RouterOutput& want) {
  ASSERT_TRUE(at::equal(token_N.cpu(), want.routing.token_N)) << "token_N differs";
  ASSERT_TRUE(at::equal(expert_N.cpu(), want.routing.expert_N)) << "expert_N differs";
  expect_near(weight_N, want.routing.weight_N, kForwardTol, "weight_N");
  expect_near(probs_TE, want.probs_TE, kForwardTol, "probs_TE");
  const int64_t E = want.probs_TE.size(1);
  EXPECT_TRUE(at::equal(count_E.cpu(), at::bincount(want.routing.expert_N, {}, E)))
      << "count_E " << count_E << " vs the pairs' " << at::bincount(want.routing.expert_N, {}, E);
}

RouterOptions options_of(RoutingStrategy strategy) {
  RouterOptions o;
  o.strategy = strategy;
  return o;
}

RouterOptions top_k(int64_t k) {
  RouterOptions o = options_of(RoutingStrategy::kTopK);
  o.top_k = k;
  return o;
}

RouterOptions top_p(double p) {
  RouterOptions o = options_of(RoutingStrategy::kTopP);
  o.top_p = p;
  return o;
}

// top_p and the threshold are fitted to the data later (see `fitted`).
RouterOptions dynmole(double q, int64_t keep, double p) {
  RouterOptions o = options_of(RoutingStrategy::kDynMole);
  o.entropy_q = q;
  o.keep_top_k = keep;
  o.top_p = p;
  return o;
}

std::string describe(const RouterOptions& o, int64_t E) {
  std::string s = std::string(moe::routing_strategy_name(o.strategy)) + " E=" + std::to_string(E);
  switch (o.strategy) {
    case RoutingStrategy::kTopK:
      return s + " K=" + std::to_string(o.top_k);
    case RoutingStrategy::kTopP:
      return s + " p=" + std::to_string(o.top_p);
    case RoutingStrategy::kDynMole:
      return s + " q=" + std::to_string(o.entropy_q) + " keep=" + std::to_string(o.keep_top_k) +
             " p=" + std::to_string(o.top_p) + " threshold=" + std::to_string(o.entropy_threshold);
    default:
      return s;
  }
}

// Every router configuration the tests sweep, for E experts.
std::vector<RouterOptions> configurations(int64_t E) {
  std::vector<RouterOptions> all = {top_k(1),
                                    top_k(E),
                                    top_p(0.3),
                                    top_p(0.6),
                                    top_p(0.9),
                                    top_p(1.0),
                                    options_of(RoutingStrategy::kDense)};
  if (E >= 2) {
    all.push_back(top_k(2));
    all.push_back(dynmole(1.0, 2, 0.5));
    all.push_back(dynmole(1.1, 2, 0.75));
    all.push_back(dynmole(0.7, 1, 0.4));
  } else {
    all.push_back(dynmole(1.1, 1, 0.75));
  }
  return all;
}

// A DynMoLE threshold in the widest gap between the tokens' entropies around the median, so that
// about half the tokens go dense and no entropy is within rounding of it. Checks both kinds exist.
double dynmole_threshold(const at::Tensor& logits_TE, double q) {
  const at::Tensor probs_TE = at::softmax(logits_TE.to(at::kFloat), 1);
  const at::Tensor s_T = std::get<0>(at::sort(moe::normalized_tsallis_entropy(probs_TE, q)));
  const int64_t T = s_T.size(0), first = T / 4, count = T - 2 * (T / 4);
  const at::Tensor lo = s_T.narrow(0, first, count - 1), hi = s_T.narrow(0, first + 1, count - 1);
  const int64_t widest = (hi - lo).argmax().item<int64_t>();
  EXPECT_GT((hi - lo)[widest].item<double>(), 1e-5)
      << "no clear entropy gap: the data do not separate dense tokens";
  return 0.5 * (lo[widest].item<double>() + hi[widest].item<double>());
}

// Random logits: continuous (randn scaled) or integer-valued in [-2, 2] (many exact ties).
at::Tensor random_logits(int64_t T, int64_t E, bool ties, uint64_t seed) {
  at::manual_seed(seed);
  return ties ? at::randint(-2, 3, {T, E}).to(at::kFloat) : at::randn({T, E}) * 2.0;
}

struct Sweep {
  int64_t T, E;
  bool ties;
  uint64_t seed;
};

std::vector<Sweep> sweeps(int64_t T) {
  std::vector<Sweep> all;
  uint64_t seed = 0;
  for (int64_t E : {1, 3, 8, 64}) {
    for (bool ties : {false, true}) all.push_back({T, E, ties, ++seed});
  }
  return all;
}

// The top_p closest to `wanted` that every token's partial sums of probabilities in rank order
// (0 included: the sum before the first) miss by at least 1e-6, so that implementations whose
// probabilities differ by rounding keep the same experts.
double clear_top_p(const at::Tensor& logits_TE, double wanted) {
  if (wanted >= 1.0 || logits_TE.size(0) == 0) return wanted;
  const at::Tensor probs_TE = at::softmax(logits_TE.to(at::kDouble), 1);
  const at::Tensor partial = std::get<0>(at::sort(probs_TE, 1, true)).cumsum(1).flatten();
  const at::Tensor sums =
      std::get<0>(at::sort(at::cat({at::zeros({1}, partial.options()), partial})));
  const int64_t n = sums.size(0);
  const at::Tensor lo = sums.narrow(0, 0, n - 1) + 1e-6, hi = sums.narrow(0, 1, n - 1) - 1e-6;
  const at::Tensor candidate = at::min(at::max(at::full_like(lo, wanted), lo), hi);
  const at::Tensor distance =
      at::where(hi > lo, (candidate - wanted).abs(), at::full_like(lo, 1e9));
  return candidate[distance.argmin().item<int64_t>()].item<double>();
}

// The options with top_p and the DynMoLE threshold moved clear of the data's rounding.
RouterOptions fitted(RouterOptions o, const at::Tensor& logits_TE) {
  if (o.strategy == RoutingStrategy::kTopP || o.strategy == RoutingStrategy::kDynMole) {
    o.top_p = clear_top_p(logits_TE, o.top_p);
  }
  if (o.strategy == RoutingStrategy::kDynMole && logits_TE.size(1) > 1) {
    o.entropy_threshold = dynmole_threshold(logits_TE, o.entropy_q);
  }
  return o;
}

TEST(RouterKernelReference, MatchesRouteOnRandomLogits) {
  for (const Sweep& s : sweeps(61)) {
    const at::Tensor logits_TE = random_logits(s.T, s.E, s.ties, s.seed);
    for (const RouterOptions& base : configurations(s.E)) {
      const RouterOptions o = fitted(base, logits_TE);
      SCOPED_TRACE(describe(o, s.E) + (s.ties ? " integer logits" : " continuous logits"));
      const moe::RouterOutput want = moe::route(logits_TE, o);
      const RefRouting got = reference_route(logits_TE, o);
      expect_same_routing(got.token_N, got.expert_N, got.weight_N, got.probs_TE, got.count_E, want);
      EXPECT_TRUE(at::equal(got.count_T, at::bincount(want.routing.token_N, {}, s.T)));
      if (o.strategy == RoutingStrategy::kDynMole && s.E > 1) {
        // The threshold splits the tokens: some use every expert, some fewer.
        const int64_t dense_tokens = got.count_T.eq(s.E).sum().item<int64_t>();
        EXPECT_GT(dense_tokens, 0);
        EXPECT_LT(dense_tokens, s.T);
      }
    }
  }
}

TEST(RouterKernelReference, HandWrittenTiesAndBoundaries) {
  struct Hand {
    std::string name;
    std::vector<float> logits;  // one token
    RouterOptions options;
    std::vector<int64_t> experts;
    std::vector<float> weights;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<Hand> cases = {
      {"tie for the top two: lower id first, weights exactly 1/2",
       {0, 2, 2, -1},
       top_k(2),
       {1, 2},
       {0.5f, 0.5f}},
      {"all equal, top_p = 0.5: 0.25 + 0.25 <= 0.5, so a third expert",
       {1, 1, 1, 1},
       top_p(0.5),
       {0, 1, 2},
       {0.25f, 0.25f, 0.25f}},
      {"all equal, top_p = 0.75: a fourth",
       {1, 1, 1, 1},
       top_p(0.75),
       {0, 1, 2, 3},
       {0.25f, 0.25f, 0.25f, 0.25f}},
      {"all equal: entropy 1 > 0.9, dense",
       {3, 3, 3, 3},
       dynmole(1.1, 1, 0.2),
       {0, 1, 2, 3},
       {0.25f, 0.25f, 0.25f, 0.25f}},
      {"NaN ranks first (ATen's descending sort)", {0, nan, 1}, top_k(2), {1, 2}, {nan, nan}},
  };
  for (const Hand& h : cases) {
    SCOPED_TRACE(h.name);
    const auto E = static_cast<int64_t>(h.logits.size());
    const at::Tensor logits_TE = at::tensor(h.logits).reshape({1, E});
    const RefRouting got = reference_route(logits_TE, h.options);
    EXPECT_EQ(std::vector<int64_t>(got.expert_N.data_ptr<int64_t>(),
                                   got.expert_N.data_ptr<int64_t>() + got.expert_N.numel()),
              h.experts);
    EXPECT_TRUE(at::allclose(got.weight_N, at::tensor(h.weights), 0.0, 0.0, /*equal_nan=*/true))
        << got.weight_N;
    const moe::RouterOutput want = moe::route(logits_TE, h.options);
    EXPECT_TRUE(at::equal(got.expert_N, want.routing.expert_N)) << want.routing.expert_N;
  }
}

TEST(RouterKernelReference, NoTokens) {
  for (const RouterOptions& o : configurations(4)) {
    SCOPED_TRACE(describe(o, 4));
    const at::Tensor logits_TE = at::zeros({0, 4});
    const RefRouting got = reference_route(logits_TE, o);
    EXPECT_EQ(got.token_N.numel(), 0);
    EXPECT_EQ(got.offsets_T1.item<int64_t>(), 0);
    EXPECT_TRUE(at::equal(got.count_E, at::zeros({4}, at::kLong)));
    const moe::RouterOutput want = moe::route(logits_TE, o);
    EXPECT_EQ(want.routing.token_N.numel(), 0);
  }
}

// The logits' gradient through moe::route for probes on weight_N and probs_TE (loss
// <weight_N, g_N> + <probs_TE, G_TE>), and the forward it came from.
struct AtenGrad {
  moe::RouterOutput out;
  at::Tensor grad_logits_TE;
};

AtenGrad aten_backward(const at::Tensor& logits_TE, const RouterOptions& o,
                       const at::Tensor& grad_probs_TE, const at::Tensor& grad_weight_N) {
  at::Tensor x = logits_TE.detach().clone().requires_grad_(true);
  AtenGrad a;
  a.out = moe::route(x, o);
  ((a.out.routing.weight_N * grad_weight_N.to(x.device())).sum() +
   (a.out.probs_TE * grad_probs_TE.to(x.device())).sum())
      .backward();
  a.grad_logits_TE = x.grad();
  return a;
}

TEST(RouterKernelReference, ClosedFormBackwardMatchesAtenAutograd) {
  for (const Sweep& s : sweeps(29)) {
    const at::Tensor logits_TE = random_logits(s.T, s.E, s.ties, s.seed);
    for (const RouterOptions& base : configurations(s.E)) {
      const RouterOptions o = fitted(base, logits_TE);
      SCOPED_TRACE(describe(o, s.E) + (s.ties ? " integer logits" : " continuous logits"));
      const RefRouting ref = reference_route(logits_TE, o);
      const at::Tensor grad_probs_TE = at::randn({s.T, s.E});
      const at::Tensor grad_weight_N = at::randn({ref.weight_N.size(0)});
      const AtenGrad want = aten_backward(logits_TE, o, grad_probs_TE, grad_weight_N);
      ASSERT_TRUE(at::equal(ref.expert_N, want.out.routing.expert_N));
      expect_near(reference_backward(ref, o, grad_probs_TE, grad_weight_N), want.grad_logits_TE,
                  kBackwardTol, "grad logits");
      // Each probe alone: the weights' path and the probabilities' path separately.
      expect_near(
          reference_backward(ref, o, at::zeros_like(grad_probs_TE), grad_weight_N),
          aten_backward(logits_TE, o, at::zeros_like(grad_probs_TE), grad_weight_N).grad_logits_TE,
          kBackwardTol, "grad logits from the weights");
      expect_near(
          reference_backward(ref, o, grad_probs_TE, at::zeros_like(grad_weight_N)),
          aten_backward(logits_TE, o, grad_probs_TE, at::zeros_like(grad_weight_N)).grad_logits_TE,
          kBackwardTol, "grad logits from the probabilities");
    }
  }
}

TEST(RouterKernelReference, RouteCudaRejectsCpuLogits) {
  const std::string message = test::error_of([] {
    kernels::route_cuda(at::zeros({2, 4}), RouterSelect{});
  });
  EXPECT_NE(message.find("route_cuda"), std::string::npos) << message;
}

void skip_without_fused_router() {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  if (!kernels::cuda_router_kernels_built()) {
    GTEST_SKIP() << "CUDA router kernels not built (MOLE_HAVE_CUDA_KERNELS off): CUDA logits take "
                    "the ATen path";
  }
}

// The backward node of the probabilities: RouterFunction on the fused path.
std::string backward_of(const moe::RouterOutput& out) {
  return out.probs_TE.grad_fn() != nullptr ? out.probs_TE.grad_fn()->name() : "<no grad_fn>";
}

bool ran_fused(const moe::RouterOutput& out) {
  return backward_of(out).find("RouterFunction") != std::string::npos;
}

// T = 10000 at E = 64 grid-strides (more token groups than the 2048 blocks hold) and scans many
// tiles of 1024 tokens.
TEST(RouterKernelCuda, MatchesCpuPathForwardAndBackward) {
  skip_without_fused_router();
  if (::testing::Test::IsSkipped()) return;
  std::vector<Sweep> all = sweeps(301);
  all.push_back({10000, 64, false, 99});
  for (const Sweep& s : all) {
    const at::Tensor logits_TE = random_logits(s.T, s.E, s.ties, s.seed);
    for (const RouterOptions& base : configurations(s.E)) {
      const RouterOptions o = fitted(base, logits_TE);
      SCOPED_TRACE(describe(o, s.E) + " T=" + std::to_string(s.T) +
                   (s.ties ? " integer logits" : " continuous logits"));
      const int64_t N = moe::route(logits_TE, o).routing.weight_N.size(0);
      const at::Tensor grad_probs_TE = at::randn({s.T, s.E});
      const at::Tensor grad_weight_N = at::randn({N});
      const AtenGrad want = aten_backward(logits_TE, o, grad_probs_TE, grad_weight_N);

      const AtenGrad got = aten_backward(logits_TE.cuda(), o, grad_probs_TE, grad_weight_N);
      ASSERT_TRUE(ran_fused(got.out)) << backward_of(got.out);
      const kernels::FusedRouting fused = kernels::route_cuda(logits_TE.cuda(), select_of(o));
      expect_same_routing(got.out.routing.token_N, got.out.routing.expert_N,
                          got.out.routing.weight_N, got.out.probs_TE, fused.count_E, want.out);
      expect_near(got.grad_logits_TE, want.grad_logits_TE, kBackwardTol, "grad logits");

      // Deterministic: a second run gives the same bits.
      EXPECT_TRUE(at::equal(fused.weight_N, got.out.routing.weight_N));
      EXPECT_TRUE(at::equal(fused.probs_TE, got.out.probs_TE));
      const AtenGrad again = aten_backward(logits_TE.cuda(), o, grad_probs_TE, grad_weight_N);
      EXPECT_TRUE(at::equal(again.grad_logits_TE, got.grad_logits_TE));
    }
  }
}

TEST(RouterKernelCuda, EdgeCasesAndFallbacks) {
  skip_without_fused_router();
  if (::testing::Test::IsSkipped()) return;
  for (const RouterOptions& o : configurations(4)) {
    SCOPED_TRACE(describe(o, 4));
    const moe::RouterOutput out = moe::route(at::zeros({0, 4}, at::kCUDA), o);
    EXPECT_EQ(out.routing.token_N.numel(), 0);
    EXPECT_TRUE(
        at::equal(kernels::route_cuda(at::zeros({0, 4}, at::kCUDA), select_of(o)).count_E.cpu(),
                  at::zeros({4}, at::kLong)));
  }
  // Logits that require grad, so that every path leaves a grad_fn that names it.
  auto on_gpu = [](const at::Tensor& t) { return t.cuda().requires_grad_(true); };
  const at::Tensor logits_TE = random_logits(17, 8, false, 7);
  // Non-contiguous and bfloat16 logits take the fused path (after a copy, a float32 cast).
  const at::Tensor strided_TE = on_gpu(logits_TE.t().contiguous()).t();
  const moe::RouterOutput strided = moe::route(strided_TE, top_k(2));
  EXPECT_TRUE(ran_fused(strided)) << backward_of(strided);
  expect_same_routing(strided.routing.token_N, strided.routing.expert_N, strided.routing.weight_N,
                      strided.probs_TE, at::bincount(strided.routing.expert_N.cpu(), {}, 8),
                      moe::route(logits_TE, top_k(2)));
  EXPECT_TRUE(ran_fused(moe::route(on_gpu(logits_TE.to(at::kBFloat16)), top_k(2))));
  // Switch, E > 64 and float64 logits keep the ATen path.
  EXPECT_FALSE(ran_fused(moe::route(on_gpu(logits_TE), options_of(RoutingStrategy::kSwitch))));
  EXPECT_FALSE(ran_fused(moe::route(on_gpu(random_logits(5, 65, false, 8)), top_k(2))));
  EXPECT_FALSE(ran_fused(moe::route(on_gpu(logits_TE.to(at::kDouble)), top_k(2))));
}

}  // namespace
}  // namespace mole
