// `mole train`: builds the model, adapter, data and optimizer from a Config and runs the training
// loop, logging on rank 0 and writing the adapter (and, for a synthetic base, the base model) into
// the run folder at the end.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "launch/config.h"
#include "launch/data.h"
#include "moe/adapter.h"
#include "moe/llama.h"

namespace CLI {
class App;
}

namespace mole::dist {
class ProcessGrid;
}

namespace mole::launch {

struct TrainSummary {
  int64_t steps = 0;
  int64_t skipped_steps = 0;
  double first_loss = 0.0;  // LM loss of the first step
  double last_loss = 0.0;   // mean LM loss of the last 10 steps (less noisy than one step)
  double wall_s = 0.0;
  double tokens_per_s = 0.0;  // target tokens per second over the whole run
  double eval_loss = 0.0;     // last evaluation (NaN when none)
  double eval_accuracy = 0.0;
  std::string run_dir;
};

// What one optimizer step did.
struct StepResult {
  int64_t step = 0;        // 0-based index of the step
  double loss = 0.0;       // LM loss (normalised by the global target-token count)
  double aux_loss = 0.0;   // sum of the weighted auxiliary losses (mean over micro-batches)
  double lr = 0.0;
  double grad_norm = 0.0;  // before clipping
  bool skipped = false;    // non-finite loss or gradient: no update
  int64_t tokens = 0;      // real (non-padding) tokens processed
  int64_t target_tokens = 0;
};

// The parts of a run, built from a Config, in the order the training step needs them.
class Trainer {
 public:
  // `grid` is the process grid of a multi-rank run (mpirun); null for one process.
  explicit Trainer(Config config, std::shared_ptr<dist::ProcessGrid> grid = nullptr);
  ~Trainer();
  // Every step, logging, evaluation, and the adapter written at the end.
  TrainSummary run();
  // One optimizer step: accumulate_gradients() then apply_update(). Throws after
  // train.max_bad_steps consecutive non-finite steps.
  StepResult step();
  // Forward and backward over this rank's micro-batches of the next global batch, then (on
  // several ranks) the gradients summed over the ranks: afterwards every rank's trainable tensors
  // hold the gradient of the one global-batch loss, and the result reports that loss.
  StepResult accumulate_gradients();
  // Checks the gradients for non-finite values (skipping the update if any), clips, and updates.
  void apply_update(StepResult& result);

  const Config& config() const { return config_; }
  moe::CausalLM& model() { return *model_; }
  const moe::AdapterSpec& adapter() const { return spec_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  int rank() const;
  int world() const;

 private:
  struct Impl;
  // Chooses each site's dispatch mode, logs it, and keeps this rank's experts.
  void setup_expert_parallel();

  Config config_;
  std::shared_ptr<dist::ProcessGrid> grid_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<moe::CausalLM> model_;
  moe::AdapterSpec spec_;
  std::unique_ptr<Impl> impl_;
};

// Loss and next-token accuracy on response tokens (labels != -100) of `examples`.
struct EvalResult {
  double loss = 0.0;
  double accuracy = 0.0;
  int64_t tokens = 0;
};
// With a dispatcher (expert parallelism) the call is collective over its EP group.
EvalResult evaluate(const moe::CausalLM& model, const std::vector<Example>& examples,
                    int64_t micro_batch, int64_t pad_id,
                    const moe::Dispatcher* dispatcher = nullptr);

// The built-in synthetic base: a small LLaMA-architecture model with `vocab` entries, weights
// drawn deterministically from `seed`.
moe::ModelConfig synthetic_tiny_config(int64_t vocab);

struct TrainOptions {
  std::string config_path;
  std::vector<std::string> overrides;
};
void add_train_command(CLI::App& app, TrainOptions& options);
// Under mpirun (several ranks) this starts MPI, checks that every rank resolved the same config
// (a digest of it is compared), builds the process grid, and trains data-parallel; logging and
// outputs come from rank 0. A failure on any rank ends the whole job.
void run_train(const TrainOptions& options);

// FNV-1a digest of the resolved config, compared across ranks at start-up.
uint64_t config_digest(const Config& config);

}  // namespace mole::launch
