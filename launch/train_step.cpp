// The training step (see train_step.h).
#include "launch/train_step.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <cmath>

#include "dist/communicator.h"
#include "kernels/check.h"
#include "launch/schedule.h"
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
  const at::Device device = run.model->options().device();
  const moe::SumOverRanks over_ranks = sum_over_ranks(run);
  for (const MicroBatch& mb : batch.micro_batches) {
    moe::ForwardContext ctx;
    ctx.training = true;
    ctx.generator = run.forward_gen;
    ctx.valid_T = mb.valid_BS.reshape({-1}).to(device);
    ctx.dispatcher = run.moe_dispatcher();
    at::Tensor logits = run.model->forward(mb.input_ids_BS, ctx);
    moe::LossSum ls = moe::causal_lm_loss_sum(logits, mb.labels_BS);
    // Normalised once by the step's global target-token count, so micro-batches simply add up.
    at::Tensor lm = ls.sum / static_cast<double>(batch.global_target_tokens);
    moe::AuxLosses aux = moe::aux_losses(ctx, run.spec.aux, over_ranks);
    (lm + aux.total / accumulation).backward();
    r.loss += lm.item<double>();
    r.aux_loss += aux.total.item<double>() / accumulation;
    r.tokens += mb.valid_BS.sum().item<int64_t>();
    const std::pair<const char*, const at::Tensor*> parts[] = {
        {"load_balance", &aux.load_balance}, {"z_loss", &aux.z_loss},
        {"entropy_loss", &aux.entropy}, {"contrastive_loss", &aux.contrastive}};
    for (const auto& [name, t] : parts) {
      if (t->defined()) r.aux_parts[name] += t->item<double>() / accumulation;
    }
    add_loads(r.expert_loads, moe::expert_loads(ctx));
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
               c.train.max_bad_steps, "); lower train.lr or check the data");
  } else {
    counters.consecutive_bad = 0;
    optimizer.clip(c.train.clip, r.grad_norm);
    optimizer.step(r.lr);
    optimizer.zero_grad();
  }
  ++counters.step;
}

}  // namespace mole::launch
