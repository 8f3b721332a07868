// `mole export` (see export_command.h).
#include "launch/export_command.h"

#include <ATen/ATen.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

#include "checkpoint/adapter_export.h"
#include "checkpoint/model_loader.h"
#include "checkpoint/moe_peft_adapter.h"
#include "kernels/check.h"

namespace mole::launch {

namespace fs = std::filesystem;

void add_export_command(CLI::App& app, ExportOptions& o) {
  CLI::App* cmd = app.add_subcommand("export", "Write a run's adapter in PEFT or MoE-PEFT layout");
  cmd->add_option("source", o.source, "run folder (runs/NAME) or adapter folder")->required();
  cmd->add_option("--out", o.out, "output adapter folder")->required();
  cmd->add_option("--format", o.format, "peft (plain LoRA) or moe-peft (MoE methods)")
      ->check(CLI::IsMember({"peft", "moe-peft"}));
  cmd->add_option("--model", o.model, "base model folder (default: the adapter's base_model_name_or_path)");
  cmd->add_flag("--overwrite", o.overwrite, "replace an adapter already in --out");
}

void run_export(const ExportOptions& o) {
  // Checked first: nothing is read or written when the answer would land on another adapter.
  for (const char* file : {"adapter_config.json", "adapter_model.safetensors"}) {
    MOLE_CHECK(o.overwrite || !fs::exists(o.out + "/" + file), "--out '", o.out,
               "' already holds an adapter (", file,
               "); choose another folder or pass --overwrite to replace it");
  }
  std::string adapter = o.source;
  if (fs::exists(o.source + "/adapter/adapter_config.json")) adapter = o.source + "/adapter";
  MOLE_CHECK(fs::exists(adapter + "/adapter_config.json"), "'", o.source,
             "' is neither a run folder (with adapter/) nor an adapter folder");
  std::string base = o.model;
  if (base.empty()) {
    std::ifstream in(adapter + "/adapter_config.json");
    nlohmann::json config = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (config.is_object() && config.contains("base_model_name_or_path") &&
        config["base_model_name_or_path"].is_string()) {
      base = config["base_model_name_or_path"].get<std::string>();
    }
  }
  MOLE_CHECK(!base.empty() && fs::exists(base), "cannot find the base model of '", adapter,
             "' (base_model_name_or_path '", base, "'); pass --model DIR");
  std::unique_ptr<moe::CausalLM> model = ckpt::load_model(base, at::TensorOptions(at::kFloat));
  moe::AdapterSpec spec = ckpt::load_adapter(*model, adapter);
  const std::string format = o.format.empty() ? (spec.is_moe() ? "moe-peft" : "peft") : o.format;
  MOLE_CHECK(format == (spec.is_moe() ? "moe-peft" : "peft"), "--format ", format, " cannot hold a ",
             moe::method_name(spec.method), " adapter (use ", spec.is_moe() ? "moe-peft" : "peft", ")");
  ckpt::save_adapter(*model, spec, o.out, base);
}

}  // namespace mole::launch
