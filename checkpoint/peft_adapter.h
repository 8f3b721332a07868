// Import of PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`).
#pragma once

#include <string>
#include <vector>

#include "moe/llama.h"

namespace mole::ckpt {

struct PeftLoraConfig {
  int64_t r = 8;
  double alpha = 8.0;
  double dropout = 0.0;
  bool rslora = false;
  std::vector<std::string> target_modules;  // short names (q_proj, ...) or one regex
  bool target_is_regex = false;
  std::vector<std::string> exclude_modules;  // names, or one regex
  bool exclude_is_regex = false;
  std::vector<int64_t> layers_to_transform;  // empty: every layer
  std::vector<std::pair<std::string, int64_t>> rank_pattern;   // module pattern -> r
  std::vector<std::pair<std::string, double>> alpha_pattern;   // module pattern -> alpha
};

// Parses an adapter_config.json of peft_type LORA. Unsupported features (DoRA, trained biases,
// modules_to_save, fan_in_fan_out) and other peft types are mole::Errors naming the key.
PeftLoraConfig load_peft_config(const std::string& adapter_dir);

// Whether the config's target_modules / exclude_modules / layers_to_transform select the linear
// `module` ("model.layers.3.self_attn.q_proj") of layer `layer`, as PEFT decides it.
bool peft_targets(const PeftLoraConfig& config, const std::string& module, int64_t layer);

// Attaches the adapter in `adapter_dir` to `model`: every lora_A/lora_B pair becomes the
// LoRA of its linear, with scale alpha/r (rsLoRA: alpha/sqrt(r)). The weights must be exactly
// what the config says: a pair for every linear it targets and none for another. Keys that do
// not name a LoRA weight of a known linear, unpaired A/B, missing or extra modules, shapes that
// do not fit, ranks that disagree with the config and non-finite values are errors naming the
// key. Returns the number of adapted linears.
int64_t load_peft_adapter(moe::CausalLM& model, const std::string& adapter_dir);

}  // namespace mole::ckpt
