// Named architectures for random-initialised bases: the built-in tiny model of the demo and the
// real shapes of models people fine-tune (benchmarks run at these shapes without a download).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moe/model_config.h"

namespace mole::moe {

// The built-in synthetic base: a small LLaMA-architecture model with `vocab` entries.
ModelConfig tiny_model_config(int64_t vocab);

// "tiny" (tiny_model_config(256)), "tiny-llama3" (LLaMA-3's vocabulary, GQA and RoPE base at
// hidden size 128, 2 layers), "tinyllama" (TinyLlama-1.1B), "llama-2-7b", "llama-3-8b",
// "llama-2-70b", "llama-3-70b", "mistral-7b" (v0.3), "qwen2-7b": the shapes of their Hugging Face
// config.json files. Throws mole::Error naming the known presets for any other name.
ModelConfig model_preset(const std::string& name);
const std::vector<std::string>& model_preset_names();

// Parameters of the matrix products of one token's forward pass (every linear layer of every
// decoder layer and the LM head; not the embedding lookup): the P of the 2P FLOPs per token.
int64_t matmul_parameters(const ModelConfig& config);

}  // namespace mole::moe
