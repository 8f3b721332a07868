// Import of MoE-PEFT adapters (the layout of TUDB-Labs' MixLoRA / MoE-PEFT): peft_type MIXLORA,
// MOLA, DYNMOLE or LORAMOE, adapter_config.json + adapter_model.safetensors with keys such as
// `mixlora.layers.0.mlp.moe_gate.weight`, `mixlora.layers.0.mlp.up_proj.experts.3.lora_A.weight`,
// `mola.layers.0.self_attn.q_proj.moe_gate.weight`, `mixlora.layers.0.self_attn.q_proj.lora_B.weight`.
#pragma once

#include <string>

#include "moe/adapter.h"
#include "moe/llama.h"

namespace mole::ckpt {

// The adapter's peft_type from its adapter_config.json ("LORA", "MIXLORA", ...).
std::string adapter_peft_type(const std::string& adapter_dir);

// Reads adapter_config.json of a MoE-PEFT adapter into an AdapterSpec (experts_per_layer left
// empty: the weights decide it). Unsupported settings are errors naming the key.
moe::AdapterSpec load_moe_peft_config(const std::string& adapter_dir);

// Attaches a MoE-PEFT adapter to `model` and returns its description. Every tensor must be a
// known key of a layer the model has; routers and expert stacks must be complete and agree in
// shape with the model and the config. Errors name the key and the file.
moe::AdapterSpec load_moe_peft_adapter(moe::CausalLM& model, const std::string& adapter_dir);

// PEFT LoRA or MoE-PEFT, by peft_type. Returns the adapter's description.
moe::AdapterSpec load_adapter(moe::CausalLM& model, const std::string& adapter_dir);

}  // namespace mole::ckpt
