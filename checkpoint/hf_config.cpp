// Hugging Face config.json -> ModelConfig (see hf_config.h).
#include "checkpoint/hf_config.h"

#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <nlohmann/json.hpp>

#include "kernels/check.h"

namespace mole::ckpt {
namespace {

using nlohmann::json;

// Typed access to a config object, with errors that name the file and the key.
class Fields {
 public:
  Fields(const json& object, std::string source) : object_(&object), source_(std::move(source)) {}

  bool has(const std::string& key) const {
    return object_->contains(key) && !object_->at(key).is_null();
  }

  int64_t integer(const std::string& key) const {
    MOLE_CHECK(has(key), source_, ": required field '", key, "' is missing");
    return optional_integer(key, 0);
  }
  int64_t optional_integer(const std::string& key, int64_t fallback) const {
    if (!has(key)) return fallback;
    const json& v = object_->at(key);
    MOLE_CHECK(v.is_number_integer(), source_, ": field '", key, "' must be an integer, got ",
               v.dump());
    return v.get<int64_t>();
  }
  double number(const std::string& key) const {
    MOLE_CHECK(has(key), source_, ": required field '", key, "' is missing");
    return optional_number(key, 0.0);
  }
  double optional_number(const std::string& key, double fallback) const {
    if (!has(key)) return fallback;
    const json& v = object_->at(key);
    MOLE_CHECK(v.is_number(), source_, ": field '", key, "' must be a number, got ", v.dump());
    return v.get<double>();
  }
  bool optional_bool(const std::string& key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& v = object_->at(key);
    MOLE_CHECK(v.is_boolean(), source_, ": field '", key, "' must be true or false, got ", v.dump());
    return v.get<bool>();
  }
  std::string optional_string(const std::string& key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const json& v = object_->at(key);
    MOLE_CHECK(v.is_string(), source_, ": field '", key, "' must be a string, got ", v.dump());
    return v.get<std::string>();
  }
  Fields object(const std::string& key) const {
    const json& v = object_->at(key);
    MOLE_CHECK(v.is_object(), source_, ": field '", key, "' must be an object, got ", v.dump());
    return Fields(v, source_ + " (" + key + ")");
  }
  const std::string& source() const { return source_; }

 private:
  const json* object_;
  std::string source_;
};

// rope_theta and scaling: transformers 5 writes `rope_parameters: {rope_theta, rope_type, ...}`,
// older checkpoints a top-level `rope_theta` and an optional `rope_scaling` object.
moe::RopeConfig parse_rope(const Fields& top) {
  moe::RopeConfig rope;
  rope.theta = top.optional_number("rope_theta", 10000.0);
  std::optional<Fields> params;
  if (top.has("rope_parameters")) params = top.object("rope_parameters");
  else if (top.has("rope_scaling")) params = top.object("rope_scaling");
  if (!params) return rope;
  rope.theta = params->optional_number("rope_theta", rope.theta);
  // Older configs spell the type "type".
  rope.type = params->optional_string("rope_type", params->optional_string("type", "default"));
  if (rope.type == "default") return rope;
  if (rope.type == "linear") {
    rope.factor = params->number("factor");
  } else if (rope.type == "llama3") {
    rope.factor = params->number("factor");
    rope.low_freq_factor = params->number("low_freq_factor");
    rope.high_freq_factor = params->number("high_freq_factor");
    rope.original_max_position_embeddings = params->integer("original_max_position_embeddings");
    MOLE_CHECK(rope.high_freq_factor > rope.low_freq_factor, params->source(),
               ": llama3 rope needs high_freq_factor > low_freq_factor, got ",
               rope.high_freq_factor, " and ", rope.low_freq_factor);
  } else {
    MOLE_FAIL(params->source(), ": rope type '", rope.type,
              "' is not supported (supported: default, linear, llama3)");
  }
  MOLE_CHECK(rope.factor > 0.0, params->source(), ": rope factor must be positive, got ",
             rope.factor);
  return rope;
}

}  // namespace

moe::ModelConfig parse_hf_config(const std::string& json_text, const std::string& source) {
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& e) {
    MOLE_FAIL(source, ": not valid JSON (", e.what(), ")");
  }
  MOLE_CHECK(root.is_object(), source, ": expected a JSON object");
  Fields f(root, source);

  moe::ModelConfig c;
  MOLE_CHECK(f.has("model_type"), source, ": required field 'model_type' is missing");
  c.model_type = f.optional_string("model_type", "");
  MOLE_CHECK(c.model_type == "llama" || c.model_type == "mistral" || c.model_type == "qwen2",
             source, ": model_type '", c.model_type,
             "' is not supported (supported: llama, mistral, qwen2)");
  c.vocab_size = f.integer("vocab_size");
  c.hidden_size = f.integer("hidden_size");
  c.intermediate_size = f.integer("intermediate_size");
  c.num_layers = f.integer("num_hidden_layers");
  c.num_heads = f.integer("num_attention_heads");
  c.num_kv_heads = f.optional_integer("num_key_value_heads", c.num_heads);
  MOLE_CHECK(c.num_heads > 0, source, ": num_attention_heads must be positive, got ", c.num_heads);
  c.head_dim = f.optional_integer("head_dim", c.hidden_size / c.num_heads);
  c.rms_norm_eps = f.number("rms_norm_eps");
  c.rope = parse_rope(f);
  c.tie_word_embeddings = f.optional_bool("tie_word_embeddings", false);
  c.hidden_act = f.optional_string("hidden_act", "silu");
  c.max_position_embeddings = f.optional_integer("max_position_embeddings", 4096);

  if (c.model_type == "llama") {
    c.qkv_bias = c.o_bias = f.optional_bool("attention_bias", false);
    c.mlp_bias = f.optional_bool("mlp_bias", false);
  } else if (c.model_type == "mistral") {
    if (f.has("sliding_window")) c.sliding_window = f.integer("sliding_window");
  } else {  // qwen2: bias on q, k, v only
    c.qkv_bias = true;
    MOLE_CHECK(!f.optional_bool("use_sliding_window", false), source,
               ": qwen2 with use_sliding_window=true is not supported");
  }
  try {
    c.validate();
  } catch (const Error& e) {
    MOLE_FAIL(source, ": ", e.what());
  }
  return c;
}

moe::ModelConfig load_hf_config(const std::string& path) {
  MOLE_CHECK(std::filesystem::exists(path), "model path '", path, "' does not exist");
  std::string file = path;
  if (std::filesystem::is_directory(path)) file = path + "/config.json";
  std::ifstream in(file);
  MOLE_CHECK(in.good(), "cannot open model config '", file, "'");
  std::string text(std::istreambuf_iterator<char>(in), {});
  return parse_hf_config(text, file);
}

}  // namespace mole::ckpt
