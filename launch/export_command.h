// `mole export RUN_OR_ADAPTER_DIR --out DIR [--format peft|moe-peft]`: writes a run's adapter
// (or re-writes an adapter folder) in PEFT or MoE-PEFT layout, validated against its base model.
#pragma once

#include <string>

namespace CLI {
class App;
}

namespace mole::launch {

struct ExportOptions {
  std::string source;
  std::string out;
  std::string format;  // empty: peft for lora, moe-peft otherwise
  std::string model;   // empty: base_model_name_or_path from the adapter config
  bool overwrite = false;  // replace an adapter already in --out
};

void add_export_command(CLI::App& app, ExportOptions& options);
void run_export(const ExportOptions& options);

}  // namespace mole::launch
