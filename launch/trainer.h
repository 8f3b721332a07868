// `mole train`: a run's parts built from a Config (run_parts.h), and the loop that drives them:
// step, metrics on rank 0, evaluation, export; every part that a resume needs reports and
// restores its state through TrainerState.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "launch/checkpointing.h"
#include "launch/config.h"
#include "launch/data.h"
#include "launch/evaluate.h"
#include "launch/metrics_sink.h"
#include "launch/run_parts.h"
#include "launch/train_step.h"
#include "moe/adapter.h"
#include "moe/llama.h"
#include "parallel/optimizer.h"

namespace CLI {
class App;
}

namespace mole::dist {
class Communicator;
}

namespace mole::launch {

// Everything a run needs to continue exactly where it was (one rank's share): the step counters,
// the data loader's position, this rank's trainable tensors (registry names), the optimizer's
// state and the forward generator's state.
struct TrainerState {
  StepCounters counters;
  LoaderCursor loader;
  std::vector<moe::NamedTensor> parameters;
  parallel::OptimizerState optimizer;
  at::Tensor forward_rng;
};

class Trainer {
 public:
  // `grid` is the process grid of a multi-rank run (mpirun); null for one process.
  // `host`: a communicator over the same ranks whose collectives run on the host (MPI's world),
  // for the background checkpoint saves; null: the grid's world, when that is not NCCL.
  explicit Trainer(Config config, std::shared_ptr<parallel::ProcessGrid> grid = nullptr,
                   std::shared_ptr<dist::Communicator> host = nullptr);
  ~Trainer();
  // The remaining steps, logging, evaluation, and the adapter written at the end.
  TrainSummary run();
  // One optimizer step: accumulate_gradients() then apply_update().
  StepResult step();
  // See train_step.h.
  StepResult accumulate_gradients();
  void apply_update(StepResult& result);

  // Deep copies of the state a resume needs, and its restoration (same layout and config).
  TrainerState state() const;
  void load_state(const TrainerState& state);

  const Config& config() const { return parts_.config; }
  moe::CausalLM& model() { return *parts_.model; }
  const moe::AdapterSpec& adapter() const { return parts_.spec; }
  const Tokenizer& tokenizer() const { return *parts_.tokenizer; }
  int rank() const { return parts_.rank(); }
  int world() const { return parts_.world(); }

 private:
  // Whether any rank got SIGTERM or SIGUSR1 (collective over the world).
  bool stop_requested() const;
  // Evaluation on the held-out set; every rank of an EP group takes part (same examples).
  void evaluate_and_log(MetricsSink& sink, int64_t step);
  // Collective: the whole adapter gathered from the expert shards; rank 0 writes it (and a
  // synthetic base) into the run folder. The live model is not touched.
  void export_adapter();

  RunParts parts_;
  StepCounters counters_;
  std::string resumed_from_;  // the checkpoint the run continued from, if any
  std::unique_ptr<AsyncCheckpointer> async_;  // checkpoint.async
  int64_t step_peak_bytes_ = -1;  // the most tensor bytes a step held (-1: not tracked)
  int64_t run_peak_device_bytes_ = -1;  // the CUDA allocator's peak over the run (-1: not CUDA)
};

// SIGTERM and SIGUSR1 (what schedulers send before preemption) make Trainer::run finish the
// current step on every rank, save a checkpoint and return (`mole train` then exits with
// kExitStopped).
void install_stop_signals();
constexpr int kExitStopped = 75;  // EX_TEMPFAIL: stopped and checkpointed; run again to continue

struct TrainOptions {
  std::string config_path;
  std::vector<std::string> overrides;
};
void add_train_command(CLI::App& app, TrainOptions& options);
// Under mpirun (several ranks) this starts MPI, checks that every rank resolved the same config
// (a digest of it is compared), builds the process grid, and trains data-parallel; logging and
// outputs come from rank 0. A failure on any rank ends the whole job. Returns the exit status:
// 0, or kExitStopped after a signal.
int run_train(const TrainOptions& options);

// FNV-1a digest of the resolved config, compared across ranks at start-up.
uint64_t config_digest(const Config& config);

}  // namespace mole::launch
