// `mole train` on the command line: the subcommand's options, and the start-up of a run — MPI
// and the process grid under mpirun, the config check across ranks, the trainer, and the abort
// of every rank when one fails (see trainer.h).
#include <CLI/CLI.hpp>
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <cmath>
#include <memory>

#include "checkpoint/checksum.h"
#include "dist/backend.h"
#include "dist/communicator.h"
#include "dist/runtime.h"
#include "dist/startup_deadline.h"
#include "kernels/check.h"
#include "launch/metrics_sink.h"
#include "launch/checkpointing.h"
#include "launch/trainer.h"
#include "parallel/parallel_dims.h"
#include "parallel/process_grid.h"

namespace mole::launch {

void add_train_command(CLI::App& app, TrainOptions& options) {
  CLI::App* cmd = app.add_subcommand("train", "Train an adapter from a YAML config");
  cmd->add_option("config", options.config_path, "config YAML (see examples/)")->required();
  cmd->add_option("--set", options.overrides, "override a config key: --set train.steps=50 (repeatable)");
}

uint64_t config_digest(const Config& config) { return ckpt::fnv1a(to_yaml(config)); }

namespace {

// The distributed side of a run: MPI, the world communicator and the grid, when launched with
// several ranks. Declared in this order so that the grid and communicators go before MPI.
struct DistributedRun {
  std::unique_ptr<dist::MpiRuntime> runtime;
  std::shared_ptr<dist::Communicator> bootstrap;  // MPI world, kept for Gloo/NCCL
  std::shared_ptr<parallel::ProcessGrid> grid;
};

// Collective over every rank: the world communicator, the config check, the grid. `deadline`
// is told each phase, for the message of a start-up that hangs.
void build_grid(DistributedRun& run, const Config& config, dist::StartupDeadline& deadline) {
  deadline.phase("creating the world communicator (parallel.backend " + config.parallel.backend +
                 "; with Gloo: the address exchange and a TCP connection to every rank)");
  dist::WorldCommunicator made = dist::make_world_communicator(
      config.parallel.backend, *run.runtime, config.model.device == "cuda",
      run.runtime->rank_info().local_rank, config.parallel.timeout_s);
  run.bootstrap = made.bootstrap;
  std::shared_ptr<dist::Communicator> world = made.comm;
  // Every rank must train the same thing: compare a digest of the resolved config.
  deadline.phase("comparing the config digest over every rank");
  const uint64_t digest = config_digest(config);
  at::Tensor mine =
      at::tensor({static_cast<int64_t>(digest >> 1)}, at::kLong).to(world->tensor_device());
  at::Tensor low = mine.clone(), high = mine.clone();
  world->all_reduce(low, dist::ReduceOp::kMin)->wait();
  world->all_reduce(high, dist::ReduceOp::kMax)->wait();
  MOLE_CHECK(low.item<int64_t>() == high.item<int64_t>(), "rank ", world->rank(),
             ": the resolved config differs between ranks (digests ", low.item<int64_t>(), " .. ",
             high.item<int64_t>(), "); start every rank with the same config file and --set options");
  const parallel::ParallelSizes sizes{world->size(), static_cast<int>(config.parallel.ep),
                                      static_cast<int>(config.parallel.zero),
                                      static_cast<int>(config.parallel.base_shard)};
  deadline.phase("creating the process grid's communicators");
  run.grid = std::make_shared<parallel::ProcessGrid>(sizes, world);  // validates the sizes
  // Checked before any model is loaded (the same on every rank: the configs agree); per-layer
  // counts are checked again per site.
  const parallel::ParallelDims& dims = run.grid->dims();
  const bool moe_method = config.adapter.method != "lora";
  const bool uniform = config.adapter.experts_list.empty() && config.adapter.experts_pattern.empty();
  if (moe_method && uniform) dims.check_experts(config.adapter.experts);
  // Every rank says where it runs before only rank 0 speaks (a start-up check on clusters).
  const dist::RankInfo local = run.runtime ? run.runtime->rank_info() : dist::detect_rank_info();
  spdlog::info("rank {} of {} on host {} (local rank {} of {}), device {}, {} backend", world->rank(), world->size(),
               dist::host_name(), local.local_rank, local.local_world, model_device(config).str(), world->backend());
  if (world->rank() != 0) spdlog::set_level(spdlog::level::warn);
  spdlog::info("data parallel over {} ranks ({} backend){}", world->size(), world->backend(),
               dims.ep() > 1 ? ", expert parallel over groups of " + std::to_string(dims.ep()) : "");
}

}  // namespace

int run_train(const TrainOptions& options) {
  Config config = load_config(options.config_path, options.overrides);
  DistributedRun distributed;
  // Start-up blocks in calls without timeouts of their own (MPI_Init, communicator creation):
  // parallel.timeout_s bounds all of it, and a rank still starting then ends with a message.
  std::unique_ptr<dist::StartupDeadline> deadline;
  if (dist::detect_rank_info().world > 1) {
    deadline = std::make_unique<dist::StartupDeadline>(config.parallel.timeout_s, "parallel.timeout_s");
    deadline->phase("in MPI_Init and the node-local communicator");
    distributed.runtime = std::make_unique<dist::MpiRuntime>();
  }
  const int rank = distributed.runtime ? distributed.runtime->rank_info().rank : 0;
  install_stop_signals();
  std::unique_ptr<Trainer> trainer;
  try {
    if (distributed.runtime) {
      build_grid(distributed, config, *deadline);
      deadline->done();
    }
    // A run that continues from its checkpoint owns its folder already.
    if (checkpoint_to_resume(config).empty()) claim_run_folder(config, rank == 0);
    // Kept past the catch below: a failing rank reports and aborts the job before anything of the
    // run is torn down (a background save would otherwise be waited for first).
    trainer = std::make_unique<Trainer>(std::move(config), distributed.grid, distributed.bootstrap);
    TrainSummary s = trainer->run();
    if (s.stopped) return kExitStopped;
    if (rank != 0) return 0;
    const double ratio = s.first_loss > 0 ? s.last_loss / s.first_loss : 0.0;
    spdlog::info("done: {} steps in {:.1f} s | loss {:.4f} (first step) -> {:.4f} (mean of the last 10) = {:.0f}% | {:.0f} target tok/s{}",
                 s.steps, s.wall_s, s.first_loss, s.last_loss, 100.0 * ratio, s.tokens_per_s,
                 s.skipped_steps ? " | " + std::to_string(s.skipped_steps) + " steps skipped" : "");
    if (!std::isnan(s.eval_loss)) {
      spdlog::info("eval: loss {:.4f}, next-token accuracy {:.3f}", s.eval_loss, s.eval_accuracy);
    }
    spdlog::info("run folder {}: config.yaml, metrics.jsonl, events.out.tfevents.*, adapter/{}",
                 s.run_dir, trainer->config().model.base.rfind("synthetic:", 0) == 0 ? ", base/" : "");
    return 0;
  } catch (const std::exception& e) {
    if (deadline) deadline->done();  // the error below is the message, not a start-up timeout
    if (distributed.runtime) {
      // Report, then end every rank: peers may be waiting in a collective this rank left.
      spdlog::error("rank {}: {}", rank, e.what());
      distributed.grid.reset();
      distributed.bootstrap.reset();
      distributed.runtime->abort(1);
    }
    throw;
  }
}

}  // namespace mole::launch
