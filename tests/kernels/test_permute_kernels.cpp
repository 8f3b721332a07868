// The permutation kernels against their references. On the CPU: the plain-loop references of
// kernels/permute_reference.h (the contract of the CUDA launchers) against the ATen paths of
// kernels/permute.h, forward and, used as the backward, against ATen's autograd. On a GPU: the
// CUDA twins (reached through permute_rows / unpermute_combine on CUDA tensors) against the CPU
// ATen path, forward and backward.
//
// Legend: T tokens, D features, E experts, N routed pairs (= rows).
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/function.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cuda/permute_ops.h"
#include "kernels/permute.h"
#include "kernels/permute_reference.h"
#include "tests/test_util.h"

namespace mole {
namespace {

using kernels::PermutePlan;

at::Tensor longs(const std::vector<int64_t>& v) {
  return v.empty() ? at::empty({0}, at::kLong) : at::tensor(v, at::kLong);
}

std::vector<int64_t> to_vec(const at::Tensor& t) {
  at::Tensor c = t.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// The combine index of a plan, by plain loops: routing pairs grouped by token (routing order
// within a token) and each token's range [offsets_T1[t], offsets_T1[t + 1]).
struct HostIndex {
  at::Tensor pairs_by_token_N;
  at::Tensor offsets_T1;
};

HostIndex host_index(const PermutePlan& plan) {
  const std::vector<int64_t> token = to_vec(plan.token_N), inverse = to_vec(plan.inverse_N);
  const auto num_pairs = static_cast<int64_t>(token.size());
  std::vector<int64_t> offsets(static_cast<size_t>(plan.num_tokens) + 1, 0);
  auto token_of_pair = [&](int64_t p) {
    return token[static_cast<size_t>(inverse[static_cast<size_t>(p)])];
  };
  for (int64_t p = 0; p < num_pairs; ++p) ++offsets[static_cast<size_t>(token_of_pair(p)) + 1];
  for (size_t t = 1; t < offsets.size(); ++t) offsets[t] += offsets[t - 1];
  std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1), pairs(token.size());
  for (int64_t p = 0; p < num_pairs; ++p) {
    pairs[static_cast<size_t>(cursor[static_cast<size_t>(token_of_pair(p))]++)] = p;
  }
  return {longs(pairs), longs(offsets)};
}

// Tensor-facing calls of the reference loops, for contiguous CPU tensors of type T.
template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
at::Tensor ref_gather(const at::Tensor& x_TD, const at::Tensor& token_N,
                      const at::Tensor& scale_N) {
  at::Tensor x = x_TD.detach().contiguous(), token = token_N.contiguous();
  at::Tensor scale = scale_N.defined() ? scale_N.detach().contiguous() : at::Tensor();
  at::Tensor out_ND = at::empty({token.size(0), x.size(1)}, x.options());
  kernels::reference::gather_rows(x.data_ptr<T>(), token.data_ptr<int64_t>(), ptr_or_null<T>(scale),
                                  out_ND.data_ptr<T>(), token.size(0), x.size(1));
  return out_ND;
}

template <typename T>
at::Tensor ref_combine(const at::Tensor& rows_ND, const PermutePlan& plan, const HostIndex& index,
                       const at::Tensor& weight_N) {
  at::Tensor rows = rows_ND.detach().contiguous(), inverse = plan.inverse_N.contiguous();
  at::Tensor weight = weight_N.defined() ? weight_N.detach().contiguous() : at::Tensor();
  at::Tensor y_TD = at::empty({plan.num_tokens, rows.size(1)}, rows.options());
  kernels::reference::combine_rows(rows.data_ptr<T>(), inverse.data_ptr<int64_t>(),
                                   index.pairs_by_token_N.data_ptr<int64_t>(),
                                   index.offsets_T1.data_ptr<int64_t>(), ptr_or_null<T>(weight),
                                   y_TD.data_ptr<T>(), plan.num_tokens, rows.size(1));
  return y_TD;
}

template <typename T>
at::Tensor ref_row_dot(const at::Tensor& rows_ND, const at::Tensor& g_TD,
                       const at::Tensor& token_N) {
  at::Tensor rows = rows_ND.detach().contiguous(), g = g_TD.detach().contiguous();
  at::Tensor token = token_N.contiguous();
  at::Tensor out_N = at::empty({rows.size(0)}, rows.options());
  kernels::reference::row_dot(rows.data_ptr<T>(), g.data_ptr<T>(), token.data_ptr<int64_t>(),
                              out_N.data_ptr<T>(), rows.size(0), rows.size(1));
  return out_N;
}

// Gradient of a leaf, zeros when autograd left it undefined.
at::Tensor grad_of(const at::Tensor& t) {
  return t.grad().defined() ? t.grad() : at::zeros_like(t);
}

using test::expect_close;

struct Case {
  std::string name;
  std::vector<int64_t> token, expert;
  int64_t num_tokens, num_experts;
};

std::vector<Case> hand_written_cases() {
  return {
      {"uneven splits, expert 2 empty, token 4 without pairs",
       {0, 0, 1, 1, 2, 2, 3, 3},
       {3, 0, 0, 1, 3, 0, 1, 3},
       5,
       4},
      {"K = E", {0, 0, 0, 1, 1, 1}, {2, 0, 1, 1, 2, 0}, 2, 3},
      {"uneven pairs per token, token 1 without pairs", {0, 2, 2, 2, 3}, {1, 0, 1, 2, 1}, 4, 3},
      {"all tokens on one expert", {0, 1, 2}, {2, 2, 2}, 3, 4},
      {"one expert", {0, 1, 2}, {0, 0, 0}, 3, 1},
      {"no pairs", {}, {}, 2, 3},
  };
}

// x[t] = 100 * t + column: rows say which token they came from; integer-valued, so exact.
at::Tensor token_rows(int64_t tokens, int64_t dim, at::ScalarType dtype) {
  return (at::arange(tokens, at::kDouble).unsqueeze(1) * 100 + at::arange(dim, at::kDouble))
      .to(dtype)
      .contiguous();
}

TEST(PermuteKernelReference, ForwardMatchesAtenOnHandWrittenCases) {
  const int64_t D = 3;
  for (const Case& c : hand_written_cases()) {
    SCOPED_TRACE(c.name);
    PermutePlan plan =
        kernels::make_permute_plan(longs(c.token), longs(c.expert), c.num_tokens, c.num_experts);
    const HostIndex index = host_index(plan);
    const int64_t N = plan.num_rows();
    at::Tensor x_TD = token_rows(c.num_tokens, D, at::kFloat);
    at::Tensor weight_N = at::arange(1, N + 1, at::kFloat);  // pair p weighs p + 1

    at::Tensor rows_ND = kernels::permute_rows(x_TD, plan);
    EXPECT_TRUE(at::equal(ref_gather<float>(x_TD, plan.token_N, at::Tensor()), rows_ND));
    at::Tensor scale_N = weight_N.index_select(0, plan.order_N);
    EXPECT_TRUE(
        at::equal(ref_gather<float>(x_TD, plan.token_N, scale_N), rows_ND * scale_N.unsqueeze(1)));

    EXPECT_TRUE(at::equal(ref_combine<float>(rows_ND, plan, index, weight_N),
                          kernels::unpermute_combine(rows_ND, plan, weight_N)));
    EXPECT_TRUE(at::equal(ref_combine<float>(rows_ND, plan, index, at::Tensor()),
                          kernels::unpermute_combine(rows_ND, plan, at::ones({N}))));
  }
}

// The reference loops used as the backward (grad_rows = gather of grad_y scaled by the sorted
// weights, grad_w = row_dot in routing order, grad_x = combine of grad_rows with weights 1)
// against ATen's autograd through permute_rows and unpermute_combine.
struct Grads {
  at::Tensor rows_ND, y_TD, grad_x_TD, grad_rows_ND, grad_w_N;
};

Grads aten_forward_backward(const at::Tensor& x_TD, const at::Tensor& weight_N,
                            const at::Tensor& grad_y_TD, const PermutePlan& plan) {
  at::Tensor x = x_TD.detach().clone().requires_grad_(true);
  at::Tensor w = weight_N.detach().clone().requires_grad_(true);
  at::Tensor rows_ND = kernels::permute_rows(x, plan);
  rows_ND.retain_grad();
  at::Tensor y_TD = kernels::unpermute_combine(rows_ND, plan, w);
  (y_TD * grad_y_TD).sum().backward();
  return {rows_ND.detach(), y_TD.detach(), grad_of(x), grad_of(rows_ND), grad_of(w)};
}

template <typename T>
Grads reference_forward_backward(const at::Tensor& x_TD, const at::Tensor& weight_N,
                                 const at::Tensor& grad_y_TD, const PermutePlan& plan) {
  const HostIndex index = host_index(plan);
  Grads g;
  g.rows_ND = ref_gather<T>(x_TD, plan.token_N, at::Tensor());
  g.y_TD = ref_combine<T>(g.rows_ND, plan, index, weight_N);
  g.grad_rows_ND = ref_gather<T>(grad_y_TD, plan.token_N, weight_N.index_select(0, plan.order_N));
  g.grad_w_N = ref_row_dot<T>(g.rows_ND, grad_y_TD, plan.token_N).index_select(0, plan.inverse_N);
  g.grad_x_TD = ref_combine<T>(g.grad_rows_ND, plan, index, at::Tensor());
  return g;
}

// A hand-written case's plan and integer-valued data (rows, weights 1..N, an output-gradient
// probe), so every sum is exact in any order.
struct HandData {
  PermutePlan plan;
  at::Tensor x_TD, weight_N, grad_y_TD;
};

HandData hand_data(const Case& c, int64_t D, at::ScalarType dtype) {
  HandData h;
  h.plan = kernels::make_permute_plan(longs(c.token), longs(c.expert), c.num_tokens, c.num_experts);
  h.x_TD = token_rows(c.num_tokens, D, dtype);
  h.weight_N = at::arange(1, h.plan.num_rows() + 1, dtype);
  h.grad_y_TD = (at::arange(c.num_tokens * D, dtype) - 5).reshape({c.num_tokens, D});
  return h;
}

// Every output and gradient equal (on the host).
void expect_equal(const Grads& got, const Grads& want) {
  EXPECT_TRUE(at::equal(got.rows_ND.cpu(), want.rows_ND));
  EXPECT_TRUE(at::equal(got.y_TD.cpu(), want.y_TD));
  EXPECT_TRUE(at::equal(got.grad_rows_ND.cpu(), want.grad_rows_ND));
  EXPECT_TRUE(at::equal(got.grad_w_N.cpu(), want.grad_w_N));
  EXPECT_TRUE(at::equal(got.grad_x_TD.cpu(), want.grad_x_TD));
}

TEST(PermuteKernelReference, BackwardMatchesAtenAutogradOnHandWrittenCases) {
  for (const Case& c : hand_written_cases()) {
    SCOPED_TRACE(c.name);
    const HandData h = hand_data(c, 4, at::kDouble);
    expect_equal(reference_forward_backward<double>(h.x_TD, h.weight_N, h.grad_y_TD, h.plan),
                 aten_forward_backward(h.x_TD, h.weight_N, h.grad_y_TD, h.plan));
  }
}

// A random routing: T tokens with up to K pairs each (some dropped, so some tokens have none and
// the per-expert counts are uneven), expert ids in [0, E).
struct RandomRouting {
  at::Tensor token_N, expert_N;
  int64_t num_tokens, num_experts, dim;
};

RandomRouting random_routing(uint64_t seed) {
  at::manual_seed(seed);
  const int64_t T = 3 + static_cast<int64_t>(seed % 7), K = 1 + static_cast<int64_t>(seed % 4);
  const int64_t E = 2 + static_cast<int64_t>(seed % 5), D = 1 + static_cast<int64_t>(seed * 5 % 11);
  at::Tensor token_N = at::arange(T, at::kLong).repeat_interleave(K);
  at::Tensor expert_N = at::randint(E, {T * K}, at::kLong);
  at::Tensor keep_N = at::rand({T * K}) < 0.75;
  keep_N[0].fill_(true);  // at least one pair
  return {token_N.masked_select(keep_N), expert_N.masked_select(keep_N), T, E, D};
}

TEST(PermuteKernelReference, RandomFloat64ForwardAndBackward) {
  for (uint64_t seed = 0; seed < 12; ++seed) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    const RandomRouting r = random_routing(seed);
    PermutePlan plan =
        kernels::make_permute_plan(r.token_N, r.expert_N, r.num_tokens, r.num_experts);
    at::Tensor x_TD = at::randn({r.num_tokens, r.dim}, at::kDouble);
    at::Tensor weight_N = at::rand({plan.num_rows()}, at::kDouble);
    at::Tensor grad_y_TD = at::randn({r.num_tokens, r.dim}, at::kDouble);
    const Grads want = aten_forward_backward(x_TD, weight_N, grad_y_TD, plan);
    const Grads got = reference_forward_backward<double>(x_TD, weight_N, grad_y_TD, plan);
    EXPECT_TRUE(at::equal(got.rows_ND, want.rows_ND));
    expect_close(got.y_TD, want.y_TD, 1e-14, "y");
    expect_close(got.grad_rows_ND, want.grad_rows_ND, 1e-14, "grad rows");
    expect_close(got.grad_w_N, want.grad_w_N, 1e-14, "grad weight");
    expect_close(got.grad_x_TD, want.grad_x_TD, 1e-14, "grad x");
  }
}

// CUDA twins against the CPU ATen path. Tolerances: float64 and float32 differ from the CPU only
// in summation order; bfloat16 rounds differently (the kernels accumulate in float32 and round
// once, the ATen path rounds each product and sum to bfloat16).
TEST(PermuteKernelCuda, MatchesCpuPathForwardAndBackward) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  if (!kernels::cuda_permute_kernels_built()) {
    GTEST_SKIP() << "CUDA permute kernels not built (MOLE_HAVE_CUDA_KERNELS off): CUDA tensors "
                    "take the ATen path";
  }
  struct Precision {
    at::ScalarType rows, weights;
    double tol;
  };
  for (const Precision& p :
       {Precision{at::kDouble, at::kDouble, 1e-12}, Precision{at::kFloat, at::kFloat, 1e-5},
        Precision{at::kBFloat16, at::kFloat, 2e-2}}) {
    for (uint64_t seed = 0; seed < 6; ++seed) {
      SCOPED_TRACE(std::string("dtype ") + c10::toString(p.rows) + ", seed " +
                   std::to_string(seed));
      const RandomRouting r = random_routing(seed);
      const int64_t N = r.token_N.size(0);
      at::Tensor x_TD = at::randn({r.num_tokens, r.dim}).to(p.rows);
      at::Tensor weight_N = at::rand({N}).to(p.weights);
      at::Tensor grad_y_TD = at::randn({r.num_tokens, r.dim}).to(p.rows);
      PermutePlan cpu_plan =
          kernels::make_permute_plan(r.token_N, r.expert_N, r.num_tokens, r.num_experts);
      const Grads want = aten_forward_backward(x_TD, weight_N, grad_y_TD, cpu_plan);

      PermutePlan plan = kernels::make_permute_plan(r.token_N.cuda(), r.expert_N.cuda(),
                                                    r.num_tokens, r.num_experts);
      at::Tensor x = x_TD.cuda().requires_grad_(true);
      at::Tensor w = weight_N.cuda().requires_grad_(true);
      at::Tensor rows_ND = kernels::permute_rows(x, plan);
      // The CUDA twin ran, not the ATen path (its backward would be IndexSelectBackward).
      ASSERT_NE(rows_ND.grad_fn()->name().find("PermuteRowsFunction"), std::string::npos)
          << rows_ND.grad_fn()->name();
      rows_ND.retain_grad();
      at::Tensor y_TD = kernels::unpermute_combine(rows_ND, plan, w);
      ASSERT_NE(y_TD.grad_fn()->name().find("UnpermuteCombineFunction"), std::string::npos)
          << y_TD.grad_fn()->name();
      (y_TD * grad_y_TD.cuda()).sum().backward();

      EXPECT_TRUE(at::equal(rows_ND.detach().cpu(), want.rows_ND));
      expect_close(y_TD, want.y_TD, p.tol, "y");
      expect_close(grad_of(rows_ND), want.grad_rows_ND, p.tol, "grad rows");
      expect_close(grad_of(w), want.grad_w_N, p.tol, "grad weight");
      expect_close(grad_of(x), want.grad_x_TD, p.tol, "grad x");
      EXPECT_EQ(grad_of(w).scalar_type(), p.weights);
    }
  }
}

TEST(PermuteKernelCuda, EdgeCasesAndHostPlan) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  if (!kernels::cuda_permute_kernels_built()) {
    GTEST_SKIP() << "CUDA permute kernels not built (MOLE_HAVE_CUDA_KERNELS off): CUDA tensors "
                    "take the ATen path";
  }
  for (const Case& c : hand_written_cases()) {
    SCOPED_TRACE(c.name);
    // A plan made on the host, used with CUDA tensors (its index tensors are copied over).
    const HandData h = hand_data(c, 3, at::kFloat);
    at::Tensor x = h.x_TD.cuda().requires_grad_(true);
    at::Tensor w = h.weight_N.cuda().requires_grad_(true);
    at::Tensor rows_ND = kernels::permute_rows(x, h.plan);
    rows_ND.retain_grad();
    at::Tensor y_TD = kernels::unpermute_combine(rows_ND, h.plan, w);
    (y_TD * h.grad_y_TD.cuda()).sum().backward();
    expect_equal({rows_ND.detach(), y_TD.detach(), grad_of(x), grad_of(rows_ND), grad_of(w)},
                 aten_forward_backward(h.x_TD, h.weight_N, h.grad_y_TD, h.plan));
  }
  // Non-contiguous input; float16 keeps the ATen path.
  at::Tensor x_DT = token_rows(4, 3, at::kFloat).t().contiguous().cuda();
  PermutePlan plan = kernels::make_permute_plan(longs({0, 3, 3}), longs({1, 0, 1}), 4, 2);
  EXPECT_TRUE(at::equal(kernels::permute_rows(x_DT.t(), plan).cpu(),
                        kernels::permute_rows(x_DT.t().cpu(), plan)));
  at::Tensor half_rows = kernels::permute_rows(x_DT.t().to(at::kHalf), plan);
  EXPECT_TRUE(
      at::equal(half_rows.cpu().to(at::kFloat), kernels::permute_rows(x_DT.t().cpu(), plan)));
}

}  // namespace
}  // namespace mole
