// The LLaMA-family decoder (see llama.h).
#include "moe/llama.h"

#include <ATen/ATen.h>
#include <ATen/core/Reduction.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "kernels/check.h"
#include "kernels/torch_compat.h"
#include "moe/precision.h"
#include "moe/random.h"

namespace mole::moe {

at::Tensor RmsNorm::forward(const at::Tensor& x) const {
  at::Tensor x32 = x.to(adapter_dtype(x.scalar_type()));
  at::Tensor variance = x32.pow(2).mean(-1, /*keepdim=*/true);
  at::Tensor normed = (x32 * at::rsqrt(variance + eps_)).to(x.scalar_type());
  return weight_D_ * normed;
}

const LoraLinear& DecoderLayer::linear(const std::string& name) const {
  return const_cast<DecoderLayer*>(this)->linear(name);
}

LoraLinear& DecoderLayer::linear(const std::string& name) {
  if (name == "self_attn.q_proj") return q_proj;
  if (name == "self_attn.k_proj") return k_proj;
  if (name == "self_attn.v_proj") return v_proj;
  if (name == "self_attn.o_proj") return o_proj;
  if (name == "mlp.gate_proj") return gate_proj;
  if (name == "mlp.up_proj") return up_proj;
  if (name == "mlp.down_proj") return down_proj;
  MOLE_FAIL("unknown linear '", name, "' in a decoder layer (known: self_attn.{q,k,v,o}_proj, ",
            "mlp.{gate,up,down}_proj)");
}


CausalLM::CausalLM(ModelConfig config, const at::TensorOptions& options,
                   std::shared_ptr<BaseWeights> weights)
    : config_(std::move(config)),
      options_(options),
      weights_(weights ? std::move(weights) : std::make_shared<LocalBaseWeights>()) {
  config_.validate();
  const ModelConfig& c = config_;
  const int64_t q_dim = c.num_heads * c.head_dim;
  const int64_t kv_dim = c.num_kv_heads * c.head_dim;
  const int64_t D = c.hidden_size, F = c.intermediate_size;
  // Every frozen tensor, declared in the order for_each_base_parameter() lists them.
  auto declare = [this](const std::string& name, int64_t layer, const std::vector<int64_t>& shape,
                        const at::TensorOptions& opts) {
    at::Tensor t = weights_->declare(name, layer, shape, opts);
    base_.emplace_back(name, t);
    base_group_.emplace(name, layer);
    return t;
  };
  // The fp64 exactness mode computes its RoPE tables in float64 too.
  const at::ScalarType rope_dtype = options.dtype() == at::kDouble ? at::kDouble : at::kFloat;
  inv_freq_ = rope_inv_freq(c.rope, c.head_dim, rope_dtype).to(options.device());
  // Tied embeddings serve as the LM head too: they belong to the head's group.
  embed_VD_ = declare("model.embed_tokens.weight", c.tie_word_embeddings ? kHeadGroup : kEmbeddingGroup,
                      {c.vocab_size, D}, options);
  layers_.resize(static_cast<size_t>(c.num_layers));
  for (int64_t i = 0; i < c.num_layers; ++i) {
    DecoderLayer& layer = layers_[static_cast<size_t>(i)];
    const std::string prefix = "model.layers." + std::to_string(i) + ".";
    auto norm = [&](const std::string& name) {
      return RmsNorm(declare(prefix + name + ".weight", i, {D}, options), c.rms_norm_eps);
    };
    auto linear = [&](const std::string& name, int64_t out, int64_t in, bool bias) {
      at::Tensor weight = declare(prefix + name + ".weight", i, {out, in}, options);
      return LoraLinear(weight, bias ? declare(prefix + name + ".bias", i, {out}, options) : at::Tensor());
    };
    layer.input_norm = norm("input_layernorm");
    layer.post_attention_norm = norm("post_attention_layernorm");
    layer.q_proj = linear("self_attn.q_proj", q_dim, D, c.qkv_bias);
    layer.k_proj = linear("self_attn.k_proj", kv_dim, D, c.qkv_bias);
    layer.v_proj = linear("self_attn.v_proj", kv_dim, D, c.qkv_bias);
    layer.o_proj = linear("self_attn.o_proj", D, q_dim, c.o_bias);
    layer.gate_proj = linear("mlp.gate_proj", F, D, c.mlp_bias);
    layer.up_proj = linear("mlp.up_proj", F, D, c.mlp_bias);
    layer.down_proj = linear("mlp.down_proj", D, F, c.mlp_bias);
  }
  final_norm_ = RmsNorm(declare("model.norm.weight", kHeadGroup, {D}, options), c.rms_norm_eps);
  if (!c.tie_word_embeddings) lm_head_VD_ = declare("lm_head.weight", kHeadGroup, {c.vocab_size, D}, options);
}

int64_t CausalLM::base_group(const std::string& name) const {
  auto it = base_group_.find(name);
  MOLE_CHECK(it != base_group_.end(), "the model has no frozen tensor '", name, "'");
  return it->second;
}

void CausalLM::for_each_base_parameter(
    const std::function<void(const std::string&, const at::Tensor&)>& fn) const {
  for (const auto& [name, t] : base_) fn(name, t);
}

std::vector<NamedTensor> CausalLM::lora_parameters() const {
  std::vector<NamedTensor> out;
  for (const TrainableTensor& t : trainable_tensors()) {
    if (t.role == TensorRole::kLoraA || t.role == TensorRole::kLoraB) out.emplace_back(t.name, t.tensor);
  }
  return out;
}

void CausalLM::for_each_site(const std::function<void(const SiteRef&)>& fn) const {
  for (size_t i = 0; i < layers_.size(); ++i) {
    const DecoderLayer& layer = layers_[i];
    const int64_t index = static_cast<int64_t>(i);
    if (layer.ffn_site) fn(SiteRef{index, layer.ffn_site.get(), nullptr, ""});
    for (const std::string& name : linear_names()) {
      auto it = layer.linear_sites.find(name);
      if (it != layer.linear_sites.end()) fn(SiteRef{index, nullptr, it->second.get(), name});
    }
  }
}

std::vector<TrainableTensor> CausalLM::trainable_tensors() const {
  std::vector<TrainableTensor> out;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const std::string prefix = "model.layers." + std::to_string(i) + ".";
    for (const std::string& name : linear_names()) {
      const auto& lora = layers_[i].linear(name).lora();
      if (!lora) continue;
      out.push_back({prefix + name + ".lora_A.weight", lora->a_rI, TensorRole::kLoraA});
      out.push_back({prefix + name + ".lora_B.weight", lora->b_Or, TensorRole::kLoraB});
    }
  }
  for_each_site([&out](const SiteRef& site) {
    const std::string prefix = "model.layers." + std::to_string(site.layer) + ".";
    auto add_experts = [&out](const std::string& linear, const ExpertLora& lora, int64_t total) {
      out.push_back({linear + ".experts.lora_A", lora.a_ErI, TensorRole::kExpertLoraA, total,
                     lora.first_expert});
      out.push_back({linear + ".experts.lora_B", lora.b_EOr, TensorRole::kExpertLoraB, total,
                     lora.first_expert});
    };
    if (site.ffn) {
      const FfnMoeSite& s = *site.ffn;
      out.push_back({prefix + "mlp.moe_gate.weight", s.router_weight(), TensorRole::kRouter});
      add_experts(prefix + "mlp.gate_proj", s.gate(), s.num_experts());
      add_experts(prefix + "mlp.up_proj", s.up(), s.num_experts());
      add_experts(prefix + "mlp.down_proj", s.down(), s.num_experts());
    } else {
      const LinearMoeSite& s = *site.linear;
      out.push_back({prefix + site.linear_name + ".moe_gate.weight", s.router_weight(), TensorRole::kRouter});
      add_experts(prefix + site.linear_name, s.experts(), s.num_experts());
    }
  });
  return out;
}

std::vector<NamedTensor> CausalLM::trainable_parameters() const {
  std::vector<NamedTensor> out;
  for (const TrainableTensor& t : trainable_tensors()) out.emplace_back(t.name, t.tensor);
  return out;
}

namespace {

uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// FNV-1a: a tensor's stream follows from its name, not from its place in any order.
uint64_t name_hash(const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

}  // namespace

void CausalLM::init_base_random(uint64_t seed, const at::Device& device) {
  at::NoGradGuard no_grad;
  for_each_base_parameter([&](const std::string& name, const at::Tensor& param) {
    const auto [begin, end] = weights_->kept_range(name);
    // float32 draws (float64 for a float64 model: its values then do not depend on the CPU's
    // vectorised float32 normal sampler).
    const at::TensorOptions options =
        at::TensorOptions(param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).device(device);
    at::Tensor part = at::empty({end - begin}, options);
    const bool is_norm = name.find("norm.weight") != std::string::npos;
    const bool is_bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
    if (is_norm) {
      part.fill_(1.0);
    } else if (is_bias) {
      part.zero_();
    } else {
      const double stddev =
          name == "model.embed_tokens.weight" ? 1.0 : 1.0 / std::sqrt(static_cast<double>(param.size(-1)));
      const uint64_t stream = splitmix64(seed ^ name_hash(name));
      const int64_t numel = param.numel();
      for (int64_t b = begin / kInitBlock; begin < end && b * kInitBlock < end; ++b) {
        const int64_t first = b * kInitBlock, size = std::min(kInitBlock, numel - first);
        const at::Generator gen = make_generator(splitmix64(stream + static_cast<uint64_t>(b)), device);
        const int64_t lo = std::max(begin, first), hi = std::min(end, first + size);
        if (lo == first && hi == first + size) {
          part.narrow(0, lo - begin, size).normal_(0.0, stddev, gen);  // the whole block is kept
        } else {
          at::Tensor block = at::empty({size}, options).normal_(0.0, stddev, gen);
          part.narrow(0, lo - begin, hi - lo).copy_(block.narrow(0, lo - first, hi - lo));
        }
      }
    }
    weights_->assign_kept(name, part);
  });
}

void CausalLM::init_lora(const std::vector<std::string>& target_modules, const LoraOptions& options,
                         const at::Generator& gen) {
  for (const std::string& target : target_modules) {
    bool known = false;
    for (const std::string& name : linear_names()) known = known || short_name(name) == target;
    MOLE_CHECK(known, "unknown LoRA target module '", target, "' (known: ", target_names_text(), ")");
  }
  for (DecoderLayer& layer : layers_) {
    for (const std::string& name : linear_names()) {
      for (const std::string& target : target_modules) {
        if (short_name(name) == target) layer.linear(name).init_lora(options, gen);
      }
    }
  }
}

void check_tokens(const at::Tensor& input_ids_BS, const at::Tensor& labels_BS, int64_t vocab_size) {
  MOLE_CHECK(input_ids_BS.defined() && input_ids_BS.dim() == 2,
             "input_ids must be a 2-D [batch, seq] tensor, got ",
             input_ids_BS.defined() ? input_ids_BS.sizes() : at::IntArrayRef{});
  MOLE_CHECK(input_ids_BS.scalar_type() == at::kLong, "input_ids must be int64, got ",
             input_ids_BS.scalar_type());
  MOLE_CHECK(input_ids_BS.size(1) > 0, "input_ids has an empty sequence dimension");
  // Device -> host sync: one reduction to validate ids before the embedding gathers them.
  at::Tensor bad = (input_ids_BS < 0).logical_or(input_ids_BS >= vocab_size).nonzero();
  if (bad.size(0) > 0) {
    at::Tensor where = bad[0].cpu();
    const int64_t b = where[0].item<int64_t>(), s = where[1].item<int64_t>();
    MOLE_FAIL("token id ", input_ids_BS[b][s].item<int64_t>(), " at input_ids[", b, "][", s,
              "] is outside the vocabulary [0, ", vocab_size, ") (", bad.size(0),
              " such ids in total)");
  }
  if (!labels_BS.defined()) return;
  MOLE_CHECK(labels_BS.scalar_type() == at::kLong, "labels must be int64, got ",
             labels_BS.scalar_type());
  MOLE_CHECK(labels_BS.sizes() == input_ids_BS.sizes(), "labels shape ", labels_BS.sizes(),
             " differs from input_ids shape ", input_ids_BS.sizes());
  at::Tensor bad_labels =
      (labels_BS != -100).logical_and((labels_BS < 0).logical_or(labels_BS >= vocab_size)).nonzero();
  if (bad_labels.size(0) > 0) {
    at::Tensor where = bad_labels[0].cpu();
    const int64_t b = where[0].item<int64_t>(), s = where[1].item<int64_t>();
    MOLE_FAIL("label ", labels_BS[b][s].item<int64_t>(), " at labels[", b, "][", s,
              "] is neither -100 nor inside the vocabulary [0, ", vocab_size, ")");
  }
}

at::Tensor CausalLM::project(const DecoderLayer& layer, const std::string& name,
                            const at::Tensor& x_BSI, ForwardContext& ctx) const {
  at::Tensor y = layer.linear(name).forward(x_BSI, ctx.training, ctx.generator);
  auto site = layer.linear_sites.find(name);
  if (site == layer.linear_sites.end()) return y;
  at::Tensor x_TI = x_BSI.reshape({-1, x_BSI.size(-1)});
  at::Tensor delta_TO = site->second->delta(x_TI, ctx);
  return y + delta_TO.view(y.sizes()).to(y.scalar_type());
}

at::Tensor CausalLM::attention(const DecoderLayer& layer, const at::Tensor& x_BSD,
                               const RopeTables& rope, const at::Tensor& mask_SS,
                               ForwardContext& ctx) const {
  const ModelConfig& c = config_;
  const int64_t B = x_BSD.size(0), S = x_BSD.size(1);
  const int64_t H = c.num_heads, G = c.num_kv_heads, d = c.head_dim;
  at::Tensor q_BHSd = project(layer, "self_attn.q_proj", x_BSD, ctx).view({B, S, H, d}).transpose(1, 2);
  at::Tensor k_BGSd = project(layer, "self_attn.k_proj", x_BSD, ctx).view({B, S, G, d}).transpose(1, 2);
  at::Tensor v_BGSd = project(layer, "self_attn.v_proj", x_BSD, ctx).view({B, S, G, d}).transpose(1, 2);
  q_BHSd = apply_rope(q_BHSd, rope);
  k_BGSd = apply_rope(k_BGSd, rope);
  // Grouped-query attention: each kv head serves H/G query heads.
  at::Tensor k_BHSd = k_BGSd.unsqueeze(2).expand({B, G, H / G, S, d}).reshape({B, H, S, d});
  at::Tensor v_BHSd = v_BGSd.unsqueeze(2).expand({B, G, H / G, S, d}).reshape({B, H, S, d});
  std::optional<at::Tensor> mask;
  if (mask_SS.defined()) mask = mask_SS;
  at::Tensor out_BHSd = compat::scaled_dot_product_attention(
      q_BHSd, k_BHSd, v_BHSd, mask, 1.0 / std::sqrt(static_cast<double>(d)));
  at::Tensor out_BSD = out_BHSd.transpose(1, 2).reshape({B, S, H * d});
  return project(layer, "self_attn.o_proj", out_BSD, ctx);
}

at::Tensor CausalLM::mlp(const DecoderLayer& layer, const at::Tensor& x_BSD,
                         ForwardContext& ctx) const {
  if (layer.ffn_site) {
    at::Tensor x_TD = x_BSD.reshape({-1, x_BSD.size(-1)});
    return layer.ffn_site->forward(x_TD, layer.gate_proj, layer.up_proj, layer.down_proj, ctx)
        .view(x_BSD.sizes());
  }
  at::Tensor gate_BSF = project(layer, "mlp.gate_proj", x_BSD, ctx);
  at::Tensor up_BSF = project(layer, "mlp.up_proj", x_BSD, ctx);
  return project(layer, "mlp.down_proj", at::silu(gate_BSF) * up_BSF, ctx);
}

at::Tensor CausalLM::forward(const at::Tensor& input_ids_BS) const {
  ForwardContext ctx;
  return forward(input_ids_BS, ctx);
}

at::Tensor CausalLM::forward(const at::Tensor& input_ids_BS, ForwardContext& ctx) const {
  check_tokens(input_ids_BS, at::Tensor(), config_.vocab_size);
  const int64_t S = input_ids_BS.size(1);
  // Host ids (checked above on the host) go over without waiting for the device's queue.
  at::Tensor ids = input_ids_BS.to(options_.device(), /*non_blocking=*/true);
  RopeTables rope = rope_tables(inv_freq_, S, options_.device());
  at::Tensor mask_SS;  // undefined: plain causal attention
  if (config_.sliding_window && S > *config_.sliding_window) {
    at::Tensor pos = at::arange(S, at::TensorOptions(at::kLong).device(options_.device()));
    at::Tensor diff = pos.unsqueeze(1) - pos.unsqueeze(0);  // query - key
    mask_SS = (diff >= 0).logical_and(diff < *config_.sliding_window);
  }
  at::Tensor h_BSD;
  {
    const AcquiredLayer embedding(*weights_, config_.tie_word_embeddings ? kHeadGroup : kEmbeddingGroup);
    h_BSD = at::embedding(embed_VD_, ids);
  }
  const LayerInputs inputs{rope, mask_SS};
  for (int64_t i = 0; i < num_layers(); ++i) {
    // `inputs` by value: a runner may keep the body and run it again in backward.
    const LayerBody body = [this, i, inputs, &ctx](const at::Tensor& h) {
      return forward_layer(i, h, inputs, ctx);
    };
    h_BSD = ctx.layer_runner ? ctx.layer_runner->run(i, h_BSD, body) : body(h_BSD);
  }
  const AcquiredLayer head(*weights_, kHeadGroup);
  h_BSD = final_norm_.forward(h_BSD);
  return at::linear(h_BSD, lm_head_VD_.defined() ? lm_head_VD_ : embed_VD_);
}

at::Tensor CausalLM::forward_layer(int64_t i, const at::Tensor& h_BSD, const LayerInputs& inputs,
                                   ForwardContext& ctx) const {
  const DecoderLayer& layer = layers_.at(static_cast<size_t>(i));
  const AcquiredLayer acquired(*weights_, i);
  at::Tensor h = h_BSD + attention(layer, layer.input_norm.forward(h_BSD), inputs.rope, inputs.mask_SS, ctx);
  return h + mlp(layer, layer.post_attention_norm.forward(h), ctx);
}

LossSum causal_lm_loss_sum(const at::Tensor& logits_BSV, const at::Tensor& labels_BS) {
  MOLE_CHECK(logits_BSV.dim() == 3 && labels_BS.dim() == 2 &&
                 logits_BSV.size(0) == labels_BS.size(0) && logits_BSV.size(1) == labels_BS.size(1),
             "logits ", logits_BSV.sizes(), " and labels ", labels_BS.sizes(), " do not match");
  const int64_t V = logits_BSV.size(2);
  const int64_t S = logits_BSV.size(1);
  at::Tensor shifted = labels_BS.narrow(1, 1, S - 1).reshape({-1});
  // The count of target tokens, from the labels where they are: no device -> host sync for
  // labels on the host (training batches); one for labels on the device.
  const int64_t num_tokens = (shifted != -100).sum().item<int64_t>();
  at::Tensor targets = shifted.to(logits_BSV.device(), /*non_blocking=*/true);
  at::Tensor logits = logits_BSV.narrow(1, 0, S - 1).reshape({-1, V}).to(adapter_dtype(logits_BSV.scalar_type()));
  at::Tensor sum = at::cross_entropy_loss(logits, targets, {}, at::Reduction::Sum, -100);
  return {sum, num_tokens};
}

at::Tensor causal_lm_loss(const at::Tensor& logits_BSV, const at::Tensor& labels_BS) {
  LossSum loss = causal_lm_loss_sum(logits_BSV, labels_BS);
  MOLE_CHECK(loss.num_tokens > 0,
             "labels contain no target tokens (every label after the first position is -100)");
  return loss.sum / static_cast<double>(loss.num_tokens);
}

}  // namespace mole::moe
