// Where a run's metrics go: on rank 0 the run folder (config.yaml, metrics.jsonl, TensorBoard
// events, summary.json) and the console (a progress bar on a terminal, a log line per logged
// step); on the other ranks nowhere.
#pragma once

#include <c10/core/Device.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "launch/config.h"
#include "launch/train_step.h"

namespace mole::ckpt {
class AppendLog;
}  // namespace mole::ckpt

namespace mole::launch {

class TensorBoardWriter;

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
  // This rank's bytes of trainable state (rank 0's, in summary.json "memory"; see
  // parallel::OptimizerMemory).
  int64_t trainable_bytes = 0;
  int64_t grad_bytes = 0;
  int64_t optimizer_bytes = 0;
  int64_t base_bytes = 0;          // the frozen base tensors this rank holds
  int64_t gathered_bytes = 0;      // a sharded base: the most it had gathered at once (else 0)
  int64_t peak_host_bytes = 0;     // this process's peak resident set
  int64_t peak_device_bytes = -1;  // the CUDA caching allocator's peak (-1: not on CUDA)
  // The most bytes of tensors (on the model's device) held at once during a training step (-1:
  // not tracked), and what of it is not in the categories above: activations kept for backward
  // and the step's transients.
  int64_t step_peak_bytes = -1;
  int64_t activation_bytes = -1;
  // ZeRO's flat buffers on this rank: group ("world" or "edp"), bucket, elements, ranks, slice
  // per rank.
  struct ShardGroup {
    std::string group;
    int bucket = 0;
    int64_t numel = 0, ranks = 0, slice = 0;
  };
  std::vector<ShardGroup> zero_groups;
  // Stopped early by SIGTERM or SIGUSR1, after saving the checkpoint `checkpoint`.
  bool stopped = false;
  std::string checkpoint;
};

// Loss and next-token accuracy on response tokens (labels != -100).
struct EvalResult {
  double loss = 0.0;
  double accuracy = 0.0;
  int64_t tokens = 0;
};

// Checks that `config.log.dir` holds no other run (config.yaml, metrics.jsonl, summary.json,
// TensorBoard events, adapter/, base/): throws naming what is there and how to go on, unless
// log.overwrite is true; then `lead` removes those files and folders (nothing else in the folder).
void claim_run_folder(const Config& config, bool lead);

class MetricsSink {
 public:
  // `lead`: this rank writes (rank 0). Creates the run folder and writes config.yaml there.
  // `show_progress`: a progress bar on the console (one process on a terminal).
  // `device`: the model's; on CUDA the log lines carry its allocator peak.
  // `resumed_step` >= 0: the run continues from a checkpoint of that step, and metrics.jsonl keeps
  // only its lines up to that step (a killed run may have logged beyond its last checkpoint); the
  // new TensorBoard event file starts with a restart event for the same reason.
  MetricsSink(const Config& config, bool lead, bool show_progress, bool moe_method,
              const at::Device& device, int64_t resumed_step = -1);
  ~MetricsSink();

  // After every step: the running summary, the progress bar, and at log steps (train.log.every,
  // the first and the last step) a console line, a metrics.jsonl line and TensorBoard scalars.
  void on_step(const StepResult& result);
  void on_eval(int64_t step, const EvalResult& eval);
  // The run's summary so far (wall time up to now; eval from the last on_eval()).
  TrainSummary summary() const;
  // Rank 0 writes summary.json (whole or not at all; a failure throws naming the file).
  void write_summary(const TrainSummary& summary) const;
  // The first failed write to metrics.jsonl or the TensorBoard events (empty when none). A
  // failed log is closed with a warning and training goes on: the run ends with an error after
  // the adapter is saved.
  const std::string& log_error() const { return log_error_; }
  bool lead() const { return lead_; }

 private:
  using Clock = std::chrono::steady_clock;
  void log_step(int64_t done, const StepResult& r, double elapsed);
  void write_line(const std::string& line);
  void write_scalars(const std::vector<std::pair<std::string, double>>& scalars, int64_t step);
  void log_failed(const std::string& what, const std::string& error);

  const Config& config_;
  bool lead_, tty_, moe_;
  at::Device device_;
  std::unique_ptr<ckpt::AppendLog> metrics_;
  std::string log_error_;
  std::unique_ptr<TensorBoardWriter> tb_;
  TrainSummary summary_;
  Clock::time_point start_, window_start_;
  int64_t window_tokens_ = 0, total_target_tokens_ = 0, steps_seen_ = 0;
  std::deque<double> recent_losses_;
};

}  // namespace mole::launch
