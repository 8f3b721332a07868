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
  std::vector<std::pair<std::string, int64_t>> rank_pattern;   // module pattern -> r
  std::vector<std::pair<std::string, double>> alpha_pattern;   // module pattern -> alpha
};

// Parses an adapter_config.json of peft_type LORA. Unsupported features (DoRA, trained biases,
// modules_to_save, fan_in_fan_out) and other peft types are mole::Errors naming the key.
PeftLoraConfig load_peft_config(const std::string& adapter_dir);

// Attaches the adapter in `adapter_dir` to `model`: every lora_A/lora_B pair becomes the
// LoRA of its linear, with scale alpha/r (rsLoRA: alpha/sqrt(r)). Keys that do not name a LoRA
// weight of a known linear, unpaired A/B, shapes that do not fit, and ranks that disagree with
// the config are errors naming the key. Returns the number of adapted linears.
int64_t load_peft_adapter(moe::CausalLM& model, const std::string& adapter_dir);

}  // namespace mole::ckpt
