// Expert sharding of a model's MoE sites for expert parallelism (DESIGN.md §4): the sites and
// their shapes, and keeping only the experts a Dispatcher places on this rank. (Which tensors hold
// a shard, and gathering the full stacks for export, is the parameter registry's business:
// parallel/parameter_registry.h.)
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "moe/dispatcher.h"
#include "moe/llama.h"
#include "moe/router.h"

namespace mole::moe {

// One MoE site as the expert-parallel planner sees it.
struct MoeSiteInfo {
  std::string name;        // "layers.0.mlp", "layers.0.self_attn.q_proj"
  bool ffn_block = false;  // MixLoRA's FFN-block site (experts on gate, up and down)
  int64_t num_experts = 0;
  int64_t in_features = 0;    // D of the site's input rows
  int64_t out_features = 0;   // O of its output rows (D for an FFN block)
  int64_t intermediate = 0;   // F of an FFN block, 0 otherwise
  int64_t params_per_expert = 0;  // LoRA parameters of one expert (all its projections)
  RouterOptions router;
};
MoeSiteInfo site_info(const FfnMoeSite& site);
MoeSiteInfo site_info(const LinearMoeSite& site);
std::vector<MoeSiteInfo> moe_sites(const CausalLM& model);  // in layer order

// Replaces every site's full expert stacks by the shard `dispatcher.shard(E)` places here (new
// trainable leaves; the full stacks are dropped). Build the optimizer afterwards.
void shard_experts(CausalLM& model, const Dispatcher& dispatcher);

}  // namespace mole::moe
