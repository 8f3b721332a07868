// What one forward pass carries besides activations: the training flag, the generator of its
// random draws, which tokens count for router statistics, how sites reach remote experts, how
// decoder layers are run, and what every MoE site recorded on the way.
//
// Legend: T tokens, E experts, B batch, S sequence, D hidden.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
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

// The seam before each decoder layer: how the model runs layer `layer` on its input h_BSD.
// Without a runner the model calls `body` directly. A runner may call `body` again later (e.g.
// activation checkpointing recomputes it in backward); `body` is safe to re-run: the site records
// it makes replace the earlier ones, and its random draws come from ForwardContext::generator
// (a recompute that must reproduce them restores the generator's state first). `body` refers to
// the ForwardContext, which must outlive every call of it.
using LayerBody = std::function<at::Tensor(const at::Tensor& h_BSD)>;
class LayerRunner {
 public:
  virtual ~LayerRunner() = default;
  virtual at::Tensor run(int64_t layer, const at::Tensor& h_BSD, const LayerBody& body) const = 0;
};

struct ForwardContext {
  bool training = false;
  // Every random draw of the pass (LoRA dropout, router jitter) comes from this generator, on the
  // model's device. A training pass that needs a draw and has none is an error.
  std::optional<at::Generator> generator;
  // bool, flattened tokens that count for router statistics (all if undefined). Best kept on
  // the host: the sites then count it without a device -> host sync.
  at::Tensor valid_T;
  // How sites reach experts held by other ranks; null: every expert is local.
  const Dispatcher* dispatcher = nullptr;
  // How decoder layers are run; null: directly.
  const LayerRunner* layer_runner = nullptr;
  // One record per MoE site, in the order the sites first ran.
  std::vector<SiteRecord> sites;

  // Stores a site's record once per pass: a site that runs again (a recomputed layer) replaces
  // its record instead of adding a second one.
  void record(SiteRecord record);
};

}  // namespace mole::moe
