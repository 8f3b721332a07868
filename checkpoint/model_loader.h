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
// Every base tensor must also be finite (a NaN or inf in a frozen weight poisons every step).
// `weights`: where the frozen tensors go (null: whole tensors on every rank). A sharded base
// reads only its part of each tensor from the memory-mapped files, and only that part is checked.
std::unique_ptr<moe::CausalLM> load_model(const std::string& dir, const at::TensorOptions& options,
                                          std::shared_ptr<moe::BaseWeights> weights = nullptr);

// Throws naming `what` (the file and the tensor) when `t` holds a NaN or an infinity: how many,
// and the first flat index.
void check_finite(const at::Tensor& t, const std::string& what);

}  // namespace mole::ckpt
