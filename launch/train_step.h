// One optimizer step of a run: forward and backward over this rank's micro-batches of the next
// global batch, the gradient reduction, the non-finite check, clipping and the update. The
// functions read and change the run's parts and the step counters; the loop that calls them is
// Trainer::run().
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "launch/run_parts.h"

namespace mole::launch {

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
  // Each weighted auxiliary loss by name (mean over micro-batches), and per-site routed-pair
  // fractions, for logging.
  std::map<std::string, double> aux_parts;
  std::vector<std::pair<std::string, std::vector<double>>> expert_loads;
};

// The counters a resumed run continues from.
struct StepCounters {
  int64_t step = 0;             // optimizer steps taken (skipped ones included)
  int64_t consecutive_bad = 0;  // non-finite steps in a row
  int64_t skipped = 0;          // non-finite steps in all
};

// Forward and backward over this rank's micro-batches of the next global batch, then the
// optimizer's gradient reduction: afterwards every rank's trainable tensors hold the gradient of
// the one global-batch loss, and the result reports that loss. Collective on several ranks.
StepResult accumulate_gradients(RunParts& run, const StepCounters& counters);

// Checks the loss and the gradient norm for non-finite values (skipping the update if any),
// clips, updates, and advances the counters. Throws after train.max_bad_steps consecutive
// non-finite steps. Collective on several ranks (the gradient norm).
void apply_update(RunParts& run, StepCounters& counters, StepResult& result);

// What to check when steps keep coming out non-finite, from the frozen base weights: a tensor
// holding NaN/inf or extreme values (named), or else the learning rate and the data.
std::string non_finite_hint(const moe::CausalLM& model);

}  // namespace mole::launch
