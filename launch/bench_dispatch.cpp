// `mole bench dispatch` (see bench_command.h): one MoE site's forward + backward under expert
// parallelism, run under mpirun with world = EP, in token mode, in weight mode, and with every
// expert local (the EP = 1 reference, no communication). Reports the slowest rank's time per step
// (median over iterations), the bytes each rank sent to its peers per step (measured) beside the
// planner's estimate, and which mode `parallel.dispatch: auto` picks.
//
// Legend: T tokens per rank, D hidden, F intermediate, E experts, K top-k, r LoRA rank.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "dist/backend.h"
#include "dist/communicator.h"
#include "dist/runtime.h"
#include "kernels/check.h"
#include "launch/bench_command.h"
#include "moe/expert_shard.h"
#include "moe/moe_site.h"
#include "parallel/dispatch_plan.h"
#include "parallel/expert_dispatcher.h"

namespace mole::launch {
namespace {

constexpr const char* kSite = "layers.0.mlp";

struct DispatchTiming {
  std::string mode;
  double median_ms = 0.0;
  double min_ms = 0.0;
  double mib_per_step = 0.0;  // sent to peers, mean over ranks
};

// The site under test, drawn identically on every rank; `dispatcher` null: every expert local.
struct BenchSite {
  moe::LoraLinear gate, up, down;  // frozen base (FFN block only)
  std::unique_ptr<moe::FfnMoeSite> ffn;
  std::unique_ptr<moe::LinearMoeSite> linear;

  at::Tensor forward(const at::Tensor& x_TD, moe::ForwardContext& ctx) const {
    return ffn ? ffn->forward(x_TD, gate, up, down, ctx) : linear->delta(x_TD, ctx);
  }
  std::vector<at::Tensor> params() const {
    if (ffn) {
      return {ffn->router_weight(), ffn->gate().a_ErI, ffn->gate().b_EOr, ffn->up().a_ErI,
              ffn->up().b_EOr,      ffn->down().a_ErI, ffn->down().b_EOr};
    }
    return {linear->router_weight(), linear->experts().a_ErI, linear->experts().b_EOr};
  }
};

at::TensorOptions model_options(const BenchOptions& o) {
  return at::TensorOptions(o.dtype == "bf16" ? at::kBFloat16 : at::kFloat)
      .device(o.device == "cuda" ? at::Device(at::kCUDA) : at::Device(at::kCPU));
}

BenchSite make_site(const BenchOptions& o, const at::TensorOptions& model, const moe::ExpertShard& shard) {
  at::manual_seed(1234);
  const at::TensorOptions lora = model.dtype(at::kFloat);
  const int64_t D = o.hidden, F = o.intermediate, E = o.experts;
  moe::LoraOptions lo{o.rank, 2.0 * o.rank, false, 0.0};
  auto experts = [&](int64_t in, int64_t out) {
    moe::ExpertLora full = moe::ExpertLora::from(at::randn({E, o.rank, in}) / std::sqrt(double(in)),
                                                 at::randn({E, out, o.rank}) * 0.01, in, out,
                                                 lo.scale(), 0.0, lora, "bench");
    return full;
  };
  auto mine = [&](const moe::ExpertLora& full) { return full.slice(shard.first, shard.count); };
  auto frozen = [&](int64_t out, int64_t in) {
    return moe::LoraLinear((at::randn({out, in}) / std::sqrt(double(in))).to(model), at::Tensor());
  };
  moe::RouterOptions router;
  router.top_k = o.top_k;
  at::Tensor router_ED = (at::randn({E, D}) * 0.02).to(lora).requires_grad_(true);
  BenchSite s;
  if (o.site == "ffn") {
    s.gate = frozen(F, D);
    s.up = frozen(F, D);
    s.down = frozen(D, F);
    moe::ExpertLora g = experts(D, F), u = experts(D, F), d = experts(F, D);
    s.ffn = std::make_unique<moe::FfnMoeSite>(kSite, router_ED, g, u, d, router);
    s.ffn->set_experts(mine(g), mine(u), mine(d));
  } else {
    moe::ExpertLora e = experts(D, D);
    s.linear = std::make_unique<moe::LinearMoeSite>(kSite, router_ED, e, router);
    s.linear->set_experts(mine(e));
  }
  return s;
}

double max_over_ranks(dist::Communicator& world, double value) {
  at::Tensor t = at::tensor({value}, at::kDouble);
  world.all_reduce(t, dist::ReduceOp::kMax)->wait();
  return t.item<double>();
}

DispatchTiming time_mode(const BenchOptions& o, dist::Communicator& world, const std::string& mode) {
  const at::TensorOptions model = model_options(o);
  std::map<std::string, moe::DispatchMode> modes = {
      {kSite, mode == "tokens" ? moe::DispatchMode::kTokens : moe::DispatchMode::kWeights}};
  parallel::ExpertParallelDispatcher dispatcher(world, modes);
  const bool local = mode == "local";
  const BenchSite site = make_site(o, model, local ? moe::ExpertShard{0, o.experts, o.experts}
                                                   : dispatcher.shard(o.experts));
  at::manual_seed(99 + world.rank());
  at::Tensor x = at::randn({o.tokens, o.hidden}).to(model).requires_grad_(true);
  std::vector<double> ms;
  for (int64_t i = 0; i < o.warmup + o.iters; ++i) {
    if (i == o.warmup) dispatcher.traffic().reset();
    world.barrier();
    const auto start = std::chrono::steady_clock::now();
    moe::ForwardContext ctx;
    ctx.training = true;
    ctx.dispatcher = local ? nullptr : &dispatcher;
    at::Tensor y = site.forward(x, ctx);
    y.to(at::kFloat).square().mean().backward();
    if (model.device().is_cuda()) y.sum().cpu();  // host waits for the device
    const double elapsed =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (i >= o.warmup) ms.push_back(max_over_ranks(world, elapsed));
    x.mutable_grad() = at::Tensor();
    for (at::Tensor p : site.params()) p.mutable_grad() = at::Tensor();
  }
  std::sort(ms.begin(), ms.end());
  at::Tensor bytes = at::tensor({static_cast<double>(dispatcher.traffic().bytes_sent.load())}, at::kDouble);
  world.all_reduce(bytes, dist::ReduceOp::kSum)->wait();
  DispatchTiming t;
  t.mode = mode;
  t.median_ms = ms[ms.size() / 2];
  t.min_ms = ms.front();
  t.mib_per_step = bytes.item<double>() / world.size() / static_cast<double>(o.iters) / (1024.0 * 1024.0);
  return t;
}

}  // namespace

namespace {

void run_dispatch_bench(const BenchOptions& o, const dist::MpiRuntime& runtime) {
  const int ep = runtime.rank_info().world;
  MOLE_CHECK(ep >= 2, "bench dispatch measures expert parallelism: run it under mpirun with -np "
                      "EP >= 2 (e.g. mpirun -np 2 mole bench dispatch)");
  // The placement rule decides; the bench needs every rank to hold experts (a split site).
  bool splits = o.experts >= ep;
  try {
    parallel::place_experts(o.experts, ep, 0);
  } catch (const Error&) {
    splits = false;
  }
  MOLE_CHECK(splits, "bench dispatch: --experts ", o.experts, " must be a multiple of the ", ep,
             " ranks");
  MOLE_CHECK(o.site == "ffn" || o.site == "linear", "bench dispatch: --site must be ffn or linear");
  dist::WorldCommunicator world = dist::make_world_communicator(
      o.backend, runtime, o.device == "cuda", runtime.rank_info().local_rank, 600.0);
  const bool lead = world.comm->rank() == 0;

  // The planner's estimate for the very site that is timed (every expert held, as before sharding).
  const moe::MoeSiteInfo info = [&] {
    const BenchSite full = make_site(o, model_options(o), {0, o.experts, o.experts});
    return full.ffn ? moe::site_info(*full.ffn) : moe::site_info(*full.linear);
  }();
  parallel::DispatchPlanOptions plan_options;
  plan_options.ep = ep;
  plan_options.tokens = o.tokens;
  plan_options.row_bytes = o.dtype == "bf16" ? 2 : 4;
  const parallel::SiteDispatch plan = parallel::plan_dispatch({info}, plan_options).front();

  std::vector<DispatchTiming> timings;
  for (const char* mode : {"local", "tokens", "weights"}) timings.push_back(time_mode(o, *world.comm, mode));
  if (!lead) return;
  std::printf("mole bench dispatch: %s site, forward + backward, T=%lld per rank, D=%lld%s, E=%lld, K=%lld, r=%lld, EP=%d, %s %s, %s backend, %d threads per rank\n",
              o.site.c_str(), (long long)o.tokens, (long long)o.hidden,
              info.ffn_block ? (" F=" + std::to_string(o.intermediate)).c_str() : "",
              (long long)o.experts, (long long)o.top_k, (long long)o.rank, ep, o.device.c_str(),
              o.dtype.c_str(), world.comm->backend(), at::get_num_threads());
  std::printf("%-8s %12s %12s %16s %16s\n", "mode", "median ms", "min ms", "MiB sent/step", "estimate MiB");
  nlohmann::json json = {{"bench", "dispatch"}, {"site", o.site}, {"tokens_per_rank", o.tokens},
                         {"hidden", o.hidden}, {"experts", o.experts}, {"top_k", o.top_k},
                         {"rank", o.rank}, {"ep", ep}, {"dtype", o.dtype}, {"device", o.device},
                         {"backend", world.comm->backend()}};
  if (info.ffn_block) json["intermediate"] = o.intermediate;
  for (const DispatchTiming& t : timings) {
    const double estimate = t.mode == "tokens"    ? plan.token_bytes / (1024.0 * 1024.0)
                            : t.mode == "weights" ? plan.weight_bytes / (1024.0 * 1024.0)
                                                  : 0.0;
    std::printf("%-8s %12.2f %12.2f %16.2f %16.2f\n", t.mode.c_str(), t.median_ms, t.min_ms,
                t.mib_per_step, estimate);
    json["results"].push_back({{"mode", t.mode}, {"median_ms", t.median_ms}, {"min_ms", t.min_ms},
                               {"mib_sent_per_step", t.mib_per_step}, {"estimate_mib", estimate}});
  }
  std::printf("auto picks: %s (estimated %.3g ms by tokens vs %.3g ms by weights per step)\n",
              moe::dispatch_mode_name(plan.mode), 1e3 * plan.token_s, 1e3 * plan.weight_s);
  json["auto"] = moe::dispatch_mode_name(plan.mode);
  std::printf("%s\n", json.dump().c_str());
}

}  // namespace

void run_under_mpi(const std::function<void(const dist::MpiRuntime&)>& bench) {
  dist::MpiRuntime runtime;
  try {
    bench(runtime);
  } catch (const std::exception& e) {
    // Reported inside the runtime's scope: leaving it by an exception aborts every rank.
    spdlog::error("rank {}: {}", runtime.rank_info().rank, e.what());
    throw;
  }
}

void bench_dispatch(const BenchOptions& o) {
  run_under_mpi([&](const dist::MpiRuntime& runtime) { run_dispatch_bench(o, runtime); });
}

}  // namespace mole::launch
