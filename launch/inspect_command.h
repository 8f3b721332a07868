// `mole inspect PATH [--verify]`: what a safetensors file, an adapter folder or a training
// checkpoint holds (tensors, shapes, dtypes; for a checkpoint its step, layout, base model,
// adapter and config digest). `--verify` reads every byte: a checkpoint's pieces against their
// CRC-32C, a safetensors file's data against its header (and finite values for floats).
#pragma once

#include <string>

namespace CLI {
class App;
}

namespace mole::launch {

struct InspectOptions {
  std::string path;
  bool verify = false;
};

void add_inspect_command(CLI::App& app, InspectOptions& options);
void run_inspect(const InspectOptions& options);

}  // namespace mole::launch
