// `mole export SOURCE --out DIR [--format peft|moe-peft]`: writes an adapter in PEFT or MoE-PEFT
// layout from a run's final adapter, an adapter folder (validated against its base model), or a
// training checkpoint (gathered from its rank files, no training process needed).
#pragma once

#include <string>

namespace CLI {
class App;
}

namespace mole::launch {

struct ExportOptions {
  // A run folder (its adapter/, else its ckpt/'s latest checkpoint), an adapter folder, a
  // checkpoint folder (ckpt/step-000123) or a checkpoint.dir (its latest).
  std::string source;
  std::string out;
  std::string format;  // empty: peft for lora, moe-peft otherwise
  std::string model;   // empty: base_model_name_or_path from the adapter config
  bool overwrite = false;  // replace an adapter already in --out
};

void add_export_command(CLI::App& app, ExportOptions& options);
void run_export(const ExportOptions& options);

}  // namespace mole::launch
