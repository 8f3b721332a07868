// What one forward pass carries besides activations: the training flag, the random generator,
// which tokens count for router statistics, and what every MoE site recorded on the way.
//
// Legend: T tokens, E experts.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "moe/aux_losses.h"
#include "moe/dispatcher.h"
#include "moe/router.h"

namespace mole::moe {

// One MoE site's router outcome in one forward pass.
struct SiteRecord {
  std::string site;           // e.g. "layers.0.mlp" or "layers.3.self_attn.q_proj"
  RouterStats stats;          // sums, for load balance / z-loss / entropy loss
  at::Tensor contrastive;     // float32 scalar MoELoRA loss of this site (undefined if off)
};

struct ForwardContext {
  bool training = false;
  std::optional<at::Generator> generator;  // jitter and dropout draws; default generator if unset
  at::Tensor valid_T;  // bool, flattened tokens that count for router statistics (all if undefined)
  // How sites reach experts held by other ranks; null: every expert is local.
  const Dispatcher* dispatcher = nullptr;
  std::vector<SiteRecord> sites;
};

}  // namespace mole::moe
