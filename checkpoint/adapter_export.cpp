// Adapter and model export (see adapter_export.h).
#include "checkpoint/adapter_export.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>

#include "checkpoint/atomic_file.h"
#include "checkpoint/json_file.h"
#include "checkpoint/safetensors.h"
#include "kernels/check.h"

namespace mole::ckpt {
namespace {

using nlohmann::json;

const char* peft_type(moe::Method method) {
  switch (method) {
    case moe::Method::kMixLora: return "MIXLORA";
    case moe::Method::kMola: return "MOLA";
    case moe::Method::kDynMole: return "DYNMOLE";
    case moe::Method::kMoeLora: return "MOELORA";
    case moe::Method::kLoraMoe: return "LORAMOE";
    default: return "LORA";
  }
}

json router_json(const moe::RouterOptions& r) {
  return {{"strategy", moe::routing_strategy_name(r.strategy)}, {"top_k", r.top_k},
          {"top_p", r.top_p}, {"jitter_noise", r.jitter_noise},
          {"capacity_factor", r.capacity_factor}, {"entropy_q", r.entropy_q},
          {"entropy_threshold", r.entropy_threshold}, {"keep_top_k", r.keep_top_k}};
}

// MoE-PEFT's name of a whole trainable tensor: `model.layers.0.X` -> `<method>.layers.0.X`; an
// expert stack [E, ...] becomes one tensor per expert, `....experts.<e>.lora_A.weight`.
void add_moe_peft(std::vector<std::pair<std::string, at::Tensor>>& out, const std::string& method,
                  const std::string& name, const at::Tensor& t) {
  static const std::string kModel = "model.";
  MOLE_CHECK(name.rfind(kModel, 0) == 0, "save_adapter: unexpected tensor name '", name, "'");
  const std::string path = method + "." + name.substr(kModel.size());
  for (const char* ab : {"lora_A", "lora_B"}) {
    const std::string stack = std::string(".experts.") + ab;
    if (path.size() > stack.size() && path.compare(path.size() - stack.size(), stack.size(), stack) == 0) {
      const std::string prefix = path.substr(0, path.size() - stack.size());
      for (int64_t e = 0; e < t.size(0); ++e) {
        out.emplace_back(prefix + ".experts." + std::to_string(e) + "." + ab + ".weight",
                         t[e].detach().contiguous());
      }
      return;
    }
  }
  out.emplace_back(path, t.detach().contiguous());
}

}  // namespace

void save_adapter(const std::vector<moe::NamedTensor>& whole, const moe::AdapterSpec& spec,
                  const std::string& dir, const std::string& base_model) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  json config = {{"peft_type", peft_type(spec.method)}, {"task_type", "CAUSAL_LM"},
                 {"base_model_name_or_path", base_model}, {"bias", "none"},
                 {"r", spec.lora.r}, {"lora_alpha", spec.lora.alpha},
                 {"lora_dropout", spec.lora.dropout}, {"use_rslora", spec.lora.rslora},
                 {"use_dora", false}, {"target_modules", spec.target_modules}};
  if (spec.method == moe::Method::kLora) {
    config.update({{"fan_in_fan_out", false}, {"inference_mode", true},
                   {"modules_to_save", nullptr}, {"init_lora_weights", true}});
    for (const auto& [name, t] : whole) {
      tensors.emplace_back("base_model.model." + name, t.detach().contiguous());
    }
  } else {
    const std::string prefix = moe::method_name(spec.method);
    const bool uniform = std::all_of(spec.experts_per_layer.begin(), spec.experts_per_layer.end(),
                                     [&](int64_t e) { return e == spec.experts_per_layer.front(); });
    config["num_experts"] = uniform ? json(spec.experts_per_layer.front()) : json(spec.experts_per_layer);
    config["act_fn"] = "silu";
    config["router_init_range"] = spec.router_init_range;
    config["router_aux_loss_coef"] = spec.aux.load_balance_coef;
    config["jitter_noise"] = spec.router.jitter_noise;
    config["mole_router"] = router_json(spec.router);
    config["expert_lora"] = {{"r", spec.expert_lora.r}, {"lora_alpha", spec.expert_lora.alpha},
                             {"lora_dropout", spec.expert_lora.dropout}};
    switch (spec.method) {
      case moe::Method::kMixLora:
        if (spec.router.strategy == moe::RoutingStrategy::kTopP) {
          config.update({{"routing_strategy", "mixlora-dynamic"}, {"top_p", spec.router.top_p},
                         {"temperature", 0.0}});
        } else if (spec.router.strategy == moe::RoutingStrategy::kSwitch) {
          config["routing_strategy"] = "mixlora-switch";
        } else {
          config.update({{"routing_strategy", "mixlora"}, {"top_k", spec.router.top_k}});
        }
        break;
      case moe::Method::kDynMole:
        config.update({{"routing_strategy", "dynmole"}, {"top_p", spec.router.top_p},
                       {"keep_top_k", spec.router.keep_top_k},
                       {"entropy_threshold", spec.router.entropy_threshold},
                       {"entropy_index", spec.router.entropy_q},
                       {"router_dyn_loss_coef", spec.aux.entropy_coef}});
        break;
      default:
        config.update({{"routing_strategy", prefix}, {"top_k", spec.router.top_k}});
        break;
    }
    for (const auto& [name, t] : whole) add_moe_peft(tensors, prefix, name, t);
  }
  MOLE_CHECK(!tensors.empty(), "save_adapter: the model carries no adapter weights");
  write_files_atomic(dir, [&](const std::string& out) {
    st::save_file(out + "/adapter_model.safetensors", tensors, {{"format", "pt"}});
    write_json_file(out + "/adapter_config.json", config);
  });
  spdlog::info("wrote {} adapter ({} tensors) to {}", peft_type(spec.method), tensors.size(), dir);
}

void save_adapter(const moe::CausalLM& model, const moe::AdapterSpec& spec, const std::string& dir,
                  const std::string& base_model) {
  std::vector<moe::NamedTensor> whole;
  for (const moe::TrainableTensor& t : model.trainable_tensors()) {
    MOLE_CHECK(!moe::is_expert_stack(t.role) || t.tensor.size(0) == t.num_experts, "save_adapter: '",
               t.name, "' holds ", t.tensor.size(0), " of its ", t.num_experts,
               " experts; gather the expert shards first (parallel::gather_trainable)");
    whole.emplace_back(t.name, t.tensor);
  }
  save_adapter(whole, spec, dir, base_model);
}

void save_hf_model(moe::CausalLM& model, const std::string& dir,
                   const std::map<std::string, std::string>& extra_files) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  model.for_each_base_parameter([&](const std::string& name, const at::Tensor& t) {
    tensors.emplace_back(name, t.detach());
  });
  save_hf_model(model, tensors, dir, extra_files);
}

void save_hf_model(const moe::CausalLM& model, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                   const std::string& dir, const std::map<std::string, std::string>& extra_files) {
  const moe::ModelConfig& c = model.config();
  MOLE_CHECK(c.rope.type == "default", "save_hf_model: only default RoPE is written");
  // The architecture's own model_type, so that transformers builds the same model (Qwen2's q, k,
  // v biases, Mistral's window).
  const std::string& type = c.model_type;
  MOLE_CHECK(type == "llama" || type == "mistral" || type == "qwen2", "save_hf_model: model_type '", type,
             "' cannot be written (llama, mistral, qwen2)");
  MOLE_CHECK(type != "llama" || c.qkv_bias == c.o_bias,
             "save_hf_model: a llama config has one attention_bias for q, k, v and o");
  MOLE_CHECK(type != "qwen2" || (c.qkv_bias && !c.o_bias), "save_hf_model: qwen2 has biases on q, k, v only");
  MOLE_CHECK(type == "mistral" || !c.sliding_window, "save_hf_model: only mistral configs carry a sliding window");
  MOLE_CHECK(type == "llama" || !c.mlp_bias, "save_hf_model: only llama configs carry mlp_bias");
  const char* architecture = type == "llama" ? "LlamaForCausalLM" : type == "mistral" ? "MistralForCausalLM"
                                                                                      : "Qwen2ForCausalLM";
  json config = {{"architectures", {architecture}},
                 {"model_type", type},
                 {"vocab_size", c.vocab_size},
                 {"hidden_size", c.hidden_size},
                 {"intermediate_size", c.intermediate_size},
                 {"num_hidden_layers", c.num_layers},
                 {"num_attention_heads", c.num_heads},
                 {"num_key_value_heads", c.num_kv_heads},
                 {"head_dim", c.head_dim},
                 {"rms_norm_eps", c.rms_norm_eps},
                 {"rope_theta", c.rope.theta},
                 {"hidden_act", "silu"},
                 {"tie_word_embeddings", c.tie_word_embeddings},
                 {"max_position_embeddings", c.max_position_embeddings},
                 {"torch_dtype", model.options().dtype() == at::kBFloat16 ? "bfloat16" : "float32"}};
  if (type == "llama") {
    config["attention_bias"] = c.qkv_bias;
    config["mlp_bias"] = c.mlp_bias;
  } else if (type == "mistral") {
    if (c.sliding_window) config["sliding_window"] = *c.sliding_window;
  } else {
    config["use_sliding_window"] = false;
  }
  write_files_atomic(dir, [&](const std::string& out) {
    st::save_file(out + "/model.safetensors", tensors, {{"format", "pt"}});
    write_json_file(out + "/config.json", config);
    for (const auto& [name, bytes] : extra_files) write_file_atomic(out + "/" + name, bytes);
  });
}

}  // namespace mole::ckpt
