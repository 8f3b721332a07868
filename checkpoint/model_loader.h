// Builds a CausalLM from a Hugging Face model folder (config.json + safetensors).
#pragma once

#include <ATen/core/TensorBody.h>

#include <memory>
#include <string>

#include "moe/llama.h"

namespace mole::ckpt {

// Loads `dir` into a model with `options` (dtype, device). Every base tensor must be present
// with the shape the config implies; a missing or misshapen tensor is an error naming it and
// the folder. Tensors the model does not use are reported in a warning.
std::unique_ptr<moe::CausalLM> load_model(const std::string& dir, const at::TensorOptions& options);

}  // namespace mole::ckpt
