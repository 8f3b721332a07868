// Model presets (see model_presets.h).
#include "moe/model_presets.h"

#include "kernels/check.h"

namespace mole::moe {
namespace {

ModelConfig llama(int64_t vocab, int64_t hidden, int64_t intermediate, int64_t layers,
                  int64_t heads, int64_t kv_heads, double rope_theta, int64_t max_positions) {
  ModelConfig c;
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.intermediate_size = intermediate;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = hidden / heads;
  c.rms_norm_eps = 1e-5;
  c.rope.theta = rope_theta;
  c.max_position_embeddings = max_positions;
  return c;
}

}  // namespace

ModelConfig tiny_model_config(int64_t vocab) {
  ModelConfig c = llama(vocab, 128, 344, 4, 4, 2, 10000.0, 1024);
  c.head_dim = 32;
  return c;
}

const std::vector<std::string>& model_preset_names() {
  static const std::vector<std::string> names = {"tiny", "tiny-llama3", "tinyllama",   "llama-2-7b", "llama-3-8b",
                                                 "llama-2-70b", "llama-3-70b", "mistral-7b", "qwen2-7b"};
  return names;
}

ModelConfig model_preset(const std::string& name) {
  if (name == "tiny") return tiny_model_config(256);
  if (name == "tiny-llama3") {
    // LLaMA-3's vocabulary, grouped-query attention (4 query heads per KV head) and RoPE base, at
    // a size a CPU trains: for runs with the real LLaMA-3 tokenizer.
    ModelConfig c = llama(128256, 128, 448, 2, 4, 1, 500000.0, 8192);
    c.head_dim = 32;
    return c;
  }
  if (name == "tinyllama") return llama(32000, 2048, 5632, 22, 32, 4, 10000.0, 2048);
  if (name == "llama-2-7b") return llama(32000, 4096, 11008, 32, 32, 32, 10000.0, 4096);
  if (name == "llama-3-8b") return llama(128256, 4096, 14336, 32, 32, 8, 500000.0, 8192);
  if (name == "llama-2-70b") return llama(32000, 8192, 28672, 80, 64, 8, 10000.0, 4096);
  if (name == "llama-3-70b") return llama(128256, 8192, 28672, 80, 64, 8, 500000.0, 8192);
  if (name == "mistral-7b") {
    // Mistral-7B-v0.3 (no sliding window since v0.2).
    ModelConfig c = llama(32768, 4096, 14336, 32, 32, 8, 1000000.0, 32768);
    c.model_type = "mistral";
    return c;
  }
  if (name == "qwen2-7b") {
    ModelConfig c = llama(152064, 3584, 18944, 28, 28, 4, 1000000.0, 32768);
    c.model_type = "qwen2";
    c.rms_norm_eps = 1e-6;
    c.qkv_bias = true;
    return c;
  }
  std::string known;
  for (const std::string& n : model_preset_names()) known += (known.empty() ? "" : ", ") + n;
  MOLE_FAIL("unknown model shape '", name, "' (known: ", known, ")");
}

int64_t matmul_parameters(const ModelConfig& c) {
  const int64_t d = c.hidden_size;
  const int64_t q = c.num_heads * c.head_dim;
  const int64_t kv = c.num_kv_heads * c.head_dim;
  const int64_t attention = d * q + 2 * d * kv + q * d;
  const int64_t mlp = 3 * d * c.intermediate_size;
  return c.num_layers * (attention + mlp) + d * c.vocab_size;
}

}  // namespace mole::moe
