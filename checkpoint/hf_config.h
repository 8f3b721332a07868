// Reads a Hugging Face `config.json` (model types llama, mistral, qwen2) into a ModelConfig.
#pragma once

#include <string>

#include "moe/model_config.h"

namespace mole::ckpt {

// `path` is a config.json file or a model folder containing one. Unknown model types, missing
// required fields, wrong JSON types and unsupported features are mole::Errors naming the file
// and the key.
moe::ModelConfig load_hf_config(const std::string& path);
// Same, from JSON text; `source` names it in messages.
moe::ModelConfig parse_hf_config(const std::string& json_text, const std::string& source);

}  // namespace mole::ckpt
