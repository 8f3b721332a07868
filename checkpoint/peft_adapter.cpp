// PEFT LoRA adapter import (see peft_adapter.h).
#include "checkpoint/peft_adapter.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>

#include "checkpoint/json_file.h"
#include "checkpoint/model_loader.h"
#include "checkpoint/safetensors.h"
#include "kernels/check.h"

namespace mole::ckpt {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

bool is_unset(const json& root, const std::string& key) {
  if (!root.contains(key) || root[key].is_null()) return true;
  const json& v = root[key];
  return (v.is_boolean() && !v.get<bool>()) || (v.is_array() && v.empty()) ||
         (v.is_object() && v.empty());
}

// PEFT matches pattern keys against the module name as `(.*\.)?(pattern)$`.
bool pattern_matches(const std::string& pattern, const std::string& module) {
  return std::regex_match(module, std::regex("(.*\\.)?(" + pattern + ")"));
}

// PEFT's module-name match: a regex matches the whole name; a list entry matches the name or
// its tail after a dot.
bool name_listed(const std::vector<std::string>& names, bool regex, const std::string& module) {
  if (regex) return !names.empty() && std::regex_match(module, std::regex(names.front()));
  for (const std::string& n : names) {
    if (module == n || (module.size() > n.size() &&
                        module.compare(module.size() - n.size() - 1, n.size() + 1, "." + n) == 0)) {
      return true;
    }
  }
  return false;
}

// A string or a list of strings (PEFT allows both for module selections).
std::vector<std::string> names_field(const json& root, const std::string& key, bool& regex,
                                     const std::string& file) {
  regex = false;
  if (!root.contains(key) || root[key].is_null()) return {};
  if (root[key].is_string()) {
    regex = true;
    return {root[key].get<std::string>()};
  }
  return json_field<std::vector<std::string>>(root, key, {}, file);
}

struct ParsedKey {
  int64_t layer = -1;
  std::string linear;  // e.g. self_attn.q_proj
  char which = 0;      // 'A' or 'B'
};

// "base_model.model.model.layers.3.mlp.up_proj.lora_A.weight" (optionally with the adapter
// name, "lora_A.default.weight") -> {3, "mlp.up_proj", 'A'}.
bool parse_key(const std::string& key, ParsedKey& out) {
  static const std::regex pattern(
      R"(^(?:base_model\.model\.)?model\.layers\.(\d+)\.((?:self_attn|mlp)\.[a-z_]+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$)");
  std::smatch m;
  if (!std::regex_match(key, m, pattern)) return false;
  out.layer = std::stoll(m[1].str());
  out.linear = m[2].str();
  out.which = m[3].str()[0];
  return true;
}

}  // namespace

PeftLoraConfig load_peft_config(const std::string& adapter_dir) {
  const std::string file = adapter_dir + "/adapter_config.json";
  json root = read_json_file(file);
  MOLE_CHECK(root.is_object(), file, ": expected a JSON object");
  const std::string peft_type = json_field<std::string>(root, "peft_type", "", file);
  MOLE_CHECK(peft_type == "LORA", file, ": peft_type '", peft_type,
             "' is not a plain LoRA adapter (supported here: LORA)");
  MOLE_CHECK(!json_field<bool>(root, "use_dora", false, file), file,
             ": use_dora=true (DoRA) adapters are not supported yet");
  MOLE_CHECK(json_field<std::string>(root, "bias", "none", file) == "none", file, ": bias='",
             json_field<std::string>(root, "bias", "none", file), "' is not supported (only 'none')");
  MOLE_CHECK(!json_field<bool>(root, "fan_in_fan_out", false, file), file,
             ": fan_in_fan_out=true (Conv1D models) is not supported");
  MOLE_CHECK(is_unset(root, "modules_to_save"), file,
             ": modules_to_save is not supported (the adapter trains full modules)");

  PeftLoraConfig c;
  c.r = json_field<int64_t>(root, "r", 8, file);
  c.alpha = json_field<double>(root, "lora_alpha", 8.0, file);
  c.dropout = json_field<double>(root, "lora_dropout", 0.0, file);
  c.rslora = json_field<bool>(root, "use_rslora", false, file);
  MOLE_CHECK(c.r > 0, file, ": r must be positive, got ", c.r);
  c.target_modules = names_field(root, "target_modules", c.target_is_regex, file);
  if (c.target_is_regex && c.target_modules.front() == "all-linear") {
    c.target_modules.clear();
    for (const std::string& name : moe::linear_names()) c.target_modules.push_back(moe::short_name(name));
    c.target_is_regex = false;
  }
  MOLE_CHECK(!c.target_modules.empty(), file, ": target_modules is empty or missing");
  if (c.target_is_regex) {
    try {
      std::regex check(c.target_modules.front());
    } catch (const std::regex_error& e) {
      MOLE_FAIL(file, ": target_modules '", c.target_modules.front(), "' is not a valid regex (",
                e.what(), ")");
    }
  }
  c.exclude_modules = names_field(root, "exclude_modules", c.exclude_is_regex, file);
  if (root.contains("layers_to_transform") && root["layers_to_transform"].is_number_integer()) {
    c.layers_to_transform = {root["layers_to_transform"].get<int64_t>()};
  } else {
    c.layers_to_transform = json_field<std::vector<int64_t>>(root, "layers_to_transform", {}, file);
  }
  for (const auto& [key, value] : json_field<std::map<std::string, int64_t>>(root, "rank_pattern", {}, file)) {
    c.rank_pattern.emplace_back(key, value);
  }
  for (const auto& [key, value] : json_field<std::map<std::string, double>>(root, "alpha_pattern", {}, file)) {
    c.alpha_pattern.emplace_back(key, value);
  }
  return c;
}

bool peft_targets(const PeftLoraConfig& config, const std::string& module, int64_t layer) {
  if (!config.layers_to_transform.empty() &&
      std::find(config.layers_to_transform.begin(), config.layers_to_transform.end(), layer) ==
          config.layers_to_transform.end()) {
    return false;
  }
  if (name_listed(config.exclude_modules, config.exclude_is_regex, module)) return false;
  return name_listed(config.target_modules, config.target_is_regex, module);
}

int64_t load_peft_adapter(moe::CausalLM& model, const std::string& adapter_dir) {
  PeftLoraConfig config = load_peft_config(adapter_dir);
  const std::string weights_file = adapter_dir + "/adapter_model.safetensors";
  if (!fs::exists(weights_file)) {
    MOLE_CHECK(!fs::exists(adapter_dir + "/adapter_model.bin"), adapter_dir,
               ": only adapter_model.bin (a pickle) was found; convert it to safetensors "
               "(e.g. with safetensors.torch.save_file) and try again");
    MOLE_FAIL(adapter_dir, ": adapter_model.safetensors not found");
  }
  st::SafetensorsFile weights(weights_file);

  // Pair the A and B of each (layer, linear).
  std::map<std::pair<int64_t, std::string>, std::pair<std::string, std::string>> pairs;
  for (const std::string& key : weights.names()) {
    ParsedKey parsed;
    MOLE_CHECK(parse_key(key, parsed), weights_file, ": tensor '", key,
               "' is not a LoRA weight of a decoder-layer linear (expected e.g. "
               "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight')");
    MOLE_CHECK(parsed.layer < model.num_layers(), weights_file, ": tensor '", key,
               "' names layer ", parsed.layer, " but the model has ", model.num_layers());
    auto& slot = pairs[{parsed.layer, parsed.linear}];
    (parsed.which == 'A' ? slot.first : slot.second) = key;
  }

  // The weights must be exactly what the config targets.
  const std::string config_file = adapter_dir + "/adapter_config.json";
  std::vector<std::string> missing;
  std::set<std::string> matched_entries;
  for (int64_t layer = 0; layer < model.num_layers(); ++layer) {
    for (const std::string& linear : moe::linear_names()) {
      const std::string module = "model.layers." + std::to_string(layer) + "." + linear;
      const bool targeted = peft_targets(config, module, layer);
      const auto stored = pairs.find({layer, linear});
      if (targeted && stored == pairs.end()) missing.push_back(module);
      if (!targeted && stored != pairs.end()) {
        const auto& [a_key, b_key] = stored->second;
        MOLE_FAIL(weights_file, ": tensor '", a_key.empty() ? b_key : a_key, "' adapts ", module,
                  ", which ", config_file, " does not target (target_modules, exclude_modules, ",
                  "layers_to_transform)");
      }
      if (!config.target_is_regex) {
        for (const std::string& t : config.target_modules) {
          if (name_listed({t}, false, module)) matched_entries.insert(t);
        }
      }
    }
  }
  if (!config.target_is_regex) {
    for (const std::string& t : config.target_modules) {
      MOLE_CHECK(matched_entries.count(t), config_file, ": target_modules entry '", t,
                 "' names no linear mole adapts (", moe::target_names_text(), ")");
    }
  }
  if (!missing.empty()) {
    MOLE_FAIL(weights_file, ": no lora_A/lora_B for ", missing.size(), " module(s) that ",
              config_file, " targets, e.g. ", missing.front(),
              missing.size() > 1 ? " and " + missing.back() : std::string(),
              "; the adapter is incomplete");
  }

  at::NoGradGuard no_grad;
  for (const auto& [where, keys] : pairs) {
    const auto& [layer_index, linear_name] = where;
    const std::string module =
        "model.layers." + std::to_string(layer_index) + "." + linear_name;
    MOLE_CHECK(!keys.first.empty() && !keys.second.empty(), weights_file, ": ", module,
               " has only one of lora_A / lora_B");
    at::Tensor a = weights.tensor(keys.first);
    at::Tensor b = weights.tensor(keys.second);
    int64_t r = config.r;
    double alpha = config.alpha;
    for (const auto& [pattern, value] : config.rank_pattern) {
      if (pattern_matches(pattern, module)) r = value;
    }
    for (const auto& [pattern, value] : config.alpha_pattern) {
      if (pattern_matches(pattern, module)) alpha = value;
    }
    MOLE_CHECK(a.dim() == 2 && a.size(0) == r, weights_file, ": tensor '", keys.first,
               "' has shape ", a.sizes(), " but adapter_config.json implies rank ", r);
    MOLE_CHECK(b.dim() == 2 && b.size(1) == r, weights_file, ": tensor '", keys.second,
               "' has shape ", b.sizes(), " but adapter_config.json implies rank ", r);
    check_finite(a, "tensor '" + keys.first + "' in '" + weights_file + "'");
    check_finite(b, "tensor '" + keys.second + "' in '" + weights_file + "'");
    moe::LoraOptions options{r, alpha, config.rslora, config.dropout};
    model.layer(layer_index)
        .linear(linear_name)
        .set_lora(a, b, options.scale(), config.dropout, weights_file + ": " + module);
  }
  spdlog::info("loaded PEFT LoRA adapter from {}: {} linears, r={}, alpha={}{}", adapter_dir,
               pairs.size(), config.r, config.alpha, config.rslora ? ", rsLoRA" : "");
  return static_cast<int64_t>(pairs.size());
}

}  // namespace mole::ckpt
