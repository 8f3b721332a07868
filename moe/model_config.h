// The architecture of a LLaMA-family decoder (LLaMA 2/3, Mistral, Qwen2) as the model code
// needs it. checkpoint/hf_config.* fills it from a Hugging Face config.json.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace mole::moe {

struct RopeConfig {
  std::string type = "default";  // default | linear | llama3
  double theta = 10000.0;
  double factor = 1.0;           // linear, llama3
  double low_freq_factor = 1.0;  // llama3
  double high_freq_factor = 4.0;  // llama3
  int64_t original_max_position_embeddings = 8192;  // llama3
};

struct ModelConfig {
  std::string model_type = "llama";  // llama | mistral | qwen2
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool qkv_bias = false;  // bias on q, k, v projections
  bool o_bias = false;    // bias on the attention output projection
  bool mlp_bias = false;
  bool tie_word_embeddings = false;
  std::string hidden_act = "silu";
  int64_t max_position_embeddings = 4096;
  std::optional<int64_t> sliding_window;  // Mistral-style local attention window

  // Throws mole::Error naming the offending numbers when the shape is inconsistent.
  void validate() const;
};

}  // namespace mole::moe
