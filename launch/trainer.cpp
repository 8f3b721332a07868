// The training loop (see trainer.h).
#include "launch/trainer.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <spdlog/spdlog.h>

#include "checkpoint/adapter_export.h"
#include "dist/communicator.h"
#include "kernels/check.h"
#include "launch/checkpointing.h"
#include "launch/memory_stats.h"
#include "parallel/expert_dispatcher.h"
#include "parallel/optimizer.h"
#include "parallel/parameter_registry.h"
#include "parallel/process_grid.h"

namespace mole::launch {

namespace {

// The signal that asked the run to stop (SIGTERM, SIGUSR1), 0 for none.
volatile std::sig_atomic_t g_stop_signal = 0;

extern "C" void on_stop_signal(int signal) { g_stop_signal = signal; }

}  // namespace

void install_stop_signals() {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGUSR1, &action, nullptr);
}

Trainer::Trainer(Config config, std::shared_ptr<parallel::ProcessGrid> grid, std::shared_ptr<dist::Communicator> host)
    : parts_(build_run(std::move(config), std::move(grid))) {
  const Config& c = parts_.config;
  if (c.checkpoint.every > 0) check_checkpoint_dir(c, rank());
  resumed_from_ = checkpoint_to_resume(c);
  if (!resumed_from_.empty()) counters_ = resume_from_checkpoint(parts_, resumed_from_);
  if (c.checkpoint.every > 0 && c.checkpoint.async) {
    // A host communicator that allows a second thread: MPI's world, or the training world when
    // MPI lacks MPI_THREAD_MULTIPLE and training runs on Gloo (AsyncCheckpointer names what is missing).
    dist::Communicator* comm = nullptr;
    if (parts_.grid) {
      dist::Communicator& world = parts_.grid->world();
      const bool world_fits = world.tensor_device().is_cpu() && world.concurrent_use();
      comm = host && (host->concurrent_use() || !world_fits) ? host.get() : &world;
    }
    async_ = std::make_unique<AsyncCheckpointer>(parts_, comm);
  }
}

bool Trainer::stop_requested() const {
  bool stop = g_stop_signal != 0;
  if (world() > 1) {
    // Every rank stops at the same step, whichever got the signal.
    dist::Communicator& w = parts_.grid->world();
    at::Tensor flag = at::tensor({static_cast<int64_t>(stop)}, at::kLong).to(w.tensor_device());
    w.all_reduce(flag, dist::ReduceOp::kMax)->wait();
    stop = flag.cpu().item<int64_t>() != 0;
  }
  return stop;
}

Trainer::~Trainer() = default;

StepResult Trainer::accumulate_gradients() { return launch::accumulate_gradients(parts_, counters_); }

void Trainer::apply_update(StepResult& result) { launch::apply_update(parts_, counters_, result); }

StepResult Trainer::step() {
  StepResult r = accumulate_gradients();
  apply_update(r);
  return r;
}

TrainSummary Trainer::run() {
  const Config& c = parts_.config;
  // No progress bar under mpirun, whose forwarded stdout may look like a terminal.
  MetricsSink sink(c, rank() == 0, world() == 1 && isatty(fileno(stdout)), parts_.spec.is_moe(),
                   parts_.model->options().device(), resumed_from_.empty() ? -1 : counters_.step);
  const at::Device device = parts_.model->options().device();
  while (counters_.step < c.train.steps) {
    // The step's peak of tensor bytes (checkpoint saves and evaluation are not in it); the CUDA
    // allocator's peak of the run so far is kept first.
    run_peak_device_bytes_ = std::max(run_peak_device_bytes_, peak_cuda_allocated_bytes(device));
    reset_peak_tensor_bytes(device);
    StepResult result = step();
    step_peak_bytes_ = std::max(step_peak_bytes_, peak_tensor_bytes(device));
    sink.on_step(result);
    const int64_t done = counters_.step;
    if (c.train.eval_every > 0 && done % c.train.eval_every == 0 && done != c.train.steps) {
      evaluate_and_log(sink, done);
    }
    // A signal during the last step: the run finishes normally (its adapter is the result).
    if (done < c.train.steps && stop_requested()) {
      // Preemption: checkpoint this step and end (the run continues from it when started again).
      TrainSummary summary = sink.summary();
      summary.stopped = true;
      if (async_) {
        try {
          async_->wait();
        } catch (const Error& e) {
          // Every rank has this error (the save's collectives agreed on it): the stop's own
          // checkpoint is what the job continues from.
          spdlog::error("{}; saving the checkpoint of step {} now", e.what(), done);
        }
      }
      summary.checkpoint = save_checkpoint(parts_, counters_);
      if (rank() == 0) {
        spdlog::warn("stopped by a signal after step {}: checkpoint {} saved; run the same command{} "
                     "to continue", done, summary.checkpoint,
                     c.checkpoint.resume == "auto" || c.checkpoint.resume == "never"
                         ? "" : " with --set checkpoint.resume=auto");
      }
      return summary;
    }
    if (c.checkpoint.every > 0 && done % c.checkpoint.every == 0 && done != c.train.steps) {
      if (async_) {
        async_->save(parts_, counters_);
      } else {
        save_checkpoint(parts_, counters_);
      }
    }
  }
  // A background save in flight is finished first (its error ends the run).
  if (async_) async_->wait();
  evaluate_and_log(sink, c.train.steps);
  TrainSummary summary = sink.summary();
  const parallel::OptimizerMemory memory = parts_.optimizer->memory();
  summary.trainable_bytes = memory.trainable_bytes;
  summary.grad_bytes = memory.grad_bytes;
  summary.optimizer_bytes = memory.optimizer_bytes;
  summary.base_bytes = base_bytes(*parts_.model);
  summary.gathered_bytes = parts_.model->base_weights().peak_gathered_bytes();
  summary.peak_host_bytes = static_cast<int64_t>(peak_host_mib() * 1024.0 * 1024.0);
  summary.peak_device_bytes = std::max(run_peak_device_bytes_, peak_cuda_allocated_bytes(parts_.model->options().device()));
  if (step_peak_bytes_ >= 0) {
    summary.step_peak_bytes = step_peak_bytes_;
    summary.activation_bytes = step_peak_bytes_ - (summary.base_bytes + summary.gathered_bytes +
                                                   summary.trainable_bytes + summary.grad_bytes +
                                                   summary.optimizer_bytes);
  }
  if (rank() == 0) {
    const auto mib = [](int64_t bytes) { return static_cast<double>(bytes) / (1 << 20); };
    spdlog::info("memory of rank 0: base {:.1f} MiB, gathered {:.1f} MiB, trainable {:.1f} MiB, gradients {:.1f} MiB, "
                 "optimizer {:.1f} MiB; a step's peak {:.1f} MiB of tensors (activations {:.1f} MiB); peak RSS {:.1f} MiB",
                 mib(summary.base_bytes), mib(summary.gathered_bytes), mib(summary.trainable_bytes),
                 mib(summary.grad_bytes), mib(summary.optimizer_bytes), mib(summary.step_peak_bytes),
                 mib(summary.activation_bytes), mib(summary.peak_host_bytes));
  }
  for (const parallel::FlatLayout& l : parts_.optimizer->flat_layouts()) {
    summary.zero_groups.push_back(
        {l.group, l.bucket, l.numel, l.slice > 0 ? l.padded / l.slice : 0, l.slice});
  }
  // (A run resumed from a checkpoint of its last step has no step of its own to check.)
  MOLE_CHECK(summary.steps == 0 || summary.skipped_steps < summary.steps, "every one of the ", summary.steps,
             " steps had a non-finite loss or gradient and was skipped: nothing was trained and no "
             "adapter was written; ", non_finite_hint(*parts_.model));
  try {
    export_adapter();
  } catch (const Error& e) {
    if (sink.log_error().empty()) throw;
    MOLE_FAIL(e.what(), " (the run's logs had failed before: ", sink.log_error(), ")");
  }
  sink.write_summary(summary);
  MOLE_CHECK(sink.log_error().empty(), "training finished and the adapter was written to '", c.log.dir,
             "/adapter', but the run's logs are incomplete: ", sink.log_error());
  return summary;
}

void Trainer::evaluate_and_log(MetricsSink& sink, int64_t step) {
  // Under expert parallelism every rank takes part in the forward passes.
  // So does every rank of rank 0's base-shard group (its layers are gathered collectively).
  const bool in_lead_base_group = rank() < parts_.config.parallel.base_shard;
  if (parts_.eval_examples.empty() || (!sink.lead() && !parts_.dispatcher && !in_lead_base_group)) return;
  const EvalResult e = evaluate(*parts_.model, parts_.eval_examples, parts_.config.train.micro_batch,
                                parts_.tokenizer->pad_id(), parts_.moe_dispatcher());
  sink.on_eval(step, e);
}

void Trainer::export_adapter() {
  const Config& c = parts_.config;
  dist::Communicator* ep = parts_.dispatcher ? &parts_.grid->ep() : nullptr;
  const std::vector<moe::NamedTensor> whole = parallel::gather_trainable(*parts_.registry, ep);
  // A synthetic base is written beside the adapter: gathered first (by rank 0's base-shard group)
  // when it is sharded.
  std::vector<moe::NamedTensor> base_tensors;
  if (parts_.synthetic_base() && rank() < c.parallel.base_shard) base_tensors = whole_base(*parts_.model, rank() == 0);
  if (rank() != 0) return;
  // Never an adapter with non-finite values: a reader would trust it.
  for (const moe::NamedTensor& t : whole) {
    MOLE_CHECK(at::isfinite(t.second).all().item<bool>(), "trainable tensor '", t.first,
               "' holds non-finite values after training; no adapter was written to '", c.log.dir,
               "/adapter'");
  }
  const std::string base = parts_.synthetic_base() ? c.log.dir + "/base" : c.model.base;
  // The adapter first: it is what the run made (the synthetic base can be made again).
  ckpt::save_adapter(whole, parts_.spec, c.log.dir + "/adapter", base);
  // With its tokenizer, so that training or `mole forward --text` on base/ needs no other setting.
  if (parts_.synthetic_base()) {
    if (base_tensors.empty()) {
      ckpt::save_hf_model(*parts_.model, base, tokenizer_files(parts_.tokenizer_spec));
    } else {
      ckpt::save_hf_model(*parts_.model, base_tensors, base, tokenizer_files(parts_.tokenizer_spec));
    }
  }
}

TrainerState Trainer::state() const {
  TrainerState s;
  s.counters = counters_;
  s.loader = parts_.loader->cursor();
  for (const parallel::ParamSlot& slot : parts_.registry->slots()) {
    s.parameters.emplace_back(slot.name, slot.tensor.detach().clone());
  }
  s.optimizer = parts_.optimizer->state();
  s.forward_rng = parts_.forward_gen.get_state();
  return s;
}

void Trainer::load_state(const TrainerState& s) {
  const auto& slots = parts_.registry->slots();
  MOLE_CHECK(s.parameters.size() == slots.size(), "trainer state holds ", s.parameters.size(),
             " trainable tensors but the run has ", slots.size());
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < slots.size(); ++i) {
    const auto& [name, value] = s.parameters[i];
    MOLE_CHECK(name == slots[i].name && value.sizes() == slots[i].tensor.sizes(),
               "trainer state tensor ", i, " is '", name, "' ", value.sizes(), ", expected '",
               slots[i].name, "' ", slots[i].tensor.sizes());
    slots[i].tensor.copy_(value);
  }
  parts_.optimizer->load_state(s.optimizer);
  parts_.loader->restore(s.loader);
  parts_.forward_gen.set_state(s.forward_rng);
  counters_ = s.counters;
}

}  // namespace mole::launch
