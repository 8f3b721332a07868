// What the router scores with: router_logits (float32 math, seeded and bounded jitter only in
// training, shape errors) and the normalised Tsallis entropy behind DynMoLE's switch (bounds, hand
// values, the Shannon limit, finite gradients).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "moe/router.h"
#include "tests/test_util.h"

namespace mole {
namespace {

using moe::RouterOptions;
using test::error_of;

// ---------------------------------------------------------------------------------------------
// Logits and jitter

TEST(RouterLogits, LinearInFloatAndJitterOnlyInTraining) {
  at::manual_seed(5);
  at::Tensor x = at::randn({6, 4});
  at::Tensor w = at::randn({3, 4});
  at::Tensor ref = at::matmul(x.to(at::kDouble), w.to(at::kDouble).t());
  // bf16 and float32 inputs: float32 router math.
  at::Tensor z = moe::router_logits(x, w, 0.3, /*training=*/false, std::nullopt);
  EXPECT_EQ(z.scalar_type(), at::kFloat);
  EXPECT_EQ(moe::router_logits(x.to(at::kBFloat16), w, 0.0, false, std::nullopt).scalar_type(),
            at::kFloat);
  EXPECT_LT(test::rel_error(z, ref), 1e-6);
  EXPECT_TRUE(at::equal(z, moe::router_logits(x, w, 0.0, /*training=*/true, std::nullopt)));
  EXPECT_TRUE(at::equal(z, at::linear(x, w)));
  // A float64 model keeps float64 (exactness checks).
  at::Tensor z64 = moe::router_logits(x.to(at::kDouble), w, 0.0, false, std::nullopt);
  EXPECT_EQ(z64.scalar_type(), at::kDouble);
  EXPECT_LT(test::rel_error(z64, ref), 1e-12);
}

TEST(RouterLogits, JitterIsSeededAndBounded) {
  // x = 1 and W = I: the logits are the noise factors themselves.
  const int64_t num_tokens = 200, dim = 4;
  at::Tensor x = at::ones({num_tokens, dim});
  at::Tensor w = at::eye(dim);
  auto noise = [&](std::optional<at::Generator> gen) {
    return moe::router_logits(x, w, 0.25, /*training=*/true, gen);
  };
  at::Tensor a = noise(at::make_generator<at::CPUGeneratorImpl>(1234));
  at::Tensor b = noise(at::make_generator<at::CPUGeneratorImpl>(1234));
  at::Tensor c = noise(at::make_generator<at::CPUGeneratorImpl>(1235));
  // Jitter never draws from ATen's global default generator: without one it is an error.
  EXPECT_NE(error_of([&] { noise(std::nullopt); }).find("router jitter draws random numbers in training but no generator"),
            std::string::npos);
  EXPECT_TRUE(at::equal(a, b));
  EXPECT_FALSE(at::equal(a, c));
  for (const at::Tensor& n : {a, c}) {
    EXPECT_GE(n.min().item<double>(), 0.75);
    EXPECT_LE(n.max().item<double>(), 1.25);
    // 800 draws: P(none below 0.8 or none above 1.2) is about 2 * 0.9^800.
    EXPECT_LT(n.min().item<double>(), 0.8);
    EXPECT_GT(n.max().item<double>(), 1.2);
  }
  // A generator is advanced by use: a second draw from the same one differs.
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1234);
  at::Tensor first = noise(gen);
  EXPECT_TRUE(at::equal(first, a));
  EXPECT_FALSE(at::equal(noise(gen), a));
}

TEST(RouterLogits, ShapeAndJitterErrors) {
  at::Tensor x = at::ones({2, 4});
  EXPECT_NE(error_of([&] { moe::router_logits(x, at::ones({3, 5}), 0.0, false, std::nullopt); })
                .find("router weight must be [E, 4], got [3, 5]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { moe::router_logits(x, at::ones({3, 4}), 1.0, true, std::nullopt); })
                .find("jitter_noise must be in [0, 1), got 1"),
            std::string::npos);
  EXPECT_NE(error_of([&] { moe::route(at::ones({2, 3, 4}), RouterOptions{}); })
                .find("router logits must be [T, E]"),
            std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Normalised Tsallis entropy

TEST(TsallisEntropy, UniformIsOneAndOneHotIsZero) {
  for (double q : {0.5, 1.0, 1.1, 2.0, 3.0}) {
    for (int64_t e : {2, 4, 7}) {
      at::Tensor uniform = at::full({3, e}, 1.0 / static_cast<double>(e), at::kDouble);
      at::Tensor one_hot = at::zeros({3, e}, at::kDouble);
      one_hot.select(1, e - 1).fill_(1.0);
      at::Tensor s_uniform = moe::normalized_tsallis_entropy(uniform, q);
      at::Tensor s_one_hot = moe::normalized_tsallis_entropy(one_hot, q);
      EXPECT_EQ(s_uniform.sizes(), (std::vector<int64_t>{3}));
      EXPECT_LT((s_uniform - 1.0).abs().max().item<double>(), 1e-12) << "q " << q << " E " << e;
      EXPECT_LT(s_one_hot.abs().max().item<double>(), 1e-12) << "q " << q << " E " << e;
    }
  }
  // One expert: zero.
  EXPECT_EQ(moe::normalized_tsallis_entropy(at::ones({2, 1}), 1.1).sum().item<double>(), 0.0);
}

TEST(TsallisEntropy, StaysInTheUnitIntervalDespiteRounding) {
  // Uniform and one-hot float32 rows sit on the bounds, where rounding could step outside.
  for (double q : {0.3, 0.5, 1.0, 1.1, 1.5, 2.0, 3.0}) {
    for (int64_t e = 2; e <= 40; ++e) {
      at::Tensor uniform = at::softmax(at::zeros({1, e}), 1);
      at::Tensor one_hot = at::softmax(at::eye(e) * 200.0, 1);
      for (const at::Tensor& p : {uniform, one_hot}) {
        at::Tensor s = moe::normalized_tsallis_entropy(p, q);
        EXPECT_GE(s.min().item<float>(), 0.0f) << "q " << q << " E " << e;
        EXPECT_LE(s.max().item<float>(), 1.0f) << "q " << q << " E " << e;
      }
    }
  }
}

TEST(TsallisEntropy, HandValues) {
  at::Tensor p = at::tensor({0.75, 0.25}, at::kDouble).view({1, 2});
  // q = 2: (1 - 0.5625 - 0.0625) / (1 - 2^-1) = 0.375 / 0.5.
  EXPECT_NEAR(moe::normalized_tsallis_entropy(p, 2.0).item<double>(), 0.75, 1e-12);
  // q = 1: -(0.75 ln 0.75 + 0.25 ln 0.25) / ln 2.
  const double shannon = -(0.75 * std::log(0.75) + 0.25 * std::log(0.25)) / std::log(2.0);
  EXPECT_NEAR(moe::normalized_tsallis_entropy(p, 1.0).item<double>(), shannon, 1e-12);
  // |q - 1| < 1e-6 takes the Shannon branch; q = 1.001 is close to it.
  EXPECT_NEAR(moe::normalized_tsallis_entropy(p, 1.0 + 1e-7).item<double>(), shannon, 1e-12);
  EXPECT_NEAR(moe::normalized_tsallis_entropy(p, 1.001).item<double>(), shannon, 1e-3);
  // float32 in, float32 out.
  EXPECT_EQ(moe::normalized_tsallis_entropy(p.to(at::kFloat), 2.0).scalar_type(), at::kFloat);
}

TEST(TsallisEntropy, PeakedHandValue) {
  // q = 1.1, p = (0.7, 0.2, 0.05, 0.05): sum p^q computed term by term.
  const double q = 1.1;
  const double sum_pq = std::pow(0.7, q) + std::pow(0.2, q) + 2.0 * std::pow(0.05, q);
  const double expected = (1.0 - sum_pq) / (1.0 - std::pow(4.0, 1.0 - q));
  EXPECT_NEAR(expected, 0.619, 1e-3);
  at::Tensor p = at::tensor({0.7, 0.2, 0.05, 0.05}, at::kDouble).view({1, 4});
  EXPECT_NEAR(moe::normalized_tsallis_entropy(p, q).item<double>(), expected, 1e-12);
}

TEST(TsallisEntropy, FiniteGradientAtZeroProbabilities) {
  for (double q : {0.5, 1.0, 1.1, 2.0}) {
    at::Tensor z = at::tensor({0.0, -200.0, 1.0}, at::kFloat).view({1, 3}).requires_grad_(true);
    at::Tensor p = at::softmax(z, 1);
    ASSERT_EQ(p[0][1].item<float>(), 0.0f);  // underflows to an exact zero
    moe::normalized_tsallis_entropy(p, q).sum().backward();
    EXPECT_TRUE(at::isfinite(z.grad()).all().item<bool>()) << "q " << q << ": " << z.grad();
  }
  EXPECT_NE(error_of([] { moe::normalized_tsallis_entropy(at::ones({1, 2}), 0.0); })
                .find("q must be > 0, got 0"),
            std::string::npos);
}

}  // namespace
}  // namespace mole
