// The per-rank memory and communication plan of a training run (see memory_plan.h). Every count
// follows what the code keeps: the frozen tensors llama.cpp builds, the adapter attach_adapter()
// adds (in trainable_tensors() order, so that ZeRO's buckets come out as the optimizer cuts
// them), and, for activations, the tensors autograd saves in forward_layer(): a frozen linear
// keeps nothing of its input (its weight needs no gradient), a LoRA path keeps its input in the
// adapter dtype (a copy when the base is bf16 or under dropout, with a one-byte mask) and its
// r-wide middle, SiLU and the product keep their inputs, softmax its output.
#include "parallel/memory_plan.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <functional>

#include "kernels/check.h"
#include "moe/expert_shard.h"
#include "moe/llama.h"
#include "parallel/parallel_dims.h"
#include "parallel/parameter_registry.h"
#include "parallel/zero_optimizer.h"

namespace mole::parallel {
namespace {

bool contains(const std::vector<std::string>& list, const std::string& item) {
  return std::find(list.begin(), list.end(), item) != list.end();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// In and out features of a decoder layer's linear (names as linear_names()).
struct LinearShape {
  int64_t in = 0, out = 0;
  bool bias = false;
};
LinearShape linear_shape(const moe::ModelConfig& c, const std::string& name) {
  const int64_t q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  if (name == "self_attn.q_proj") return {c.hidden_size, q, c.qkv_bias};
  if (name == "self_attn.k_proj" || name == "self_attn.v_proj") return {c.hidden_size, kv, c.qkv_bias};
  if (name == "self_attn.o_proj") return {q, c.hidden_size, c.o_bias};
  if (name == "mlp.down_proj") return {c.intermediate_size, c.hidden_size, c.mlp_bias};
  return {c.hidden_size, c.intermediate_size, c.mlp_bias};  // gate_proj, up_proj
}

// Elements of each frozen tensor, by the group it is gathered with under base sharding.
struct BaseGroups {
  std::vector<std::vector<int64_t>> layers;  // per decoder layer
  std::vector<int64_t> embedding;            // empty with tied embeddings (they are the head's)
  std::vector<int64_t> head;                 // final norm, LM head (or the tied embedding)
};
BaseGroups base_groups(const moe::ModelConfig& c) {
  BaseGroups g;
  const int64_t D = c.hidden_size;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    std::vector<int64_t> layer = {D, D};  // input and post-attention norms
    for (const std::string& name : moe::linear_names()) {
      const LinearShape s = linear_shape(c, name);
      layer.push_back(s.in * s.out);
      if (s.bias) layer.push_back(s.out);
    }
    g.layers.push_back(layer);
  }
  g.head = {D, c.vocab_size * D};
  if (!c.tie_word_embeddings) g.embedding = {c.vocab_size * D};
  return g;
}

// A tensor of these elements as a rank keeps it: whole, or its chunk of the tensor flattened and
// padded to a multiple of the group size.
int64_t kept(int64_t numel, int shard) { return shard > 0 ? ceil_div(numel, shard) : numel; }
int64_t padded(int64_t numel, int shard) { return shard > 0 ? ceil_div(numel, shard) * shard : numel; }
int64_t sum(const std::vector<int64_t>& v, const std::function<int64_t(int64_t)>& f) {
  int64_t s = 0;
  for (int64_t n : v) s += f(n);
  return s;
}

// The trainable tensors as this rank holds them, in trainable_tensors() order, as registry slots
// of meta tensors (shapes only).
std::vector<ParamSlot> trainable_slots(const PlanInput& in, at::ScalarType adapter_dtype) {
  const moe::ModelConfig& c = in.model;
  const moe::AdapterSpec& spec = in.adapter;
  const at::TensorOptions meta = at::TensorOptions().dtype(adapter_dtype).device(at::kMeta);
  std::vector<ParamSlot> slots;
  const auto add = [&](const std::string& name, std::vector<int64_t> global, int64_t rows) {
    ParamSlot s;
    s.name = name;
    s.global_shape = global;
    global.front() = rows;
    s.tensor = at::empty(global, meta);
    slots.push_back(std::move(s));
  };
  const auto routed = [&](const std::string& target) {
    return spec.is_moe() && spec.method != moe::Method::kMixLora &&
           (spec.routed_modules.empty() || contains(spec.routed_modules, target));
  };
  const auto local_experts = [&](int64_t experts) {
    return in.ep == 1 || experts < in.ep ? experts : experts / in.ep;
  };
  // Plain LoRA of every layer first, then the sites (trainable_tensors()).
  for (int64_t i = 0; i < c.num_layers; ++i) {
    for (const std::string& name : moe::linear_names()) {
      const std::string target = moe::short_name(name);
      if (!contains(spec.target_modules, target) || routed(target)) continue;
      if (spec.method == moe::Method::kMixLora && name.rfind("mlp.", 0) == 0) continue;
      const LinearShape s = linear_shape(c, name);
      const std::string prefix = "model.layers." + std::to_string(i) + "." + name;
      add(prefix + ".lora_A.weight", {spec.lora.r, s.in}, spec.lora.r);
      add(prefix + ".lora_B.weight", {s.out, spec.lora.r}, s.out);
    }
  }
  for (int64_t i = 0; i < c.num_layers && spec.is_moe(); ++i) {
    const int64_t E = spec.experts_per_layer[static_cast<size_t>(i)], e = local_experts(E);
    const int64_t r = spec.expert_lora.r;
    const std::string prefix = "model.layers." + std::to_string(i) + ".";
    const auto experts = [&](const std::string& linear, int64_t in_f, int64_t out_f) {
      add(linear + ".experts.lora_A", {E, r, in_f}, e);
      add(linear + ".experts.lora_B", {E, out_f, r}, e);
    };
    if (spec.method == moe::Method::kMixLora) {
      const int64_t D = c.hidden_size, F = c.intermediate_size;
      add(prefix + "mlp.moe_gate.weight", {E, D}, E);
      experts(prefix + "mlp.gate_proj", D, F);
      experts(prefix + "mlp.up_proj", D, F);
      experts(prefix + "mlp.down_proj", F, D);
      continue;
    }
    for (const std::string& name : moe::linear_names()) {
      const std::string target = moe::short_name(name);
      if (!contains(spec.target_modules, target) || !routed(target)) continue;
      const LinearShape s = linear_shape(c, name);
      add(prefix + name + ".moe_gate.weight", {E, s.in}, E);
      experts(prefix + name, s.in, s.out);
    }
  }
  return slots;
}

// The MoE sites as the dispatch planner sees them (moe_sites() of the built model).
std::vector<moe::MoeSiteInfo> site_infos(const PlanInput& in) {
  const moe::ModelConfig& c = in.model;
  const moe::AdapterSpec& spec = in.adapter;
  std::vector<moe::MoeSiteInfo> out;
  if (!spec.is_moe()) return out;
  const int64_t r = spec.expert_lora.r;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const int64_t E = spec.experts_per_layer[static_cast<size_t>(i)];
    const std::string prefix = "layers." + std::to_string(i) + ".";
    if (spec.method == moe::Method::kMixLora) {
      moe::MoeSiteInfo s;
      s.name = prefix + "mlp";
      s.ffn_block = true;
      s.num_experts = E;
      s.in_features = s.out_features = c.hidden_size;
      s.intermediate = c.intermediate_size;
      s.params_per_expert = 3 * r * (c.hidden_size + c.intermediate_size);
      s.router = spec.router;
      out.push_back(s);
      continue;
    }
    for (const std::string& name : moe::linear_names()) {
      const std::string target = moe::short_name(name);
      if (!contains(spec.target_modules, target)) continue;
      if (!spec.routed_modules.empty() && !contains(spec.routed_modules, target)) continue;
      const LinearShape ls = linear_shape(c, name);
      moe::MoeSiteInfo s;
      s.name = prefix + name;
      s.num_experts = E;
      s.in_features = ls.in;
      s.out_features = ls.out;
      s.params_per_expert = r * (ls.in + ls.out);
      s.router = spec.router;
      out.push_back(s);
    }
  }
  return out;
}

// The most (token, expert) pairs per token a router can make: memory must hold the worst step,
// not the expected one (top-p needs at most ceil(p E) experts; DynMoLE takes all of them when a
// token's routing entropy is high).
double max_pairs_per_token(const moe::RouterOptions& r, int64_t experts) {
  switch (r.strategy) {
    case moe::RoutingStrategy::kTopK: return static_cast<double>(std::min(r.top_k, experts));
    case moe::RoutingStrategy::kSwitch: return 1.0;
    case moe::RoutingStrategy::kTopP:
      return std::min(static_cast<double>(experts), std::ceil(r.top_p * static_cast<double>(experts)));
    case moe::RoutingStrategy::kDense:
    case moe::RoutingStrategy::kDynMole: return static_cast<double>(experts);
  }
  return static_cast<double>(experts);
}

// Bytes autograd keeps for backward in one decoder layer's forward, for T tokens.
struct LayerActivations {
  int64_t kept = 0;     // saved for backward
  int64_t working = 0;  // the largest transient of its forward or backward
};

LayerActivations layer_activations(const PlanInput& in, int64_t layer,
                                   const std::map<std::string, SiteDispatch>& dispatch) {
  const moe::ModelConfig& c = in.model;
  const moe::AdapterSpec& spec = in.adapter;
  const int64_t e = in.element_bytes;
  const int64_t a = e == 8 ? 8 : 4;  // adapter dtype: float32, float64 with a float64 base
  const bool copy = e != a;          // the LoRA paths convert their input
  const double p = spec.lora.dropout;          // plain LoRA
  const double pe = spec.expert_lora.dropout;  // the experts' LoRA
  const int64_t B = in.micro_batch, S = in.seq_len, T = B * S;
  const int64_t D = c.hidden_size, F = c.intermediate_size;
  const int64_t Q = c.num_heads * c.head_dim, H = c.num_heads;
  const int64_t r = spec.lora.r;
  LayerActivations out;
  int64_t& kept = out.kept;

  // A LoRA path's input of `rows` x `width`: its own copy (and dropout's mask and output), or the
  // shared input, counted once per shared tensor by the caller.
  const auto lora_input = [&](int64_t rows, int64_t width, bool& shared) {
    int64_t bytes = 0;
    if (copy) bytes += rows * width * a;
    if (p > 0.0) bytes += rows * width * (a + 1);
    if (!copy && p == 0.0) shared = true;
    return bytes;
  };
  const auto routed = [&](const std::string& target) {
    return spec.is_moe() && spec.method != moe::Method::kMixLora &&
           (spec.routed_modules.empty() || contains(spec.routed_modules, target));
  };
  const int64_t E = spec.is_moe() ? spec.experts_per_layer[static_cast<size_t>(layer)] : 0;
  // A router over `rows` tokens: logits, probabilities, the selection and the routing weights
  // (about eight values per token and expert).
  const auto router_kept = [&](int64_t rows) { return 8 * rows * E * a; };
  // A linear's adapter: plain LoRA, or a routed site (router, rows per routed pair).
  const auto adapt = [&](const std::string& name, int64_t rows_in, bool& shared) {
    const std::string target = moe::short_name(name);
    if (!contains(spec.target_modules, target)) return;
    const LinearShape s = linear_shape(c, name);
    if (!routed(target)) {
      kept += lora_input(rows_in, s.in, shared) + rows_in * r * a;
      return;
    }
    const std::string site = "layers." + std::to_string(layer) + "." + name;
    const SiteDispatch& d = dispatch.at(site);
    const auto N = static_cast<int64_t>(static_cast<double>(rows_in) * max_pairs_per_token(spec.router, E));
    kept += (copy ? rows_in * s.in * a : 0) + router_kept(rows_in);
    if (!copy) shared = true;
    // The routed rows: the experts' input in the adapter dtype, their middles, their outputs and
    // those weighted (the combine keeps both), and the rows' indices.
    kept += N * s.in * a + (pe > 0.0 ? N * s.in * (a + 1) : 0) + N * spec.expert_lora.r * a +
            2 * N * s.out * a + 3 * N * 8;
    if (d.mode == moe::DispatchMode::kWeights) kept += E * spec.expert_lora.r * (s.in + s.out) * a;  // gathered
  };

  // An RMS norm keeps its input in float32 (the layer input itself when that is float32), the
  // normalised rows before the weight and the row scales.
  const int64_t norm = T * D * a + T * D * e + T * a;
  kept += norm;
  // q, k, v read the normed input.
  bool shared_attn = false;
  for (const char* name : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}) adapt(name, T, shared_attn);
  if (shared_attn) kept += T * D * e;
  // Attention: q (after RoPE) and k, v expanded to every head.
  kept += 3 * T * Q * e;
  const int64_t softmax_bytes = e == 8 ? 8 : 4;
  int64_t attention_working = 0;
  if (in.fused_attention) {
    kept += T * Q * e + B * H * S * 4;  // output and log-sum-exp
    attention_working = T * Q * e * 3;  // gradients of q, k, v
  } else {
    kept += B * H * S * S * (softmax_bytes + (copy ? e : 0)) + S * S;
    // Scores, masked scores and probabilities in forward; their gradients in backward.
    attention_working = 2 * B * H * S * S * softmax_bytes;
  }
  // o_proj reads the heads' output, laid out again.
  bool shared_o = false;
  adapt("self_attn.o_proj", T, shared_o);
  if (shared_o) kept += T * Q * e;
  kept += norm;  // post-attention
  int64_t mlp_working = 3 * T * F * e;
  if (spec.method == moe::Method::kMixLora) {
    const SiteDispatch& d = dispatch.at("layers." + std::to_string(layer) + ".mlp");
    const auto N = static_cast<int64_t>(static_cast<double>(T) * max_pairs_per_token(spec.router, E));
    const int64_t er = spec.expert_lora.r;
    // Router: its input and selection.
    kept += (copy ? T * D * a : T * D * e) + router_kept(T);
    // Rows per routed pair: the experts' input (shared by gate and up, or copies), gate and up
    // outputs, SiLU's output, the product and the product weighted (the combine keeps it), the
    // down delta's rows and those weighted, three r-wide middles, the rows' indices.
    kept += N * D * (copy ? 2 * a : e) + (pe > 0.0 ? 3 * N * D * (a + 1) : 0);
    kept += 5 * N * F * e + 2 * N * D * a + 3 * N * er * a + 3 * N * 8;
    if (d.mode == moe::DispatchMode::kWeights) kept += E * 3 * er * (D + F) * a;  // the gathered stacks
    mlp_working = 3 * N * F * e;
  } else {
    bool shared_mlp = false;
    adapt("mlp.gate_proj", T, shared_mlp);
    adapt("mlp.up_proj", T, shared_mlp);
    if (shared_mlp) kept += T * D * e;
    // gate and up outputs (SiLU and the product keep them), SiLU's output.
    kept += 3 * T * F * e;
    bool shared_down = false;
    adapt("mlp.down_proj", T, shared_down);
    if (shared_down) kept += T * F * e;
  }
  out.working = std::max(attention_working, mlp_working);
  return out;
}

}  // namespace

MemoryPlan plan_memory(const PlanInput& in) {
  const moe::ModelConfig& c = in.model;
  c.validate();
  MOLE_CHECK(c.num_layers > 0, "the model has no decoder layers");
  const ParallelDims dims(in.world, in.ep, in.zero, in.base_shard);
  in.adapter.validate(c.num_layers);
  for (int64_t experts : in.adapter.experts_per_layer) dims.check_experts(experts);
  MOLE_CHECK(in.micro_batch > 0 && in.seq_len > 0, "micro-batch ", in.micro_batch, " and sequence length ",
             in.seq_len, " must be positive");
  MOLE_CHECK(in.global_batch % (in.micro_batch * in.world) == 0, "train.global_batch (", in.global_batch,
             ") must be a multiple of train.micro_batch x world (", in.micro_batch, " x ", in.world, ")");
  MOLE_CHECK(in.element_bytes == 2 || in.element_bytes == 4 || in.element_bytes == 8,
             "element size ", in.element_bytes, " (allowed: 2, 4, 8)");
  MemoryPlan plan;
  const int64_t e = in.element_bytes;
  const int64_t a = e == 8 ? 8 : 4;
  // One process has no process grid: no ZeRO and a whole base, whatever the config says.
  const int shard = in.world > 1 ? in.base_shard : 0;
  const int zero = in.world > 1 ? in.zero : 0;
  plan.micro_batches = in.global_batch / (in.micro_batch * in.world);
  plan.tokens = in.micro_batch * in.seq_len;
  const int64_t T = plan.tokens;

  // Frozen base: this rank's chunk of every tensor; whole layers while gathered.
  const BaseGroups groups = base_groups(c);
  const auto kept_bytes = [&](int64_t n) { return kept(n, shard) * e; };
  const auto whole_bytes = [&](int64_t n) { return padded(n, shard) * e; };
  for (const auto& layer : groups.layers) plan.base_bytes += sum(layer, kept_bytes);
  plan.base_bytes += sum(groups.embedding, kept_bytes) + sum(groups.head, kept_bytes);
  int64_t layer_max = 0, layers_total = 0;
  for (const auto& layer : groups.layers) {
    layer_max = std::max(layer_max, sum(layer, whole_bytes));
    layers_total += sum(layer, whole_bytes);
  }
  const int64_t embedding = sum(groups.embedding, whole_bytes), head = sum(groups.head, whole_bytes);
  if (shard > 0) {
    // Forward: a layer and the next one in flight; the last layer with the head; backward: a
    // layer and the one below in flight. On the host, freed buffers are pooled for reuse up to
    // two of the largest group (CUDA's caching allocator keeps its own).
    const int64_t schedule = std::max({2 * layer_max, layer_max + head, embedding});
    plan.gathered_bytes = in.cuda ? schedule : std::max(schedule, 2 * std::max({layer_max, head, embedding}));
    const int64_t gathers = 2 * layers_total + embedding + (c.tie_word_embeddings ? 2 * head : head);
    plan.comm["base_allgather_bytes"] = plan.micro_batches * gathers * (shard - 1) / shard;
  }

  // Trainable state, through the optimizer's own accounting.
  const at::ScalarType adapter_dtype = a == 8 ? at::kDouble : at::kFloat;
  const ParameterRegistry registry(trainable_slots(in, adapter_dtype));
  int64_t world_bytes = 0, edp_bytes = 0;
  for (const ParamSlot& s : registry.slots()) {
    (s.group() == ReplicaGroup::kWorld ? world_bytes : edp_bytes) += s.tensor.numel() * a;
  }
  const int edp = dims.edp();
  if (zero > 0) {
    std::vector<FlatLayout> layouts;
    for (ReplicaGroup g : {ReplicaGroup::kWorld, ReplicaGroup::kExpertData}) {
      const int size = g == ReplicaGroup::kWorld ? in.world : edp;
      for (FlatLayout& l : flat_layouts(registry, g, size, 0, std::max<int64_t>(1, in.zero_bucket_bytes / a))) {
        layouts.push_back(std::move(l));
      }
    }
    const OptimizerMemory m = zero_memory(layouts, std::vector<int64_t>(layouts.size(), a), zero);
    plan.trainable_bytes = m.trainable_bytes;
    plan.grad_bytes = m.grad_bytes;
    plan.optimizer_bytes = m.optimizer_bytes;
    int64_t world_padded = 0, edp_padded = 0;
    for (const FlatLayout& l : layouts) (l.group == "world" ? world_padded : edp_padded) += l.padded * a;
    // Stage 2 reduce-scatters every micro-batch; stage 1 all-reduces once per step.
    const int64_t reduces = zero == 2 ? plan.micro_batches : 1;
    const auto rs = [](int64_t bytes, int n) { return n > 1 ? bytes * (n - 1) / n : 0; };
    if (zero == 2) {
      plan.comm["grad_reduce_scatter_bytes"] = reduces * (rs(world_padded, in.world) + rs(edp_padded, edp));
    } else {
      plan.comm["grad_allreduce_bytes"] = 2 * (rs(world_padded, in.world) + rs(edp_padded, edp));
    }
    plan.comm["param_allgather_bytes"] = rs(world_padded, in.world) + rs(edp_padded, edp);
  } else {
    plan.trainable_bytes = world_bytes + edp_bytes;
    plan.grad_bytes = plan.trainable_bytes;
    plan.optimizer_bytes = 2 * plan.trainable_bytes;
    const auto ar = [](int64_t bytes, int n) { return n > 1 ? 2 * bytes * (n - 1) / n : 0; };
    plan.comm["grad_allreduce_bytes"] = ar(world_bytes, in.world) + ar(edp_bytes, edp);
  }

  // Expert parallelism: each site's dispatch as the run would choose it.
  DispatchPlanOptions o;
  o.requested = in.dispatch;
  o.ep = in.ep;
  o.tokens = T;
  o.row_bytes = e;
  o.param_bytes = a;
  plan.dispatch = plan_dispatch(site_infos(in), o);
  std::map<std::string, SiteDispatch> by_site;
  int64_t token_bytes = 0, weight_bytes = 0;
  for (const SiteDispatch& d : plan.dispatch) {
    by_site[d.site] = d;
    if (d.mode == moe::DispatchMode::kTokens) token_bytes += d.token_bytes;
    if (d.mode == moe::DispatchMode::kWeights) weight_bytes += d.weight_bytes;
  }
  if (in.ep > 1) {
    plan.comm["expert_alltoall_bytes"] = plan.micro_batches * token_bytes;
    plan.comm["expert_weight_gather_bytes"] = plan.micro_batches * weight_bytes;
  }

  // Activations of one micro-batch.
  int64_t layers_kept = 0, layer_kept_max = 0, layer_working = 0;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const LayerActivations l = layer_activations(in, i, by_site);
    layers_kept += l.kept;
    layer_kept_max = std::max(layer_kept_max, l.kept);
    layer_working = std::max(layer_working, l.working);
  }
  const int64_t V = c.vocab_size;
  // Final norm's input, the logits, their float32 copy for the loss (bf16), log-softmax's output;
  // in backward the gradients of the log-probabilities and of the logits.
  plan.head_bytes = T * c.hidden_size * a + T * V * e + (e != a ? T * V * a : 0) + T * V * a;
  const int64_t loss_working = 2 * T * V * a;
  plan.layer_kept_bytes = layer_kept_max;
  if (in.activation_checkpointing) {
    // Each layer's input only; backward recomputes one layer at a time.
    plan.layers_kept_bytes = c.num_layers * T * c.hidden_size * e;
    plan.working_bytes = std::max(loss_working + plan.head_bytes, layer_kept_max + layer_working);
    plan.activation_bytes = plan.layers_kept_bytes + plan.working_bytes;
  } else {
    plan.layers_kept_bytes = layers_kept;
    plan.working_bytes = std::max(loss_working, layer_working);
    plan.activation_bytes = plan.layers_kept_bytes + plan.head_bytes + plan.working_bytes;
  }
  plan.total_bytes = plan.base_bytes + plan.gathered_bytes + plan.trainable_bytes + plan.grad_bytes +
                     plan.optimizer_bytes + plan.activation_bytes;
  return plan;
}

}  // namespace mole::parallel
