// `mole export` (see export_command.h).
#include "launch/export_command.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

#include <spdlog/spdlog.h>

#include "checkpoint/adapter_export.h"
#include "checkpoint/hf_config.h"
#include "checkpoint/model_loader.h"
#include "checkpoint/moe_peft_adapter.h"
#include "checkpoint/safetensors_format.h"
#include "checkpoint/training_checkpoint.h"
#include "kernels/check.h"
#include "launch/checkpointing.h"
#include "launch/config.h"
#include "launch/data.h"
#include "launch/run_parts.h"
#include "moe/adapter.h"

namespace mole::launch {

namespace fs = std::filesystem;

namespace {

// The checkpoint `source` names: a checkpoint folder, or the latest of a checkpoint.dir or of a
// run's ckpt/. "" when it names none.
std::string checkpoint_in(const std::string& source) {
  if (fs::exists(source + "/manifest.pb")) return source;
  for (const std::string& dir : {source, source + "/ckpt"}) {
    if (fs::exists(dir + "/latest")) return ckpt::find_checkpoint(dir, "auto");
  }
  return "";
}

void check_format(const std::string& format, const moe::AdapterSpec& spec) {
  MOLE_CHECK(format.empty() || format == (spec.is_moe() ? "moe-peft" : "peft"), "--format ", format,
             " cannot hold a ", moe::method_name(spec.method), " adapter (use ",
             spec.is_moe() ? "moe-peft" : "peft", ")");
}

// The adapter of checkpoint `folder`: every trainable tensor gathered whole from the rank files
// (each piece's checksum verified), described by the run's configuration that the manifest
// records. A real base model is only looked up (its config.json gives the layer count); a
// synthetic one is drawn again from the seed, checked against the checkpoint's fingerprint and
// written to `<out>/base` (with its tokenizer), which the adapter then names as its base.
void export_checkpoint(const std::string& folder, const ExportOptions& o) {
  const ckpt::StoredCheckpoint stored(folder);
  const ckpt::pb::Manifest& m = stored.manifest();
  MOLE_CHECK(!m.config_yaml().empty(), "checkpoint '", folder,
             "' does not record its run's configuration (it was written by an older mole); resume it with "
             "`mole train` and export the run's adapter");
  Config c = parse_config(m.config_yaml(), folder + "/manifest.pb");
  // Such a run's adapter is described by the adapter it started from, not by the config.
  MOLE_CHECK(c.adapter.init_from.empty(), "checkpoint '", folder, "' is of a run that started from adapter.init_from '",
             c.adapter.init_from, "'; export from such a checkpoint is not supported: resume it with `mole train` "
             "(checkpoint.resume) and export the run's adapter");
  const bool synthetic = c.model.base.rfind("synthetic:", 0) == 0;
  std::unique_ptr<moe::CausalLM> synthetic_model;
  std::string tokenizer_spec;
  int64_t num_layers = 0;
  std::string base = o.model.empty() ? c.model.base : o.model;
  if (synthetic) {
    tokenizer_spec = c.data.tokenizer.empty() ? "byte" : c.data.tokenizer;
    const std::unique_ptr<Tokenizer> tokenizer = make_tokenizer(tokenizer_spec);
    // The same draw as the run's (build_run), from train.seed.
    synthetic_model = synthetic_base_model(c, tokenizer->vocab_size(), model_options(c).device(at::kCPU));
    MOLE_CHECK(base_fingerprint(*synthetic_model, c.train.seed) == m.base_fingerprint(), "checkpoint '",
               folder, "': its synthetic base model, drawn again from train.seed ", c.train.seed,
               ", does not match the fingerprint it records (tokenizer '", tokenizer_spec, "')");
    num_layers = synthetic_model->num_layers();
    if (!o.model.empty()) spdlog::warn("--model is not used: the checkpoint's base is synthetic (drawn from its seed)");
    base = o.out + "/base";
    MOLE_CHECK(o.overwrite || !fs::exists(base), "--out '", o.out, "' already holds base/ (where the synthetic base "
               "goes); choose another folder or pass --overwrite to replace it");
  } else {
    if (!o.model.empty() && o.model != m.base()) {
      spdlog::warn("checkpoint '{}' was trained on '{}'; the adapter is written for --model '{}' (it must be the same "
                   "model)", folder, m.base(), o.model);
    }
    MOLE_CHECK(fs::exists(base + "/config.json"), "cannot find the base model '", base, "' of checkpoint '",
               folder, "' (no config.json there); pass --model DIR");
    num_layers = ckpt::load_hf_config(base + "/config.json").num_layers;
  }
  const moe::AdapterSpec spec = adapter_spec(c, num_layers);
  check_format(o.format, spec);
  if (synthetic_model) {
    // The adapter the configuration describes, on the model it was trained on: its tensors must
    // be the checkpoint's, name for name and shape for shape.
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(c.train.seed);
    moe::attach_adapter(*synthetic_model, spec, gen);
    const std::vector<moe::TrainableTensor> expected = synthetic_model->trainable_tensors();
    MOLE_CHECK(static_cast<int>(expected.size()) == m.tensors_size(), "checkpoint '", folder, "' holds ",
               m.tensors_size(), " trainable tensors, but its configuration describes ", expected.size());
    for (size_t i = 0; i < expected.size(); ++i) {
      const ckpt::pb::TensorSpec& t = m.tensors(static_cast<int>(i));
      MOLE_CHECK(t.name() == expected[i].name &&
                     std::vector<int64_t>(t.shape().begin(), t.shape().end()) == expected[i].tensor.sizes().vec(),
                 "checkpoint '", folder, "' holds '", t.name(), "' ", st::shape_text({t.shape().begin(), t.shape().end()}),
                 " where its configuration describes '", expected[i].name, "' ",
                 st::shape_text(expected[i].tensor.sizes().vec()));
    }
  }
  std::vector<moe::NamedTensor> whole;
  for (const ckpt::pb::TensorSpec& t : m.tensors()) {
    const std::vector<int64_t> shape(t.shape().begin(), t.shape().end());
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    at::Tensor values = stored.read(t.name(), "param", 0, numel).reshape(shape);
    MOLE_CHECK(at::isfinite(values).all().item<bool>(), "checkpoint '", folder, "': trainable tensor '",
               t.name(), "' holds non-finite values; no adapter was written");
    whole.emplace_back(t.name(), std::move(values));
  }
  MOLE_CHECK(!whole.empty(), "checkpoint '", folder, "' holds no trainable tensors");
  // The base first: the adapter names it.
  if (synthetic) ckpt::save_hf_model(*synthetic_model, base, tokenizer_files(tokenizer_spec));
  ckpt::save_adapter(whole, spec, o.out, base);
  spdlog::info("exported the adapter of {} (step {}, {}) to {}", folder, m.step(), m.adapter(), o.out);
}

}  // namespace

void add_export_command(CLI::App& app, ExportOptions& o) {
  CLI::App* cmd = app.add_subcommand("export", "Write a run's adapter in PEFT or MoE-PEFT layout");
  cmd->add_option("source", o.source,
                  "run folder (runs/NAME), adapter folder, checkpoint folder (ckpt/step-N) or checkpoint.dir")
      ->required();
  cmd->add_option("--out", o.out, "output adapter folder")->required();
  cmd->add_option("--format", o.format, "peft (plain LoRA) or moe-peft (MoE methods)")
      ->check(CLI::IsMember({"peft", "moe-peft"}));
  cmd->add_option("--model", o.model,
                  "base model folder (default: the adapter's base_model_name_or_path, or the checkpoint's model.base)");
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
  if (!fs::exists(adapter + "/adapter_config.json")) {
    const std::string checkpoint = checkpoint_in(o.source);
    MOLE_CHECK(!checkpoint.empty(), "'", o.source,
               "' is neither a run folder (with adapter/ or ckpt/), an adapter folder nor a checkpoint");
    export_checkpoint(checkpoint, o);
    return;
  }
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
  check_format(o.format, spec);
  ckpt::save_adapter(*model, spec, o.out, base);
}

}  // namespace mole::launch
