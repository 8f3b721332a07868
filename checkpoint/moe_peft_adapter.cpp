// MoE-PEFT adapter import (see moe_peft_adapter.h).
#include "checkpoint/moe_peft_adapter.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "checkpoint/json_file.h"
#include "checkpoint/model_loader.h"
#include "checkpoint/peft_adapter.h"
#include "checkpoint/safetensors.h"
#include "kernels/check.h"
#include "moe/precision.h"

namespace mole::ckpt {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

json read_config(const std::string& adapter_dir) {
  const std::string file = adapter_dir + "/adapter_config.json";
  json root = read_json_file(file);
  MOLE_CHECK(root.is_object(), file, ": expected a JSON object");
  return root;
}

using Pair = std::pair<at::Tensor, at::Tensor>;  // lora_A, lora_B

// The tensors of an adapter file sorted into what they adapt.
struct Parsed {
  std::map<std::pair<int64_t, std::string>, Pair> plain;        // (layer, linear) -> A, B
  std::map<int64_t, at::Tensor> ffn_gate;                       // layer -> router [E, D]
  std::map<std::pair<int64_t, std::string>, at::Tensor> linear_gate;  // (layer, linear) -> [E, I]
  std::map<std::pair<int64_t, std::string>, std::map<int64_t, Pair>> experts;  // -> e -> A, B
};

bool is_integer(const std::string& s) {
  return !s.empty() && s.size() < 10 && std::all_of(s.begin(), s.end(), ::isdigit);
}

Parsed parse_weights(const st::SafetensorsFile& file, const std::string& prefix, int64_t num_layers) {
  Parsed parsed;
  for (const std::string& key : file.names()) {
    std::vector<std::string> parts;
    std::stringstream in(key);
    for (std::string part; std::getline(in, part, '.');) parts.push_back(part);
    const bool layered = parts.size() >= 6 && parts[0] == prefix && parts[1] == "layers" &&
                         is_integer(parts[2]) && (parts[3] == "self_attn" || parts[3] == "mlp") &&
                         parts.back() == "weight";
    MOLE_CHECK(layered, file.path(), ": tensor '", key, "' is not a ", prefix,
               " adapter weight (expected '", prefix, ".layers.N.{self_attn|mlp}...weight')");
    const int64_t layer = std::stoll(parts[2]);
    MOLE_CHECK(layer < num_layers, file.path(), ": tensor '", key, "' names layer ", layer,
               " but the model has ", num_layers);
    const std::string linear = parts[3] + "." + parts[4];
    at::Tensor t = file.tensor(key);
    check_finite(t, "tensor '" + key + "' in '" + file.path() + "'");
    const size_t n = parts.size();
    if (n == 6 && parts[4] == "moe_gate") {
      MOLE_CHECK(parts[3] == "mlp", file.path(), ": '", key, "': a block router belongs to mlp");
      parsed.ffn_gate[layer] = t;
    } else if (n == 7 && parts[5] == "moe_gate") {
      parsed.linear_gate[{layer, linear}] = t;
    } else if (n == 7 && (parts[5] == "lora_A" || parts[5] == "lora_B")) {
      Pair& p = parsed.plain[{layer, linear}];
      (parts[5] == "lora_A" ? p.first : p.second) = t;
    } else if (n == 9 && parts[5] == "experts" && is_integer(parts[6]) &&
               (parts[7] == "lora_A" || parts[7] == "lora_B")) {
      Pair& p = parsed.experts[{layer, linear}][std::stoll(parts[6])];
      (parts[7] == "lora_A" ? p.first : p.second) = t;
    } else {
      MOLE_FAIL(file.path(), ": tensor '", key, "' is not a known ", prefix, " key (moe_gate, ",
                "lora_A/lora_B, or experts.N.lora_A/lora_B)");
    }
  }
  return parsed;
}

// Stacks experts 0..E-1 of one projection into [E, r, I] / [E, O, r].
Pair stack_experts(const std::map<int64_t, Pair>& experts, int64_t num_experts, const std::string& what) {
  std::vector<at::Tensor> a, b;
  for (int64_t e = 0; e < num_experts; ++e) {
    auto it = experts.find(e);
    MOLE_CHECK(it != experts.end() && it->second.first.defined() && it->second.second.defined(),
               what, ": expert ", e, " lacks lora_A or lora_B (the router has ", num_experts,
               " experts)");
    a.push_back(it->second.first);
    b.push_back(it->second.second);
  }
  MOLE_CHECK(static_cast<int64_t>(experts.size()) == num_experts, what, ": ", experts.size(),
             " experts stored but the router has ", num_experts);
  for (int64_t e = 1; e < num_experts; ++e) {
    MOLE_CHECK(a[e].sizes() == a[0].sizes() && b[e].sizes() == b[0].sizes(), what, ": expert ", e,
               " has shapes ", a[e].sizes(), "/", b[e].sizes(), ", expert 0 has ", a[0].sizes(),
               "/", b[0].sizes());
  }
  return {at::stack(a), at::stack(b)};
}

// The rank the config gives must be the rank of the stored weights (it sets the scale).
void check_rank(const at::Tensor& a, const at::Tensor& b, int64_t r, bool stacked,
                const std::string& what, const std::string& config_key) {
  const int64_t a_rank = a.size(stacked ? 1 : 0), b_rank = b.size(stacked ? 2 : 1);
  MOLE_CHECK(a_rank == r && b_rank == r, what, ": lora_A ", a.sizes(), " / lora_B ", b.sizes(),
             " have rank ", a_rank, "/", b_rank, " but adapter_config.json gives ", config_key,
             " = ", r);
}

// adapter_config.json's num_experts: one count for every layer, a per-layer list, or absent
// (empty: the weights decide).
std::vector<int64_t> declared_experts(const json& root, int64_t num_layers, const std::string& file) {
  if (!root.contains("num_experts") || root["num_experts"].is_null()) return {};
  if (root["num_experts"].is_number_integer()) {
    const int64_t e = root["num_experts"].get<int64_t>();
    MOLE_CHECK(e >= 1, file, ": num_experts must be at least 1, got ", e);
    return std::vector<int64_t>(static_cast<size_t>(num_layers), e);
  }
  std::vector<int64_t> list = json_field<std::vector<int64_t>>(root, "num_experts", {}, file);
  MOLE_CHECK(static_cast<int64_t>(list.size()) == num_layers, file, ": num_experts lists ",
             list.size(), " per-layer counts but the model has ", num_layers, " layers");
  return list;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), ::tolower);
  return s;
}

// The adapter must be exactly what its config says: every target module of every layer adapted
// the way the method adapts it (plain LoRA, a per-linear router with experts, or MixLoRA's FFN
// block), nothing else, and every router with the declared number of experts.
void check_complete(moe::CausalLM& model, const moe::AdapterSpec& spec,
                    const std::vector<int64_t>& declared, const std::string& weights_path,
                    const std::string& config_file) {
  const std::string prefix = moe::method_name(spec.method);
  const auto listed = [](const std::vector<std::string>& list, const std::string& name) {
    return std::find(list.begin(), list.end(), name) != list.end();
  };
  moe::check_target_modules(spec.target_modules, spec.method, config_file + ": target_modules");
  const bool mixlora = spec.method == moe::Method::kMixLora;
  for (int64_t i = 0; i < model.num_layers(); ++i) {
    moe::DecoderLayer& layer = model.layer(i);
    const std::string where = prefix + ".layers." + std::to_string(i) + ".";
    const size_t li = static_cast<size_t>(i);
    if (mixlora) {
      MOLE_CHECK(layer.ffn_site != nullptr, weights_path, ": layer ", i,
                 " has no MoE block (", where, "mlp.moe_gate and its experts) although ",
                 config_file, " targets the FFN; the adapter is incomplete");
    }
    for (const std::string& name : moe::linear_names()) {
      const std::string target = moe::short_name(name);
      const bool in_mlp = name.rfind("mlp.", 0) == 0;
      if (mixlora && in_mlp) continue;
      const bool targeted = listed(spec.target_modules, target);
      const bool routed = targeted && !mixlora &&
                          (spec.routed_modules.empty() || listed(spec.routed_modules, target));
      const bool has_site = layer.linear_sites.count(name) > 0;
      const bool has_lora = layer.linear(name).has_lora();
      const std::string module = where + name;
      MOLE_CHECK(targeted || (!has_site && !has_lora), weights_path, ": holds weights for ", module,
                 ", which target_modules in ", config_file, " does not list");
      if (!targeted) continue;
      MOLE_CHECK(!routed || has_site, weights_path, ": no router and experts for ", module,
                 has_lora ? " (plain lora_A/lora_B found instead)" : "", ", which ", config_file,
                 " targets; the adapter is incomplete");
      MOLE_CHECK(routed || has_lora, weights_path, ": no lora_A/lora_B for ", module,
                 has_site ? " (a router found instead)" : "", ", which ", config_file,
                 " targets; the adapter is incomplete");
    }
    if (declared.empty()) continue;
    if (layer.ffn_site) {
      MOLE_CHECK(layer.ffn_site->num_experts() == declared[li], weights_path, ": ", where,
                 "mlp has ", layer.ffn_site->num_experts(), " experts but ", config_file,
                 " declares num_experts = ", declared[li]);
    }
    for (const auto& [name, site] : layer.linear_sites) {
      MOLE_CHECK(site->num_experts() == declared[li], weights_path, ": ", where, name, " has ",
                 site->num_experts(), " experts but ", config_file, " declares num_experts = ",
                 declared[li]);
    }
  }
}

}  // namespace

std::string adapter_peft_type(const std::string& adapter_dir) {
  return json_field<std::string>(read_config(adapter_dir), "peft_type", "",
                          adapter_dir + "/adapter_config.json");
}

moe::AdapterSpec load_moe_peft_config(const std::string& adapter_dir) {
  const std::string file = adapter_dir + "/adapter_config.json";
  json root = read_config(adapter_dir);
  const std::string peft_type = json_field<std::string>(root, "peft_type", "", file);
  moe::AdapterSpec spec;
  if (peft_type == "MIXLORA") spec.method = moe::Method::kMixLora;
  else if (peft_type == "MOLA") spec.method = moe::Method::kMola;
  else if (peft_type == "DYNMOLE") spec.method = moe::Method::kDynMole;
  else if (peft_type == "LORAMOE") spec.method = moe::Method::kLoraMoe;
  else if (peft_type == "MOELORA") spec.method = moe::Method::kMoeLora;
  else MOLE_FAIL(file, ": peft_type '", peft_type, "' is not a MoE-PEFT adapter (MIXLORA, MOLA, DYNMOLE, LORAMOE, or mole's MOELORA)");

  MOLE_CHECK(!json_field<bool>(root, "use_dora", false, file), file, ": DoRA experts are not supported");
  MOLE_CHECK(json_field<std::string>(root, "bias", "none", file) == "none", file,
             ": bias must be 'none'");
  spec.lora.r = json_field<int64_t>(root, "r", 8, file);
  spec.lora.alpha = json_field<double>(root, "lora_alpha", 16.0, file);
  spec.lora.dropout = json_field<double>(root, "lora_dropout", 0.0, file);
  spec.lora.rslora = json_field<bool>(root, "use_rslora", false, file);
  spec.expert_lora = spec.lora;
  if (root.contains("expert_lora") && root["expert_lora"].is_object()) {
    const json& e = root["expert_lora"];
    spec.expert_lora.r = json_field<int64_t>(e, "r", spec.lora.r, file);
    spec.expert_lora.alpha = json_field<double>(e, "lora_alpha", spec.lora.alpha, file);
    spec.expert_lora.dropout = json_field<double>(e, "lora_dropout", spec.lora.dropout, file);
  }
  spec.target_modules = json_field<std::vector<std::string>>(root, "target_modules", spec.target_modules, file);
  const std::string act = json_field<std::string>(root, "act_fn", "silu", file);
  MOLE_CHECK(act == "silu", file, ": act_fn '", act, "' is not supported (only silu)");
  spec.router_init_range = json_field<double>(root, "router_init_range", 0.02, file);
  spec.aux.load_balance_coef = json_field<double>(root, "router_aux_loss_coef", 0.001, file);
  spec.router.jitter_noise = json_field<double>(root, "jitter_noise", 0.0, file);

  const std::string strategy = lower(json_field<std::string>(root, "routing_strategy", "", file));
  switch (spec.method) {
    case moe::Method::kMixLora:
      if (strategy == "mixlora" || strategy.empty()) {
        spec.router.strategy = moe::RoutingStrategy::kTopK;
        spec.router.top_k = json_field<int64_t>(root, "top_k", 2, file);
      } else if (strategy == "mixlora-dynamic") {
        spec.router.strategy = moe::RoutingStrategy::kTopP;
        spec.router.top_p = json_field<double>(root, "top_p", 0.8, file);
        MOLE_CHECK(json_field<double>(root, "temperature", 0.0, file) == 0.0, file,
                   ": mixlora-dynamic with temperature > 0 is not supported");
      } else if (!(strategy == "mixlora-switch" && root.contains("mole_router"))) {
        MOLE_FAIL(file, ": routing_strategy '", strategy, "' is not supported for import (",
                  "supported: mixlora, mixlora-dynamic; mixlora-switch uses a per-sequence ",
                  "expert_capacity that mole's switch router does not model)");
      }
      break;
    case moe::Method::kMoeLora:
    case moe::Method::kMola:
      spec.router.top_k = json_field<int64_t>(root, "top_k", 2, file);
      spec.aux.load_balance_coef = json_field<bool>(root, "router_loss", false, file)
                                       ? spec.aux.load_balance_coef : 0.0;
      break;
    case moe::Method::kDynMole:
      spec.router.strategy = moe::RoutingStrategy::kDynMole;
      spec.router.top_p = json_field<double>(root, "top_p", 0.75, file);
      spec.router.keep_top_k = json_field<int64_t>(root, "keep_top_k", 2, file);
      spec.router.entropy_threshold = json_field<double>(root, "entropy_threshold", 0.9, file);
      spec.router.entropy_q = json_field<double>(root, "entropy_index", 1.1, file);
      spec.aux.entropy_coef = json_field<double>(root, "router_dyn_loss_coef", 0.01, file);
      break;
    case moe::Method::kLoraMoe:
      spec.router.strategy = moe::RoutingStrategy::kDense;
      spec.routed_modules.clear();
      for (const std::string& t : spec.target_modules) {
        if (t == "gate_proj" || t == "up_proj" || t == "down_proj") spec.routed_modules.push_back(t);
      }
      spec.aux.load_balance_coef = 0.0;
      break;
    default:
      break;
  }
  // Written by mole's own export: the exact router settings, which MoE-PEFT has no field for.
  if (root.contains("mole_router") && root["mole_router"].is_object()) {
    const json& r = root["mole_router"];
    spec.router.strategy = moe::parse_routing_strategy(json_field<std::string>(r, "strategy", "topk", file));
    spec.router.top_k = json_field<int64_t>(r, "top_k", spec.router.top_k, file);
    spec.router.top_p = json_field<double>(r, "top_p", spec.router.top_p, file);
    spec.router.jitter_noise = json_field<double>(r, "jitter_noise", spec.router.jitter_noise, file);
    spec.router.capacity_factor = json_field<double>(r, "capacity_factor", spec.router.capacity_factor, file);
    spec.router.entropy_q = json_field<double>(r, "entropy_q", spec.router.entropy_q, file);
    spec.router.entropy_threshold = json_field<double>(r, "entropy_threshold", spec.router.entropy_threshold, file);
    spec.router.keep_top_k = json_field<int64_t>(r, "keep_top_k", spec.router.keep_top_k, file);
  }
  return spec;
}

moe::AdapterSpec load_moe_peft_adapter(moe::CausalLM& model, const std::string& adapter_dir) {
  moe::AdapterSpec spec = load_moe_peft_config(adapter_dir);
  const std::string weights_path = adapter_dir + "/adapter_model.safetensors";
  if (!fs::exists(weights_path)) {
    MOLE_CHECK(!fs::exists(adapter_dir + "/adapter_model.bin"), adapter_dir,
               ": only adapter_model.bin (a torch pickle) was found; mole reads safetensors only. "
               "Convert it, e.g. in Python: safetensors.torch.save_file(torch.load('adapter_model.bin'), "
               "'adapter_model.safetensors')");
    MOLE_FAIL(adapter_dir, ": adapter_model.safetensors not found");
  }
  st::SafetensorsFile file(weights_path);
  const std::string prefix = moe::method_name(spec.method);
  Parsed parsed = parse_weights(file, prefix, model.num_layers());
  // Adapter dtype (float32, or float64 for a float64 model) on the model's device.
  const at::TensorOptions device =
      model.options().dtype(moe::adapter_dtype(model.options().dtype().toScalarType()));
  spec.experts_per_layer.assign(static_cast<size_t>(model.num_layers()), 0);
  const std::string config_file = adapter_dir + "/adapter_config.json";
  const json root = read_config(adapter_dir);
  const std::string expert_r_key =
      root.contains("expert_lora") && root["expert_lora"].is_object() &&
              root["expert_lora"].contains("r")
          ? "expert_lora.r"
          : "r";
  const std::vector<int64_t> declared = declared_experts(root, model.num_layers(), config_file);

  at::NoGradGuard no_grad;
  for (const auto& [where, pair] : parsed.plain) {
    const auto& [layer, linear] = where;
    const std::string what = weights_path + ": " + prefix + ".layers." + std::to_string(layer) + "." + linear;
    MOLE_CHECK(pair.first.defined() && pair.second.defined(), what, " has only one of lora_A / lora_B");
    MOLE_CHECK(!(spec.method == moe::Method::kMixLora && linear.rfind("mlp.", 0) == 0), what,
               ": a MixLoRA adapter carries FFN LoRA in its experts, not as plain LoRA");
    check_rank(pair.first, pair.second, spec.lora.r, false, what, "r");
    model.layer(layer).linear(linear).set_lora(pair.first, pair.second, spec.lora.scale(),
                                               spec.lora.dropout, what);
  }
  for (const auto& [layer, gate] : parsed.ffn_gate) {
    MOLE_CHECK(spec.method == moe::Method::kMixLora, weights_path, ": layer ", layer,
               " has a block router (mlp.moe_gate) but peft_type is not MIXLORA");
    moe::DecoderLayer& l = model.layer(layer);
    const std::string site = "layers." + std::to_string(layer) + ".mlp";
    const int64_t D = l.gate_proj.in_features(), F = l.gate_proj.out_features();
    MOLE_CHECK(gate.dim() == 2 && gate.size(1) == D, weights_path, ": ", prefix, ".", site,
               ".moe_gate.weight must be [E, ", D, "], got ", gate.sizes());
    const int64_t E = gate.size(0);
    auto expert_lora = [&](const std::string& proj, int64_t in, int64_t out) {
      const std::string what = weights_path + ": " + prefix + "." + site + "." + proj;
      auto it = parsed.experts.find({layer, "mlp." + proj});
      MOLE_CHECK(it != parsed.experts.end(), what, ": no expert weights (MixLoRA experts need ",
                 "gate_proj, up_proj and down_proj)");
      Pair stacked = stack_experts(it->second, E, what);
      parsed.experts.erase(it);
      check_rank(stacked.first, stacked.second, spec.expert_lora.r, true, what, expert_r_key);
      return moe::ExpertLora::from(stacked.first, stacked.second, in, out,
                                   moe::LoraOptions{spec.expert_lora.r, spec.expert_lora.alpha,
                                                    spec.expert_lora.rslora, 0.0}.scale(),
                                   spec.expert_lora.dropout, device, what);
    };
    moe::ExpertLora g = expert_lora("gate_proj", D, F), u = expert_lora("up_proj", D, F),
                    d = expert_lora("down_proj", F, D);
    l.ffn_site = std::make_unique<moe::FfnMoeSite>(site, gate.to(device).clone().requires_grad_(true),
                                                   std::move(g), std::move(u), std::move(d), spec.router);
    spec.experts_per_layer[static_cast<size_t>(layer)] = E;
  }
  for (const auto& [where, gate] : parsed.linear_gate) {
    const auto& [layer, linear] = where;
    const std::string site = "layers." + std::to_string(layer) + "." + linear;
    const std::string what = weights_path + ": " + prefix + "." + site;
    MOLE_CHECK(spec.method != moe::Method::kMixLora, what, ": per-linear routers are not MixLoRA");
    moe::LoraLinear& lin = model.layer(layer).linear(linear);
    MOLE_CHECK(gate.dim() == 2 && gate.size(1) == lin.in_features(), what,
               ".moe_gate.weight must be [E, ", lin.in_features(), "], got ", gate.sizes());
    const int64_t E = gate.size(0);
    auto it = parsed.experts.find(where);
    MOLE_CHECK(it != parsed.experts.end(), what, ": router without expert weights");
    Pair stacked = stack_experts(it->second, E, what);
    parsed.experts.erase(it);
    check_rank(stacked.first, stacked.second, spec.expert_lora.r, true, what, expert_r_key);
    moe::ExpertLora experts = moe::ExpertLora::from(
        stacked.first, stacked.second, lin.in_features(), lin.out_features(),
        moe::LoraOptions{spec.expert_lora.r, spec.expert_lora.alpha, spec.expert_lora.rslora, 0.0}.scale(),
        spec.expert_lora.dropout, device, what);
    model.layer(layer).linear_sites[linear] = std::make_unique<moe::LinearMoeSite>(
        site, gate.to(device).clone().requires_grad_(true), std::move(experts), spec.router);
    int64_t& count = spec.experts_per_layer[static_cast<size_t>(layer)];
    count = std::max(count, E);
  }
  MOLE_CHECK(parsed.experts.empty(), weights_path, ": experts of ", prefix, ".layers.",
             parsed.experts.begin()->first.first, ".", parsed.experts.begin()->first.second,
             " have no router (moe_gate)");
  check_complete(model, spec, declared, weights_path, config_file);
  for (int64_t& e : spec.experts_per_layer) e = std::max<int64_t>(e, 1);
  spdlog::info("loaded {} adapter from {}: {} plain LoRA linears, {} block sites, {} linear sites",
               prefix, adapter_dir, parsed.plain.size(), parsed.ffn_gate.size(),
               parsed.linear_gate.size());
  return spec;
}

moe::AdapterSpec load_adapter(moe::CausalLM& model, const std::string& adapter_dir) {
  const std::string peft_type = adapter_peft_type(adapter_dir);
  if (peft_type == "LORA") {
    PeftLoraConfig c = load_peft_config(adapter_dir);
    load_peft_adapter(model, adapter_dir);
    moe::AdapterSpec spec;
    spec.lora = {c.r, c.alpha, c.rslora, c.dropout};
    if (!c.target_is_regex) spec.target_modules = c.target_modules;
    return spec;
  }
  return load_moe_peft_adapter(model, adapter_dir);
}

}  // namespace mole::ckpt
