// What adapter a model carries (plain LoRA or one of the MoE-LoRA methods), how to attach a
// freshly initialised one, and how the routers' auxiliary losses add up over sites.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "moe/forward_context.h"
#include "moe/llama.h"
#include "moe/moe_site.h"
#include "moe/router.h"

namespace mole::moe {

// lora | mixlora | mola | dynmole | moelora | loramoe (the last from MoE-PEFT imports).
enum class Method { kLora, kMixLora, kMola, kDynMole, kMoeLora, kLoraMoe };
Method parse_method(const std::string& name);  // throws naming the allowed values
const char* method_name(Method method);

struct AuxLossOptions {
  double load_balance_coef = 0.01;
  double z_loss_coef = 0.0;
  double entropy_coef = 0.0;  // DynMoLE's Tsallis entropy loss
  ContrastiveOptions contrastive;  // MoELoRA
  // false: load balance per site, then the mean over sites (default). true: the stats of all
  // sites summed first, as MoE-PEFT does by concatenating every layer's router logits (needs the
  // same expert count at every site).
  bool balance_over_all_sites = false;
};

struct AdapterSpec {
  Method method = Method::kLora;
  LoraOptions lora;         // plain LoRA (attention projections of MixLoRA, all targets of lora)
  LoraOptions expert_lora;  // the experts' LoRA
  std::vector<std::string> target_modules = {"q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"};
  // Per-linear methods: the targets that get a router and experts; the others get plain LoRA.
  // Empty: every target. (LoRAMoE routes only the MLP projections.)
  std::vector<std::string> routed_modules;
  std::vector<int64_t> experts_per_layer;  // resolved allocation, one count per layer
  RouterOptions router;
  double router_init_range = 0.02;  // router weights ~ N(0, range)
  AuxLossOptions aux;

  bool is_moe() const { return method != Method::kLora; }
  // Checks the targets and the allocation against `num_layers`; throws naming the key.
  void validate(int64_t num_layers) const;
};

// Checks target_modules names (every entry a linear mole adapts, not empty; mixlora needs all
// three FFN projections); errors start with `what` (the key or the file that holds the list).
void check_target_modules(const std::vector<std::string>& targets, Method method,
                          const std::string& what);

// Attaches fresh adapter weights (LoRA A kaiming-uniform, B zero, routers N(0, range)) to every
// target linear of `model` according to `spec`.
void attach_adapter(CausalLM& model, const AdapterSpec& spec, const at::Generator& gen);

// Each auxiliary loss already multiplied by its coefficient; undefined when off. `total` is their
// sum (a float32 zero when all are off).
struct AuxLosses {
  at::Tensor load_balance;
  at::Tensor z_loss;
  at::Tensor entropy;
  at::Tensor contrastive;
  at::Tensor total;
};
// The element-wise sum of a tensor over the data-parallel ranks (no gradient), supplied by the
// caller that knows about ranks; empty on one rank.
using SumOverRanks = std::function<at::Tensor(const at::Tensor&)>;

// With `sum_over_ranks`, the router statistics of every site are summed over the ranks of the
// micro-batch step before any loss is formed (global-batch load balancing): each rank then holds
// the loss of the whole step, differentiable through its own tokens only, so that summing the
// ranks' gradients gives the gradient of that one loss. One packed collective per call.
AuxLosses aux_losses(const ForwardContext& ctx, const AuxLossOptions& options,
                     const SumOverRanks& sum_over_ranks = {});

}  // namespace mole::moe
