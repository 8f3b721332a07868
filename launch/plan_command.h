// `mole plan CONFIG [--world N] [--set key=value ...] [--device-memory GiB] [--json]
// [--smallest-world]`: what each rank of that training run would hold (frozen base shard,
// gathered layers, trainable tensors, gradients, optimizer state, activations) and send per step
// (gradient reduction, base all-gathers, expert dispatch), and whether it fits in the device's
// memory. Reads the config and, for a Hugging Face base, its config.json only: no weights.
#pragma once

#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace mole::launch {

struct PlanOptions {
  std::string config;
  std::vector<std::string> overrides;
  int world = 1;
  double device_memory_gib = 0.0;  // 0: this machine's memory for model.device cpu
  bool json = false;
  bool smallest_world = false;  // also the fewest ranks at which the layout, scaled, fits
};

void add_plan_command(CLI::App& app, PlanOptions& options);
// Prints the plan (text, or JSON with --json) on stdout.
void run_plan(const PlanOptions& options);

}  // namespace mole::launch
