// The training step (see train_step.h).
#include "launch/train_step.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "dist/communicator.h"
#include "kernels/check.h"
#include "launch/schedule.h"
#include "moe/layer_runner.h"
#include "parallel/expert_dispatcher.h"
#include "parallel/process_grid.h"

namespace mole::launch {
namespace {

// The router statistics of a micro-batch step summed over the ranks (global-batch load
// balancing); empty on one rank.
moe::SumOverRanks sum_over_ranks(const RunParts& run) {
  if (run.world() == 1) return {};
  dist::Communicator& world = run.grid->world();
  return [&world](const at::Tensor& t) {
    at::Tensor buffer = t.detach().to(world.tensor_device()).contiguous().clone();
    world.all_reduce(buffer, dist::ReduceOp::kSum)->wait();
    return buffer.to(t.device());
  };
}

void add_loads(std::vector<std::pair<std::string, std::vector<double>>>& total,
               const std::vector<std::pair<std::string, std::vector<double>>>& loads) {
  if (total.empty()) {
    total = loads;
    return;
  }
  for (size_t i = 0; i < loads.size(); ++i) {
    for (size_t e = 0; e < loads[i].second.size(); ++e) total[i].second[e] += loads[i].second[e];
  }
}

}  // namespace

StepResult accumulate_gradients(RunParts& run, const StepCounters& counters) {
  const Config& c = run.config;
  StepResult r;
  r.step = counters.step;
  r.lr = learning_rate(c.train.schedule, c.train.lr, counters.step, c.train.warmup, c.train.steps);
  StepBatch batch = run.loader->next();
  r.target_tokens = batch.global_target_tokens;
  MOLE_CHECK(batch.global_target_tokens > 0, "step ", counters.step,
             ": the global batch has no target tokens");
  const double accumulation = static_cast<double>(batch.micro_batches.size());
  const moe::SumOverRanks over_ranks = sum_over_ranks(run);
  // The values to log stay on the device until every micro-batch has run its backward, then come
  // to the host in one read (on a GPU the queue is not drained once per micro-batch).
  const char* const part_names[] = {"load_balance", "z_loss", "entropy_loss", "contrastive_loss"};
  std::vector<at::Tensor> values;  // per micro-batch: lm, aux total, then the defined parts
  std::vector<std::vector<const char*>> parts_of(batch.micro_batches.size());
  // Per micro-batch and site: its name, routed pairs and expert count (the pair counts per
  // expert are among `values`).
  std::vector<std::vector<std::tuple<std::string, int64_t, int64_t>>> loads_of(
      batch.micro_batches.size());
  for (size_t m = 0; m < batch.micro_batches.size(); ++m) {
    const MicroBatch& mb = batch.micro_batches[m];
    moe::ForwardContext ctx;
    ctx.training = true;
    ctx.generator = run.forward_gen;
    ctx.valid_T = mb.valid_BS.reshape({-1});  // on the host: the sites count it there
    ctx.dispatcher = run.moe_dispatcher();
    // Activation checkpointing, and the order of use that a sharded base prefetches by. The
    // runner lives until this micro-batch's backward is over.
    std::optional<moe::TrainingLayers> layers;
    if (c.train.activation_checkpointing || c.parallel.base_shard > 0) {
      layers.emplace(run.model->base_weights(), run.model->num_layers(), ctx, c.train.activation_checkpointing);
      ctx.layer_runner = &*layers;
    }
    at::Tensor logits = run.model->forward(mb.input_ids_BS, ctx);
    moe::LossSum ls = moe::causal_lm_loss_sum(logits, mb.labels_BS);
    // Normalised once by the step's global target-token count, so micro-batches simply add up.
    at::Tensor lm = ls.sum / static_cast<double>(batch.global_target_tokens);
    moe::AuxLosses aux = moe::aux_losses(ctx, run.spec.aux, over_ranks);
    (lm + aux.total / accumulation).backward();
    layers.reset();  // a sharded base lets go of what backward held
    run.optimizer->end_backward();  // ZeRO-2 reduces what backward has not yet
    // Every value as float64 on the loss's device (the aux total of an adapter without MoE sites
    // is a host zero).
    const auto keep = [&](const at::Tensor& t) {
      values.push_back(t.detach().to(lm.device(), at::kDouble).reshape({-1}));
    };
    keep(lm);
    keep(aux.total);
    const at::Tensor* parts[] = {&aux.load_balance, &aux.z_loss, &aux.entropy, &aux.contrastive};
    for (size_t k = 0; k < 4; ++k) {
      if (!parts[k]->defined()) continue;
      parts_of[m].push_back(part_names[k]);
      keep(*parts[k]);
    }
    for (const moe::SiteRecord& site : ctx.sites) {
      loads_of[m].emplace_back(site.site, site.stats.num_pairs, site.stats.pairs_E.size(0));
      keep(site.stats.pairs_E);
    }
    r.tokens += mb.valid_BS.sum().item<int64_t>();  // a host tensor
  }
  // One device -> host read for the whole step, in the order the values were made.
  const at::Tensor host = at::cat(at::TensorList(values)).to(at::kCPU).contiguous();
  const double* v = host.data_ptr<double>();
  for (size_t m = 0; m < batch.micro_batches.size(); ++m) {
    r.loss += *v++;
    r.aux_loss += *v++ / accumulation;
    for (const char* name : parts_of[m]) r.aux_parts[name] += *v++ / accumulation;
    std::vector<std::pair<std::string, std::vector<double>>> loads;
    for (const auto& [site, num_pairs, num_experts] : loads_of[m]) {
      // The fraction of the site's routed pairs each expert received.
      const double total = std::max<double>(1.0, static_cast<double>(num_pairs));
      std::vector<double> load(static_cast<size_t>(num_experts));
      for (double& l : load) l = *v++ / total;
      loads.emplace_back(site, std::move(load));
    }
    add_loads(r.expert_loads, loads);
  }
  for (auto& [site, loads] : r.expert_loads) {
    for (double& l : loads) l /= accumulation;
  }
  // Replicated tensors summed over the world, expert shards over their EDP group.
  run.optimizer->reduce_gradients();
  if (run.world() > 1) {
    // The LM loss adds up over ranks (each normalised by the global token count); the aux losses
    // were already formed from global statistics and agree on every rank.
    dist::Communicator& world = run.grid->world();
    at::Tensor totals = at::tensor({r.loss, static_cast<double>(r.tokens)}, at::kDouble)
                            .to(world.tensor_device());
    world.all_reduce(totals, dist::ReduceOp::kSum)->wait();
    totals = totals.cpu();
    r.loss = totals[0].item<double>();
    r.tokens = static_cast<int64_t>(std::llround(totals[1].item<double>()));
  }
  return r;
}

std::string non_finite_hint(const moe::CausalLM& model) {
  std::string worst_name;
  double worst = -1.0;
  // What this rank keeps of each tensor (all of it, unless the base is sharded).
  model.base_weights().for_each_kept([&](const std::string& name, const at::Tensor& t) {
    if ((!worst_name.empty() && !std::isfinite(worst)) || t.numel() == 0) return;
    const double m = t.detach().abs().max().item<double>();  // NaN when t holds one
    if (!std::isfinite(m) || m > worst) {
      worst = m;
      worst_name = name;
    }
  });
  if (!std::isfinite(worst)) {
    return "the base weight '" + worst_name + "' holds non-finite values: the base model is damaged";
  }
  // Trained LLaMA-family weights stay far below this; larger ones overflow in the norms.
  if (worst > 1e4) {
    return fmt::format("the base weight '{}' reaches |w| = {:.3g}, far beyond a trained model's "
                       "range (it overflows the activations): check the base model",
                       worst_name, worst);
  }
  return fmt::format("the base weights look sane (largest |w| = {:.3g}, in '{}'): lower train.lr "
                     "or check the data",
                     worst, worst_name);
}

void apply_update(RunParts& run, StepCounters& counters, StepResult& r) {
  const Config& c = run.config;
  parallel::Optimizer& optimizer = *run.optimizer;
  r.grad_norm = optimizer.grad_norm();
  if (!std::isfinite(r.loss) || !std::isfinite(r.aux_loss) || !std::isfinite(r.grad_norm)) {
    r.skipped = true;
    ++counters.skipped;
    ++counters.consecutive_bad;
    optimizer.zero_grad();
    spdlog::warn("step {}: non-finite loss or gradient (loss {}, aux {}, grad norm {}); update skipped",
                 counters.step + 1, r.loss, r.aux_loss, r.grad_norm);
    MOLE_CHECK(counters.consecutive_bad < c.train.max_bad_steps, "stopping: ",
               counters.consecutive_bad,
               " consecutive steps had a non-finite loss or gradient (train.max_bad_steps = ",
               c.train.max_bad_steps, "); ", non_finite_hint(*run.model));
  } else {
    counters.consecutive_bad = 0;
    optimizer.clip(c.train.clip, r.grad_norm);
    optimizer.step(r.lr);
    optimizer.zero_grad();
  }
  ++counters.step;
}

}  // namespace mole::launch
