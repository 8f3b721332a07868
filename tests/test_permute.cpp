// Hand-written cases for the token permutation and grouped LoRA kernels: uneven splits, an expert
// with zero tokens, one expert, all tokens on one expert, K = E; gradients against a dense
// per-pair reference.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "kernels/check.h"
#include "kernels/grouped_lora.h"
#include "kernels/permute.h"
#include "tests/test_util.h"

namespace mole {
namespace {

at::Tensor longs(std::vector<int64_t> v) { return at::tensor(v, at::kLong); }
std::vector<int64_t> to_vec(const at::Tensor& t) {
  at::Tensor c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// x[t] = 100 * t + column: rows say which token they came from.
at::Tensor token_rows(int64_t tokens, int64_t dim) {
  return (at::arange(tokens, at::kFloat).unsqueeze(1) * 100 + at::arange(dim, at::kFloat)).contiguous();
}

TEST(Permute, UnevenSplitsWithAnEmptyExpert) {
  // 4 tokens, K = 2, E = 4; expert 2 gets nothing.
  at::Tensor token = longs({0, 0, 1, 1, 2, 2, 3, 3});
  at::Tensor expert = longs({3, 0, 0, 1, 3, 0, 1, 3});
  kernels::PermutePlan plan = kernels::make_permute_plan(token, expert, 4, 4);
  EXPECT_EQ(plan.counts, (std::vector<int64_t>{3, 2, 0, 3}));
  // Stable: pairs of one expert keep routing order.
  EXPECT_EQ(to_vec(plan.order_N), (std::vector<int64_t>{1, 2, 5, 3, 6, 0, 4, 7}));
  EXPECT_EQ(to_vec(plan.token_N), (std::vector<int64_t>{0, 1, 2, 1, 3, 0, 2, 3}));
  EXPECT_EQ(to_vec(plan.inverse_N), (std::vector<int64_t>{5, 0, 1, 3, 6, 2, 4, 7}));

  at::Tensor x = token_rows(4, 3);
  at::Tensor rows = kernels::permute_rows(x, plan);
  EXPECT_EQ(to_vec(rows.select(1, 0)), (std::vector<int64_t>{0, 100, 200, 100, 300, 0, 200, 300}));

  // Combine identity rows with integer weights: y[t] = (w1 + w2) * x[t].
  at::Tensor weight = at::tensor({1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f});
  at::Tensor y = kernels::unpermute_combine(rows, plan, weight);
  at::Tensor expected = x * at::tensor({3.f, 7.f, 11.f, 15.f}).unsqueeze(1);
  EXPECT_TRUE(at::equal(y, expected));
}

TEST(Permute, OneExpertAndAllTokensOnOneExpert) {
  at::Tensor token = longs({0, 1, 2});
  kernels::PermutePlan one = kernels::make_permute_plan(token, longs({0, 0, 0}), 3, 1);
  EXPECT_EQ(one.counts, (std::vector<int64_t>{3}));
  EXPECT_EQ(to_vec(one.order_N), (std::vector<int64_t>{0, 1, 2}));
  kernels::PermutePlan skewed = kernels::make_permute_plan(token, longs({2, 2, 2}), 3, 4);
  EXPECT_EQ(skewed.counts, (std::vector<int64_t>{0, 0, 3, 0}));
  at::Tensor x = token_rows(3, 2);
  EXPECT_TRUE(at::equal(kernels::unpermute_combine(kernels::permute_rows(x, skewed), skewed,
                                                   at::ones({3})),
                        x));
}

TEST(Permute, KEqualsEAndDroppedTokens) {
  // K = E = 3 for 2 tokens: every expert sees every token.
  at::Tensor token = longs({0, 0, 0, 1, 1, 1});
  at::Tensor expert = longs({2, 0, 1, 1, 2, 0});
  kernels::PermutePlan plan = kernels::make_permute_plan(token, expert, 2, 3);
  EXPECT_EQ(plan.counts, (std::vector<int64_t>{2, 2, 2}));
  EXPECT_EQ(to_vec(plan.token_N), (std::vector<int64_t>{0, 1, 0, 1, 0, 1}));
  // A token with no pairs (token 1 of 3 here) combines to zeros.
  kernels::PermutePlan sparse = kernels::make_permute_plan(longs({0, 2}), longs({1, 0}), 3, 2);
  at::Tensor y = kernels::unpermute_combine(kernels::permute_rows(token_rows(3, 2), sparse), sparse,
                                            at::ones({2}));
  EXPECT_TRUE(at::equal(y[1], at::zeros({2})));
  EXPECT_TRUE(at::equal(y[2], at::tensor({200.f, 201.f})));
  // No pairs at all.
  kernels::PermutePlan empty =
      kernels::make_permute_plan(at::empty({0}, at::kLong), at::empty({0}, at::kLong), 2, 3);
  EXPECT_EQ(empty.counts, (std::vector<int64_t>{0, 0, 0}));
  EXPECT_TRUE(at::equal(
      kernels::unpermute_combine(kernels::permute_rows(token_rows(2, 2), empty), empty, at::ones({0})),
      at::zeros({2, 2})));
}

TEST(Permute, RangeErrorsNameTheValue) {
  try {
    kernels::make_permute_plan(longs({0, 1}), longs({0, 4}), 2, 4);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expert id 4 outside [0, 4)"), std::string::npos);
  }
  EXPECT_THROW(kernels::make_permute_plan(longs({0, 5}), longs({0, 1}), 2, 4), Error);
  EXPECT_THROW(kernels::make_permute_plan(longs({0}), longs({0, 1}), 2, 4), Error);
}

// Dense per-pair reference: out[t] = sum over pairs (t, e) of w * scale * B_e A_e x_t.
at::Tensor dense_reference(const at::Tensor& x, const at::Tensor& token, const at::Tensor& expert,
                           const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double s) {
  at::Tensor out = at::zeros({x.size(0), b.size(1)}, x.options());
  for (int64_t i = 0; i < token.size(0); ++i) {
    const int64_t t = token[i].item<int64_t>(), e = expert[i].item<int64_t>();
    out = out.index_add(0, token.narrow(0, i, 1),
                        (w[i] * s * at::matmul(b[e], at::matmul(a[e], x[t]))).unsqueeze(0));
  }
  return out;
}

TEST(GroupedLora, MatchesDensePerPairReferenceWithGradients) {
  at::manual_seed(3);
  const int64_t T = 5, I = 6, O = 4, E = 4, r = 2;
  at::Tensor token = longs({0, 0, 1, 1, 2, 2, 3, 3, 4, 4});
  at::Tensor expert = longs({1, 3, 3, 1, 0, 1, 1, 3, 3, 0});  // expert 2 gets no tokens
  auto make = [](std::vector<int64_t> shape) {
    return at::randn(shape, at::kDouble).requires_grad_(true);
  };
  at::Tensor x = make({T, I}), a = make({E, r, I}), b = make({E, O, r}), w = make({10});

  kernels::PermutePlan plan = kernels::make_permute_plan(token, expert, T, E);
  at::Tensor rows = kernels::permute_rows(x, plan);
  at::Tensor y = kernels::unpermute_combine(kernels::grouped_lora(rows, a, b, plan.counts, 1.5), plan, w);
  at::Tensor ref = dense_reference(x, token, expert, w, a, b, 1.5);
  EXPECT_LT(test::rel_error(y, ref), 1e-12);

  at::Tensor probe = at::randn({T, O}, at::kDouble);
  auto grads = [&](const at::Tensor& out) {
    for (at::Tensor t : {x, a, b, w}) {
      if (t.grad().defined()) t.mutable_grad().zero_();
    }
    (out * probe).sum().backward();
    return std::vector<at::Tensor>{x.grad().clone(), a.grad().clone(), b.grad().clone(),
                                   w.grad().clone()};
  };
  std::vector<at::Tensor> got = grads(y);
  std::vector<at::Tensor> want = grads(dense_reference(x, token, expert, w, a, b, 1.5));
  for (size_t i = 0; i < got.size(); ++i) EXPECT_LT(test::rel_error(got[i], want[i]), 1e-12) << i;
  EXPECT_EQ(got[1][2].abs().sum().item<double>(), 0.0);  // the idle expert's A
}

TEST(GroupedLora, NoRowsStillReachesTheWeights) {
  at::Tensor a = at::randn({2, 2, 3}).requires_grad_(true);
  at::Tensor b = at::randn({2, 4, 2}).requires_grad_(true);
  at::Tensor y = kernels::grouped_lora(at::empty({0, 3}), a, b, {0, 0}, 1.0);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{0, 4}));
  y.sum().backward();
  ASSERT_TRUE(a.grad().defined());
  EXPECT_EQ(a.grad().abs().sum().item<float>(), 0.f);
}

TEST(GroupedLora, ShapeErrors) {
  at::Tensor a = at::randn({2, 2, 3}), b = at::randn({2, 4, 2});
  EXPECT_THROW(kernels::grouped_lora(at::randn({3, 3}), a, b, {1, 1}, 1.0), Error);  // counts sum
  EXPECT_THROW(kernels::grouped_lora(at::randn({2, 5}), a, b, {1, 1}, 1.0), Error);  // in features
  EXPECT_THROW(kernels::grouped_lora(at::randn({2, 3}), a, b, {2}, 1.0), Error);     // count list
}

}  // namespace
}  // namespace mole
