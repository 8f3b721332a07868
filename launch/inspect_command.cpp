// `mole inspect` (see inspect_command.h).
#include "launch/inspect_command.h"

#include <ATen/ATen.h>
#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "checkpoint/safetensors.h"
#include "checkpoint/training_checkpoint.h"
#include "kernels/check.h"

namespace mole::launch {
namespace {

namespace fs = std::filesystem;

constexpr double kMiB = 1024.0 * 1024.0;

void inspect_safetensors(const std::string& path, bool verify) {
  st::SafetensorsFile file(path);
  uint64_t bytes = 0;
  std::printf("%s: safetensors, %zu tensors\n", path.c_str(), file.header().tensors.size());
  for (const auto& [key, value] : file.header().metadata) std::printf("  metadata %s = %s\n", key.c_str(), value.c_str());
  for (const st::TensorInfo& t : file.header().tensors) {
    std::printf("  %-72s %-5s %s\n", t.name.c_str(), st::dtype_name(t.dtype), st::shape_text(t.shape).c_str());
    bytes += t.end - t.begin;
  }
  std::printf("  %.2f MiB of data\n", bytes / kMiB);
  if (!verify) return;
  int64_t bad = 0;
  for (const st::TensorInfo& t : file.header().tensors) {
    const at::Tensor v = file.tensor(t.name);
    if (at::isFloatingType(v.scalar_type())) {
      const int64_t n = (~at::isfinite(v)).sum().item<int64_t>();
      if (n > 0) std::printf("  %s: %lld non-finite value(s)\n", t.name.c_str(), static_cast<long long>(n));
      bad += n;
    }
  }
  MOLE_CHECK(bad == 0, "'", path, "' holds ", bad, " non-finite value(s)");
  std::printf("verified: every tensor read, all values finite\n");
}

void inspect_checkpoint(const std::string& folder, bool verify) {
  const ckpt::StoredCheckpoint stored(folder);
  const ckpt::pb::Manifest& m = stored.manifest();
  uint64_t bytes = 0;
  for (const ckpt::pb::Piece& p : m.pieces()) bytes += p.nbytes();
  std::printf("%s: training checkpoint (format %d) at step %lld\n", folder.c_str(), m.format_version(),
              static_cast<long long>(m.step()));
  std::printf("  layout: %d rank(s), ep %d, zero %d, dispatch %s\n", m.world(), m.ep(), m.zero(), m.dispatch().c_str());
  std::printf("  base: %s (fingerprint %016llx)\n", m.base().c_str(), static_cast<unsigned long long>(m.base_fingerprint()));
  std::printf("  adapter: %s\n", m.adapter().c_str());
  std::printf("  config digest %016llx, seed %llu, global batch %lld\n",
              static_cast<unsigned long long>(m.config_digest()), static_cast<unsigned long long>(m.seed()),
              static_cast<long long>(m.global_batch()));
  std::printf("  data: epoch %lld, position %lld; optimizer steps %lld; skipped steps %lld\n",
              static_cast<long long>(m.loader_epoch()), static_cast<long long>(m.loader_position()),
              static_cast<long long>(m.optimizer_steps()), static_cast<long long>(m.skipped_steps()));
  std::printf("  %d file(s), %d pieces, %.2f MiB\n", m.files_size(), m.pieces_size(), bytes / kMiB);
  for (const ckpt::pb::TensorSpec& t : m.tensors()) {
    std::vector<int64_t> shape(t.shape().begin(), t.shape().end());
    std::printf("  %-72s %-5s %s\n", t.name().c_str(), t.dtype().c_str(), st::shape_text(shape).c_str());
  }
  if (!verify) return;
  const uint64_t checked = stored.verify_all();
  std::printf("verified: %d pieces, %.2f MiB, every CRC-32C matches\n", m.pieces_size(), checked / kMiB);
}

}  // namespace

void add_inspect_command(CLI::App& app, InspectOptions& o) {
  CLI::App* cmd = app.add_subcommand("inspect", "Show what a safetensors file, an adapter folder or a training checkpoint holds");
  cmd->add_option("path", o.path, "file.safetensors, adapter folder, checkpoint folder (step-N) or checkpoint.dir")->required();
  cmd->add_flag("--verify", o.verify, "read every byte: checksums of a checkpoint, finite values of a file");
}

void run_inspect(const InspectOptions& o) {
  const std::string& path = o.path;
  MOLE_CHECK(fs::exists(path), "'", path, "' does not exist");
  if (fs::is_regular_file(path)) return inspect_safetensors(path, o.verify);
  if (fs::exists(fs::path(path) / "manifest.pb")) return inspect_checkpoint(path, o.verify);
  if (fs::exists(fs::path(path) / "latest")) return inspect_checkpoint(ckpt::find_checkpoint(path, "auto"), o.verify);
  if (fs::exists(fs::path(path) / "adapter_model.safetensors")) {
    if (fs::exists(fs::path(path) / "adapter_config.json")) {
      std::ifstream in(fs::path(path) / "adapter_config.json");
      std::printf("%s: adapter; adapter_config.json:\n%s\n", path.c_str(),
                  std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()).c_str());
    }
    return inspect_safetensors((fs::path(path) / "adapter_model.safetensors").string(), o.verify);
  }
  MOLE_FAIL("'", path, "' is neither a safetensors file, an adapter folder (adapter_model.safetensors), a "
            "checkpoint folder (manifest.pb) nor a checkpoint.dir (latest)");
}

}  // namespace mole::launch
