// MoE-LoRA sites against naive per-expert formulations (outputs and every gradient), layer-wise
// allocation, and every method attached to the tiny model end to end (forward, aux losses,
// backward).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include "checkpoint/model_loader.h"
#include "kernels/check.h"
#include "moe/adapter.h"
#include "moe/allocation.h"
#include "moe/moe_site.h"
#include "tests/test_util.h"

namespace mole {
namespace {

using moe::ExpertLora;

constexpr double kTol = 1e-5;  // issue: shared-base vs naive, float32

ExpertLora random_experts(int64_t E, int64_t r, int64_t in, int64_t out, double scale) {
  return ExpertLora::from(at::randn({E, r, in}) * 0.3, at::randn({E, out, r}) * 0.3, in, out, scale,
                          0.0, at::kCPU, "test");
}

moe::LoraLinear frozen_linear(int64_t out, int64_t in) {
  return moe::LoraLinear(at::randn({out, in}) / std::sqrt(static_cast<double>(in)), at::Tensor());
}

// MixLoRA as its authors compute it: each selected expert runs the whole FFN,
// y_e = W_d h_e + s B_d A_d h_e with h_e = silu(W_g x + s B_g A_g x) * (W_u x + s B_u A_u x),
// and the outputs are summed with the routing weights.
at::Tensor naive_ffn(const moe::FfnMoeSite& site, const moe::LoraLinear& gate,
                     const moe::LoraLinear& up, const moe::LoraLinear& down, const at::Tensor& x_TD,
                     const moe::Routing& routing) {
  auto lora = [](const ExpertLora& l, int64_t e, const at::Tensor& v) {
    return at::matmul(at::matmul(v, l.a_ErI[e].t()), l.b_EOr[e].t()) * l.scale;
  };
  at::Tensor y = at::zeros({x_TD.size(0), down.out_features()});
  for (int64_t i = 0; i < routing.token_N.size(0); ++i) {
    const int64_t t = routing.token_N[i].item<int64_t>(), e = routing.expert_N[i].item<int64_t>();
    at::Tensor x = x_TD.narrow(0, t, 1);
    at::Tensor g = gate.forward_base(x) + lora(site.gate(), e, x);
    at::Tensor u = up.forward_base(x) + lora(site.up(), e, x);
    at::Tensor h = at::silu(g) * u;
    at::Tensor out = down.forward_base(h) + lora(site.down(), e, h);
    y = y.index_add(0, routing.token_N.narrow(0, i, 1), out * routing.weight_N[i]);
  }
  return y;
}

std::vector<at::Tensor> grads_of(const at::Tensor& out, const at::Tensor& probe,
                                 const std::vector<at::Tensor>& leaves) {
  for (const at::Tensor& l : leaves) {
    if (l.grad().defined()) const_cast<at::Tensor&>(l).mutable_grad().zero_();
  }
  (out * probe).sum().backward();
  std::vector<at::Tensor> g;
  for (const at::Tensor& l : leaves) g.push_back(l.grad().clone());
  return g;
}

TEST(MoeSites, FfnSharedBaseMatchesNaivePerExpert) {
  at::manual_seed(11);
  const int64_t T = 24, D = 16, F = 40, E = 4, r = 4;
  for (auto strategy : {moe::RoutingStrategy::kTopK, moe::RoutingStrategy::kTopP,
                        moe::RoutingStrategy::kDynMole}) {
    moe::RouterOptions options;
    options.strategy = strategy;
    options.top_k = 2;
    moe::LoraLinear gate = frozen_linear(F, D), up = frozen_linear(F, D), down = frozen_linear(D, F);
    moe::FfnMoeSite site("layers.0.mlp", (at::randn({E, D}) * 0.5).requires_grad_(true),
                         random_experts(E, r, D, F, 2.0), random_experts(E, r, D, F, 2.0),
                         random_experts(E, r, F, D, 2.0), options);
    at::Tensor x = at::randn({T, D}).requires_grad_(true);
    moe::ForwardContext ctx;
    at::Tensor y = site.forward(x, gate, up, down, ctx);
    ASSERT_EQ(ctx.sites.size(), 1u);
    moe::RouterOutput routed = moe::route(moe::router_logits(x, site.router_weight(), 0.0, false, {}), options);
    at::Tensor ref = naive_ffn(site, gate, up, down, x, routed.routing);
    EXPECT_LT(test::rel_error(y, ref), kTol) << moe::routing_strategy_name(strategy);

    std::vector<at::Tensor> leaves = {x, site.router_weight(), site.gate().a_ErI, site.gate().b_EOr,
                                      site.up().a_ErI, site.up().b_EOr, site.down().a_ErI,
                                      site.down().b_EOr};
    at::Tensor probe = at::randn({T, D});
    std::vector<at::Tensor> got = grads_of(y, probe, leaves);
    std::vector<at::Tensor> want = grads_of(ref, probe, leaves);
    for (size_t i = 0; i < leaves.size(); ++i) {
      EXPECT_LT(test::rel_error(got[i], want[i]), kTol)
          << "leaf " << i << " with " << moe::routing_strategy_name(strategy);
    }
  }
}

TEST(MoeSites, LinearSiteMatchesNaiveAndRoutesOnlyDeltas) {
  at::manual_seed(12);
  const int64_t T = 20, I = 12, O = 10, E = 3, r = 2;
  moe::RouterOptions options;
  options.top_k = 2;
  moe::LinearMoeSite site("layers.0.self_attn.q_proj", (at::randn({E, I})).requires_grad_(true),
                          random_experts(E, r, I, O, 1.5), options);
  at::Tensor x = at::randn({T, I}).requires_grad_(true);
  moe::ForwardContext ctx;
  at::Tensor delta = site.delta(x, ctx);
  moe::RouterOutput routed = moe::route(moe::router_logits(x, site.router_weight(), 0.0, false, {}), options);
  at::Tensor ref = at::zeros({T, O});
  const moe::Routing& rt = routed.routing;
  for (int64_t i = 0; i < rt.token_N.size(0); ++i) {
    const int64_t t = rt.token_N[i].item<int64_t>(), e = rt.expert_N[i].item<int64_t>();
    at::Tensor d = at::matmul(site.experts().b_EOr[e], at::matmul(site.experts().a_ErI[e], x[t])) * 1.5;
    ref = ref.index_add(0, rt.token_N.narrow(0, i, 1), (d * rt.weight_N[i]).unsqueeze(0));
  }
  EXPECT_LT(test::rel_error(delta, ref), kTol);
  std::vector<at::Tensor> leaves = {x, site.router_weight(), site.experts().a_ErI, site.experts().b_EOr};
  at::Tensor probe = at::randn({T, O});
  std::vector<at::Tensor> got = grads_of(delta, probe, leaves), want = grads_of(ref, probe, leaves);
  for (size_t i = 0; i < leaves.size(); ++i) EXPECT_LT(test::rel_error(got[i], want[i]), kTol) << i;
}

TEST(MoeSites, SwitchOverflowTokensPassThrough) {
  at::manual_seed(13);
  const int64_t T = 8, I = 6, O = 5, E = 2;
  moe::RouterOptions options;
  options.strategy = moe::RoutingStrategy::kSwitch;
  options.capacity_factor = 0.5;  // C = ceil(8/2 * 0.5) = 2 tokens per expert: 4 of 8 dropped
  // A router that prefers expert 0 for every token (x > 0 and positive weights on row 0).
  at::Tensor router = at::stack({at::ones({I}), -at::ones({I})}).requires_grad_(true);
  moe::LinearMoeSite site("s", router, random_experts(E, 2, I, O, 1.0), options);
  moe::ForwardContext ctx;
  at::Tensor delta = site.delta(at::rand({T, I}) + 0.1, ctx);
  at::Tensor touched = delta.abs().sum(1) > 0;
  EXPECT_EQ(touched.sum().item<int64_t>(), 2);  // expert 0 took the first two tokens
  EXPECT_TRUE(touched[0].item<bool>() && touched[1].item<bool>());
  EXPECT_EQ(ctx.sites[0].stats.num_pairs, 2);
}

TEST(Allocation, PatternsListsAndErrors) {
  EXPECT_EQ(moe::pattern_allocation("2,4,6,8", 8), (std::vector<int64_t>{2, 2, 4, 4, 6, 6, 8, 8}));
  EXPECT_EQ(moe::pattern_allocation("8, 6,4,2", 4), (std::vector<int64_t>{8, 6, 4, 2}));
  EXPECT_EQ(moe::pattern_allocation("5", 3), (std::vector<int64_t>{5, 5, 5}));
  EXPECT_EQ(moe::uniform_allocation(4, 2), (std::vector<int64_t>{4, 4}));
  EXPECT_EQ(moe::list_allocation({1, 3, 2}, 3), (std::vector<int64_t>{1, 3, 2}));
  auto error = [](auto fn) {
    try {
      fn();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("<no error>");
  };
  EXPECT_NE(error([] { moe::pattern_allocation("2,4,6", 8); }).find("3 groups, which do not divide the model's 8 layers"),
            std::string::npos);
  EXPECT_NE(error([] { moe::pattern_allocation("2,x", 2); }).find("'x' is not an integer"), std::string::npos);
  EXPECT_NE(error([] { moe::pattern_allocation("2,0", 2); }).find("expert count 0"), std::string::npos);
  EXPECT_NE(error([] { moe::list_allocation({1, 2}, 3); }).find("2 entries but the model has 3 layers"),
            std::string::npos);
}

// Every method on the tiny fixture model: fresh adapter with non-zero B, forward in training
// mode, the aux losses it should report, and gradients reaching every trainable tensor.
TEST(MoeSites, EveryMethodTrainsEndToEnd) {
  struct Case {
    moe::Method method;
    moe::RoutingStrategy strategy;
    std::vector<int64_t> experts;
  };
  const std::vector<Case> cases = {
      {moe::Method::kLora, moe::RoutingStrategy::kTopK, {}},
      {moe::Method::kMixLora, moe::RoutingStrategy::kTopK, {4, 4}},
      {moe::Method::kMixLora, moe::RoutingStrategy::kSwitch, {4, 4}},
      {moe::Method::kMola, moe::RoutingStrategy::kTopK, moe::pattern_allocation("2,4", 2)},
      {moe::Method::kDynMole, moe::RoutingStrategy::kDynMole, {4, 4}},
      {moe::Method::kMoeLora, moe::RoutingStrategy::kTopK, {4, 4}},
  };
  for (const Case& c : cases) {
    auto model = ckpt::load_model(test::tiny_llama_dir() + "/base", at::TensorOptions(at::kFloat));
    moe::AdapterSpec spec;
    spec.method = c.method;
    spec.lora = spec.expert_lora = {4, 8.0, false, 0.1};
    spec.experts_per_layer = c.experts;
    spec.router.strategy = c.strategy;
    spec.aux.z_loss_coef = c.strategy == moe::RoutingStrategy::kSwitch ? 0.001 : 0.0;
    spec.aux.entropy_coef = c.method == moe::Method::kDynMole ? 0.01 : 0.0;
    spec.aux.contrastive.coef = c.method == moe::Method::kMoeLora ? 0.1 : 0.0;
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(5);
    moe::attach_adapter(*model, spec, gen);
    {
      at::NoGradGuard no_grad;  // non-zero B so that every path carries gradient
      for (auto& [name, t] : model->trainable_parameters()) {
        if (name.find("lora_B") != std::string::npos) t.normal_(0.0, 0.05, gen);
      }
    }
    moe::ForwardContext ctx;
    ctx.training = true;
    ctx.generator = gen;
    at::Tensor ids = at::randint(0, 256, {2, 12}, gen, at::kLong);
    at::Tensor logits = model->forward(ids, ctx);
    at::Tensor loss = moe::causal_lm_loss(logits, ids);
    moe::AuxLosses aux = moe::aux_losses(ctx, spec.aux);
    const std::string label = moe::method_name(c.method);
    EXPECT_EQ(aux.load_balance.defined(), spec.is_moe()) << label;
    EXPECT_EQ(aux.z_loss.defined(), spec.aux.z_loss_coef > 0) << label;
    EXPECT_EQ(aux.entropy.defined(), spec.aux.entropy_coef > 0) << label;
    EXPECT_EQ(aux.contrastive.defined(), spec.aux.contrastive.coef > 0) << label;
    EXPECT_TRUE(std::isfinite(aux.total.item<double>())) << label;
    (loss + aux.total).backward();
    const size_t sites = c.method == moe::Method::kLora ? 0 : (c.method == moe::Method::kMixLora ? 2 : 14);
    EXPECT_EQ(ctx.sites.size(), sites) << label;
    for (const auto& [name, t] : model->trainable_parameters()) {
      ASSERT_TRUE(t.grad().defined()) << label << " " << name;
      EXPECT_GT(t.grad().abs().sum().item<double>(), 0.0) << label << " " << name;
    }
    if (c.method == moe::Method::kMola) {
      EXPECT_EQ(model->layer(0).linear_sites.at("self_attn.q_proj")->num_experts(), 2);
      EXPECT_EQ(model->layer(1).linear_sites.at("mlp.down_proj")->num_experts(), 4);
    }
  }
}

TEST(MoeSites, RouterRunsInFloat32UnderBf16) {
  auto model = ckpt::load_model(test::tiny_llama_dir() + "/base", at::TensorOptions(at::kBFloat16));
  moe::AdapterSpec spec;
  spec.method = moe::Method::kMixLora;
  spec.experts_per_layer = {4, 4};
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);
  moe::attach_adapter(*model, spec, gen);
  moe::ForwardContext ctx;
  at::Tensor logits = model->forward(at::randint(0, 256, {1, 8}, gen, at::kLong), ctx);
  EXPECT_EQ(logits.scalar_type(), at::kBFloat16);
  EXPECT_EQ(ctx.sites[0].stats.prob_sum_E.scalar_type(), at::kFloat);
  EXPECT_EQ(model->layer(0).ffn_site->router_weight().scalar_type(), at::kFloat);
}

TEST(MoeSites, AdapterSpecErrorsNameTheKey) {
  moe::AdapterSpec spec;
  spec.method = moe::Method::kMixLora;
  spec.experts_per_layer = {4};
  EXPECT_THROW(spec.validate(2), Error);
  spec.experts_per_layer = {4, 4};
  spec.target_modules = {"q_proj", "gate_proj", "up_proj"};
  try {
    spec.validate(2);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("adapter.target_modules lacks 'down_proj'"), std::string::npos);
  }
  spec.target_modules = {"qproj"};
  EXPECT_THROW(spec.validate(2), Error);
  EXPECT_THROW(moe::parse_method("moe"), Error);
}

}  // namespace
}  // namespace mole
