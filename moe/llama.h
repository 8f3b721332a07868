// The LLaMA-family decoder (LLaMA 2/3, Mistral, Qwen2) in LibTorch: embedding, RMSNorm, RoPE,
// causal GQA attention, SwiGLU MLP, LM head. Base weights are frozen; LoRA adapters attach to
// the projection linears. Names of parameters follow Hugging Face (`model.layers.0.mlp.up_proj`).
//
// Legend: B batch, S sequence, D hidden, F intermediate, V vocab, H heads, G kv heads, d head_dim.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "moe/base_weights.h"
#include "moe/forward_context.h"
#include "moe/lora_linear.h"
#include "moe/model_config.h"
#include "moe/moe_site.h"
#include "moe/rope.h"

namespace mole::moe {

using NamedTensor = std::pair<std::string, at::Tensor>;

// What a trainable tensor is, as the model knows it (the parallel layer derives replica groups
// and optimizer settings from this, once).
enum class TensorRole { kLoraA, kLoraB, kRouter, kExpertLoraA, kExpertLoraB };
inline bool is_expert_stack(TensorRole role) {
  return role == TensorRole::kExpertLoraA || role == TensorRole::kExpertLoraB;
}
inline bool is_lora_b(TensorRole role) {
  return role == TensorRole::kLoraB || role == TensorRole::kExpertLoraB;
}

struct TrainableTensor {
  std::string name;  // see CausalLM::trainable_parameters()
  at::Tensor tensor;
  TensorRole role = TensorRole::kLoraA;
  // Expert stacks: the site's expert count and the global id of the first expert held here.
  int64_t num_experts = 0;
  int64_t first_expert = 0;
};

class RmsNorm {
 public:
  RmsNorm() = default;
  RmsNorm(at::Tensor weight_D, double eps) : weight_D_(std::move(weight_D)), eps_(eps) {}
  // Normalises in float32 and returns x's dtype, as transformers does.
  at::Tensor forward(const at::Tensor& x) const;
  at::Tensor& weight() { return weight_D_; }

 private:
  at::Tensor weight_D_;
  double eps_ = 1e-6;
};

// Names of the adaptable linears inside one decoder layer, in Hugging Face's spelling.
inline const std::vector<std::string>& linear_names() {
  static const std::vector<std::string> names = {"self_attn.q_proj", "self_attn.k_proj",
                                                 "self_attn.v_proj", "self_attn.o_proj",
                                                 "mlp.gate_proj",    "mlp.up_proj",
                                                 "mlp.down_proj"};
  return names;
}

// The name target_modules uses for a linear: "self_attn.q_proj" -> "q_proj".
inline std::string short_name(const std::string& linear_name) {
  return linear_name.substr(linear_name.find('.') + 1);
}

// "q_proj, k_proj, ..., down_proj": every target_modules name, for error messages.
inline std::string target_names_text() {
  std::string text;
  for (const std::string& name : linear_names()) text += (text.empty() ? "" : ", ") + short_name(name);
  return text;
}

struct DecoderLayer {
  RmsNorm input_norm;
  RmsNorm post_attention_norm;
  LoraLinear q_proj, k_proj, v_proj, o_proj;
  LoraLinear gate_proj, up_proj, down_proj;
  // MixLoRA: the FFN block is a MoE site (its experts carry the gate/up/down LoRA).
  std::unique_ptr<FfnMoeSite> ffn_site;
  // MoLA / DynMoLE / MoELoRA: per-linear sites, keyed by linear name (e.g. "self_attn.q_proj").
  std::map<std::string, std::unique_ptr<LinearMoeSite>> linear_sites;

  // One of linear_names(); throws for anything else.
  LoraLinear& linear(const std::string& name);
  const LoraLinear& linear(const std::string& name) const;
};

// One MoE site of a model: an FFN-block site (`ffn`) or a per-linear site (`linear` on the
// layer's linear `linear_name`).
struct SiteRef {
  int64_t layer = 0;
  FfnMoeSite* ffn = nullptr;
  LinearMoeSite* linear = nullptr;
  std::string linear_name;  // e.g. "self_attn.q_proj"; empty for an FFN-block site
};

class CausalLM {
 public:
  // Declares the (uninitialised) frozen weights of `config` with `options` (dtype, device) in
  // `weights` (null: a LocalBaseWeights holding every tensor whole).
  CausalLM(ModelConfig config, const at::TensorOptions& options,
           std::shared_ptr<BaseWeights> weights = nullptr);

  const ModelConfig& config() const { return config_; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  DecoderLayer& layer(int64_t i) { return layers_.at(static_cast<size_t>(i)); }
  const DecoderLayer& layer(int64_t i) const { return layers_.at(static_cast<size_t>(i)); }

  // input_ids_BS (int64) -> logits_BSV in the model dtype. Token ids outside [0, V) are an
  // error naming the id and its position. `ctx.training` enables dropout and router jitter; MoE
  // sites append their router records to `ctx.sites`.
  at::Tensor forward(const at::Tensor& input_ids_BS, ForwardContext& ctx) const;
  // Evaluation-mode forward without router records.
  at::Tensor forward(const at::Tensor& input_ids_BS) const;

  // What every decoder layer of one forward pass shares.
  struct LayerInputs {
    RopeTables rope;
    at::Tensor mask_SS;  // undefined: plain causal attention
  };
  // Decoder layer `i` as a unit: h_BSD -> h_BSD, its frozen weights acquired from the base
  // weights for the call. Re-running it (activation checkpointing) records its sites once.
  at::Tensor forward_layer(int64_t i, const at::Tensor& h_BSD, const LayerInputs& inputs,
                           ForwardContext& ctx) const;

  // Every frozen base tensor with its Hugging Face name (`lm_head.weight` only when untied), in
  // a fixed order: embedding, then per layer the two norms and each linear's weight (and bias) in
  // linear_names() order, then the final norm and the LM head. The handles the model reads
  // (BaseWeights::assign sets them).
  void for_each_base_parameter(
      const std::function<void(const std::string&, const at::Tensor&)>& fn) const;
  // The group of base weights frozen tensor `name` is acquired with: its decoder layer, or
  // kEmbeddingGroup / kHeadGroup (base_weights.h).
  int64_t base_group(const std::string& name) const;
  // Every plain LoRA tensor, named as PEFT does without the `base_model.model.` prefix, e.g.
  // `model.layers.0.self_attn.q_proj.lora_A.weight`.
  std::vector<NamedTensor> lora_parameters() const;
  // Every trainable tensor: plain LoRA as above, then MoE sites' routers and stacked experts:
  // `model.layers.0.mlp.moe_gate.weight`, `model.layers.0.mlp.gate_proj.experts.lora_A` [E,r,I],
  // `model.layers.0.self_attn.q_proj.moe_gate.weight`, ...
  std::vector<NamedTensor> trainable_parameters() const;
  // The same tensors, in the same order, with their roles.
  std::vector<TrainableTensor> trainable_tensors() const;
  // Every MoE site, layer by layer: the FFN-block site first, then per-linear sites in
  // linear_names() order.
  void for_each_site(const std::function<void(const SiteRef&)>& fn) const;
  BaseWeights& base_weights() const { return *weights_; }

  // Fills the frozen base deterministically from `seed` (synthetic models and benchmarks):
  // embeddings N(0, 1), linear weights and the LM head N(0, 1/in_features) so activations and
  // logits stay O(1) (a random head of std 0.02 could not express a confident prediction through
  // the final RMSNorm), biases zero, norm weights one. Each tensor, flattened, is drawn in blocks
  // of kInitBlock elements, block b of tensor `name` from a generator of its own seeded by (seed,
  // name, b): a rank makes only the blocks its part of the tensor touches (BaseWeights::
  // kept_range), and any layout holds the same values. The draws run on `device` (a CUDA device
  // fills a large base on the GPU without a host copy; its values differ from the CPU's).
  void init_base_random(uint64_t seed, const at::Device& device = at::Device(at::kCPU));
  static constexpr int64_t kInitBlock = int64_t{1} << 20;

  // Attach freshly initialised LoRA to the linears whose short name (q_proj, ...) is listed.
  void init_lora(const std::vector<std::string>& target_modules, const LoraOptions& options,
                 const at::Generator& gen);

  at::TensorOptions options() const { return options_; }

 private:
  at::Tensor attention(const DecoderLayer& layer, const at::Tensor& x_BSD,
                       const RopeTables& rope, const at::Tensor& mask_SS,
                       ForwardContext& ctx) const;
  at::Tensor mlp(const DecoderLayer& layer, const at::Tensor& x_BSD, ForwardContext& ctx) const;
  // A projection of `layer`: its base and plain LoRA, plus its per-linear MoE site if any.
  at::Tensor project(const DecoderLayer& layer, const std::string& name, const at::Tensor& x_BSI,
                     ForwardContext& ctx) const;

  ModelConfig config_;
  at::TensorOptions options_;
  std::shared_ptr<BaseWeights> weights_;
  std::vector<NamedTensor> base_;  // every frozen handle with its name, in declaration order
  std::map<std::string, int64_t> base_group_;  // name -> group it is acquired with
  at::Tensor inv_freq_;  // [d/2], float32 (float64 for a float64 model)
  at::Tensor embed_VD_;
  std::vector<DecoderLayer> layers_;
  RmsNorm final_norm_;
  at::Tensor lm_head_VD_;  // undefined when tied to embed_VD_
};

// Checks input_ids (int64, [B,S], ids in [0, vocab)) and, when defined, labels (int64, same
// shape, values -100 or in [0, vocab)). Throws mole::Error naming the offending value/position.
void check_tokens(const at::Tensor& input_ids_BS, const at::Tensor& labels_BS, int64_t vocab_size);

struct LossSum {
  at::Tensor sum;      // float32 scalar: sum of token cross-entropies
  int64_t num_tokens;  // target tokens (labels != -100 after the shift)
};

// Next-token cross-entropy as transformers computes it: logits[:, :-1] against labels[:, 1:],
// positions with label -100 ignored. The sum and the count, so callers can normalise globally.
LossSum causal_lm_loss_sum(const at::Tensor& logits_BSV, const at::Tensor& labels_BS);
// The mean over target tokens; throws when there are none.
at::Tensor causal_lm_loss(const at::Tensor& logits_BSV, const at::Tensor& labels_BS);

}  // namespace mole::moe
