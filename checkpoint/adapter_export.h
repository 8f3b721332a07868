// Adapters out: PEFT layout for plain LoRA, MoE-PEFT layout for the MoE-LoRA methods
// (adapter_config.json + adapter_model.safetensors), so that Python users can load them and
// `mole forward --adapter` reproduces the model that wrote them.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "moe/adapter.h"
#include "moe/llama.h"

namespace mole::ckpt {

// Writes the adapter described by `spec` into `dir` (created if missing) from `tensors`: every
// trainable tensor of the model, whole (all experts of every site), named and shaped as
// CausalLM::trainable_parameters() names them. Plain LoRA goes to PEFT's layout; mixlora / mola /
// dynmole / loramoe to MoE-PEFT's (peft_type MIXLORA, MOLA, DYNMOLE, LORAMOE) and moelora to the
// same layout with peft_type MOELORA. Router settings MoE-PEFT has no field for are kept under
// "mole_router" so that a reload is exact. `base_model` is recorded as base_model_name_or_path.
void save_adapter(const std::vector<moe::NamedTensor>& tensors, const moe::AdapterSpec& spec,
                  const std::string& dir, const std::string& base_model);
// The same for a model that holds its whole adapter (one process, no expert sharding).
void save_adapter(const moe::CausalLM& model, const moe::AdapterSpec& spec, const std::string& dir,
                  const std::string& base_model);

// Writes `model`'s frozen weights and a transformers-readable config.json (model_type llama)
// into `dir`, with `extra_files` (name -> bytes, e.g. the tokenizer's): a Hugging Face folder
// that `load_model` and transformers can read. All files land together or none does.
void save_hf_model(moe::CausalLM& model, const std::string& dir,
                   const std::map<std::string, std::string>& extra_files = {});
// The same with `tensors`: `model`'s frozen tensors by name, whole (e.g. gathered from a sharded
// base), in place of the model's own handles.
void save_hf_model(const moe::CausalLM& model, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                   const std::string& dir, const std::map<std::string, std::string>& extra_files = {});

}  // namespace mole::ckpt
