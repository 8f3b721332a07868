// MoE sites under expert parallelism (EP = the test communicator's size) against the same site
// with every expert local on each rank: MixLoRA's FFN block and a per-linear site, in token and
// weight mode; outputs, input and router gradients match per rank, and each expert shard's
// gradient matches the sum over ranks of the local gradients. Then a router that sends every token
// to one expert (the worst imbalance) trains for a few steps in both modes, still matching.
// float32, relative tolerance 1e-5 of the largest element.
#include <ATen/ATen.h>

#include <cstdio>
#include <functional>

#include "moe/moe_site.h"
#include "parallel/expert_dispatcher.h"
#include "tests/dist/dist_test_util.h"

namespace mole::dist::test {
namespace {

constexpr double kTol = 1e-5;
constexpr int64_t kD = 12, kF = 20, kR = 4;

double rel_error(const at::Tensor& got, const at::Tensor& want) {
  const double scale = std::max(1e-12, want.abs().max().item<double>());
  return (got - want).abs().max().item<double>() / scale;
}

moe::ExpertLora experts(int64_t E, int64_t in, int64_t out) {
  return moe::ExpertLora::from(at::randn({E, kR, in}) * 0.3, at::randn({E, out, kR}) * 0.3, in, out,
                               2.0, 0.0, at::kCPU, "test");
}

moe::LoraLinear frozen(int64_t out, int64_t in) {
  return moe::LoraLinear(at::randn({out, in}) / std::sqrt(static_cast<double>(in)), at::Tensor());
}

// Everything one site needs, drawn identically on every rank from `seed`.
struct FfnSetup {
  moe::LoraLinear gate, up, down;
  std::unique_ptr<moe::FfnMoeSite> full, shard;
};

FfnSetup make_ffn(int64_t E, const moe::RouterOptions& router, const moe::ExpertShard& shard,
                  const at::Tensor& router_ED) {
  at::manual_seed(5);
  FfnSetup s{frozen(kF, kD), frozen(kF, kD), frozen(kD, kF), nullptr, nullptr};
  moe::ExpertLora g = experts(E, kD, kF), u = experts(E, kD, kF), d = experts(E, kF, kD);
  s.full = std::make_unique<moe::FfnMoeSite>("layers.0.mlp", router_ED.clone().requires_grad_(true), g, u, d, router);
  s.shard = std::make_unique<moe::FfnMoeSite>("layers.0.mlp", router_ED.clone().requires_grad_(true), g, u, d, router);
  s.shard->set_experts(g.slice(shard.first, shard.count), u.slice(shard.first, shard.count),
                       d.slice(shard.first, shard.count));
  return s;
}

std::vector<at::Tensor> expert_tensors(const moe::FfnMoeSite& site) {
  return {site.gate().a_ErI, site.gate().b_EOr, site.up().a_ErI,
          site.up().b_EOr,   site.down().a_ErI, site.down().b_EOr};
}

at::Tensor summed(Communicator& comm, const at::Tensor& t) {
  at::Tensor out = t.detach().clone().contiguous();
  comm.all_reduce(out, ReduceOp::kSum)->wait();
  return out;
}

// A site holding every expert and the same site holding this rank's shard: how to run each on
// this rank's tokens, and their trainable tensors (router first, then the expert stacks).
struct SitePair {
  std::function<at::Tensor(const at::Tensor&, moe::ForwardContext&)> full, mine;
  std::vector<at::Tensor> full_params, mine_params;
};

// One forward + backward of both sites on this rank's tokens; returns the worst relative error
// over the output, the input and router gradients, and the expert gradients (shard vs the sum
// over ranks of the full site's, sliced).
double compare_sites(Communicator& comm, const SitePair& s, const moe::Dispatcher& d,
                     const at::Tensor& x_TD, const moe::ExpertShard& shard) {
  at::Tensor x_ref = x_TD.clone().requires_grad_(true), x_ep = x_TD.clone().requires_grad_(true);
  moe::ForwardContext ref_ctx, ep_ctx;
  ep_ctx.dispatcher = &d;
  at::Tensor y_ref = s.full(x_ref, ref_ctx), y_ep = s.mine(x_ep, ep_ctx);
  at::Tensor probe = at::linspace(-1.0, 1.0, y_ref.numel()).view(y_ref.sizes());
  (y_ref * probe).sum().backward();
  (y_ep * probe).sum().backward();
  double worst = std::max(rel_error(y_ep, y_ref), rel_error(x_ep.grad(), x_ref.grad()));
  worst = std::max(worst, rel_error(s.mine_params[0].grad(), s.full_params[0].grad()));
  for (size_t i = 1; i < s.full_params.size(); ++i) {
    at::Tensor want = summed(comm, s.full_params[i].grad()).narrow(0, shard.first, shard.count);
    worst = std::max(worst, rel_error(s.mine_params[i].grad(), want));
  }
  return worst;
}

SitePair pair_of(const FfnSetup& s) {
  auto params = [](const moe::FfnMoeSite& site) {
    std::vector<at::Tensor> p = expert_tensors(site);
    p.insert(p.begin(), site.router_weight());
    return p;
  };
  return {[&s](const at::Tensor& x, moe::ForwardContext& ctx) { return s.full->forward(x, s.gate, s.up, s.down, ctx); },
          [&s](const at::Tensor& x, moe::ForwardContext& ctx) { return s.shard->forward(x, s.gate, s.up, s.down, ctx); },
          params(*s.full), params(*s.shard)};
}

class EpSites : public BackendTest {};

TEST_P(EpSites, FfnBlockMatchesLocalExpertsInBothModes) {
  const int P = comm().size(), r = comm().rank();
  const int64_t E = 2 * P;
  for (moe::DispatchMode mode : {moe::DispatchMode::kTokens, moe::DispatchMode::kWeights}) {
    SCOPED_TRACE(moe::dispatch_mode_name(mode));
    parallel::ExpertParallelDispatcher d(comm(), {{"layers.0.mlp", mode}});
    const moe::ExpertShard shard = d.shard(E);
    at::manual_seed(3);
    FfnSetup s = make_ffn(E, moe::RouterOptions{}, shard, at::randn({E, kD}) * 0.5);
    at::manual_seed(100 + r);
    const double worst = compare_sites(comm(), pair_of(s), d, at::randn({5 + 3 * r, kD}), shard);
    char text[32];
    std::snprintf(text, sizeof text, "%.3e", worst);
    RecordProperty(std::string("worst_rel_error_") + moe::dispatch_mode_name(mode), text);
    EXPECT_LT(worst, kTol);
  }
}

TEST_P(EpSites, LinearSiteMatchesLocalExpertsInBothModes) {
  const int P = comm().size(), r = comm().rank();
  const int64_t E = 2 * P;
  for (moe::DispatchMode mode : {moe::DispatchMode::kTokens, moe::DispatchMode::kWeights}) {
    SCOPED_TRACE(moe::dispatch_mode_name(mode));
    parallel::ExpertParallelDispatcher d(comm(), {{"layers.0.self_attn.q_proj", mode}});
    const moe::ExpertShard shard = d.shard(E);
    at::manual_seed(4);
    at::Tensor router = at::randn({E, kD}) * 0.5;
    moe::ExpertLora lora = experts(E, kD, kF);
    moe::RouterOptions options;
    options.strategy = moe::RoutingStrategy::kTopP;  // a variable number of experts per token
    moe::LinearMoeSite full("layers.0.self_attn.q_proj", router.clone().requires_grad_(true), lora, options);
    moe::LinearMoeSite mine("layers.0.self_attn.q_proj", router.clone().requires_grad_(true), lora, options);
    mine.set_experts(lora.slice(shard.first, shard.count));
    at::manual_seed(200 + r);
    at::Tensor x = at::randn({4 + 5 * r, kD});
    const SitePair pair{
        [&full](const at::Tensor& x_TD, moe::ForwardContext& ctx) { return full.delta(x_TD, ctx); },
        [&mine](const at::Tensor& x_TD, moe::ForwardContext& ctx) { return mine.delta(x_TD, ctx); },
        {full.router_weight(), full.experts().a_ErI, full.experts().b_EOr},
        {mine.router_weight(), mine.experts().a_ErI, mine.experts().b_EOr}};
    const double worst = compare_sites(comm(), pair, d, x, shard);
    EXPECT_LT(worst, kTol);
  }
}

// Positive inputs and a router whose first row is +1 and the others -1: expert 0 (on rank 0)
// gets every token of every rank, the other ranks' experts none. Three SGD steps of router and
// experts (gradients summed over ranks as the trainer does) keep both sites equal.
TEST_P(EpSites, EveryTokenToOneExpertStillTrains) {
  const int P = comm().size(), r = comm().rank();
  const int64_t E = 2 * P;
  moe::RouterOptions top1;
  top1.top_k = 1;
  at::Tensor router = -at::ones({E, kD});
  router[0].fill_(1.0);
  for (moe::DispatchMode mode : {moe::DispatchMode::kTokens, moe::DispatchMode::kWeights}) {
    SCOPED_TRACE(moe::dispatch_mode_name(mode));
    parallel::ExpertParallelDispatcher d(comm(), {{"layers.0.mlp", mode}});
    const moe::ExpertShard shard = d.shard(E);
    FfnSetup s = make_ffn(E, top1, shard, router);
    at::manual_seed(300 + r);
    at::Tensor x = at::rand({6, kD}) + 0.1;
    SitePair pair = pair_of(s);
    for (int step = 0; step < 3; ++step) {
      const double worst = compare_sites(comm(), pair, d, x, shard);
      EXPECT_LT(worst, kTol) << "step " << step;
      // The routing stayed maximally imbalanced.
      moe::ForwardContext probe_ctx;
      s.full->forward(x, s.gate, s.up, s.down, probe_ctx);
      EXPECT_EQ(probe_ctx.sites.at(0).stats.pairs_E[0].item<double>(), 6.0) << "step " << step;
      at::NoGradGuard no_grad;
      for (size_t i = 0; i < pair.full_params.size(); ++i) {
        at::Tensor &full = pair.full_params[i], &mine = pair.mine_params[i];
        full.sub_(0.05 * summed(comm(), full.grad()));
        // The router is replicated (summed over ranks); an expert shard's owner already holds
        // every rank's contribution.
        mine.sub_(0.05 * (i == 0 ? summed(comm(), mine.grad()) : mine.grad()));
        full.mutable_grad().zero_();
        mine.mutable_grad().zero_();
      }
    }
  }
}

MOLE_FOR_EACH_BACKEND(EpSites);

}  // namespace
}  // namespace mole::dist::test
