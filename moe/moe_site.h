// MoE-LoRA sites (DESIGN.md §3): a router and E LoRA experts attached to base linears that
// share the routing.
//  - FfnMoeSite (MixLoRA): one router per decoder layer; expert e has LoRA on gate, up and down.
//    The frozen W_g x and W_u x run once per token; because W_d is linear,
//    sum_e w_e W_d h_e = W_d (sum_e w_e h_e), so the frozen down projection also runs once per
//    token, on the weighted sum of the experts' hidden states.
//  - LinearMoeSite (MoLA, DynMoLE, MoELoRA): a router per adapted linear; only the LoRA deltas
//    are routed: y = W x + sum_e w_e s B_e A_e x.
// Both group routed rows by expert (kernels/permute.h) and run grouped LoRA over the segments.
//
// Legend: T tokens, D hidden, F intermediate, I/O linear in/out, E experts, r rank, N pairs.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "moe/dispatcher.h"
#include "moe/forward_context.h"
#include "moe/lora_linear.h"
#include "moe/router.h"

namespace mole::moe {

// The LoRA of a site's experts on one projection, stacked: all E of them, or under expert
// parallelism the shard this rank holds (global ids [first_expert, first_expert + e)).
struct ExpertLora {
  at::Tensor a_ErI;  // float32, trainable; [e, r, I] for a shard
  at::Tensor b_EOr;  // float32, trainable; [e, O, r] for a shard
  double scale = 1.0;
  double dropout = 0.0;
  int64_t first_expert = 0;

  int64_t num_experts() const { return a_ErI.size(0); }  // experts stacked here
  // True when the stack holds every expert of a site with `total` experts (not a shard).
  bool holds_all(int64_t total) const { return first_expert == 0 && num_experts() == total; }
  // The experts [first, first + count) of this (full) stack as new trainable leaves.
  ExpertLora slice(int64_t first, int64_t count) const;
  // The same LoRA with other (e.g. gathered) stacks; scale and dropout kept.
  ExpertLora with_stacks(at::Tensor a_ErI, at::Tensor b_EOr, int64_t first) const;
  // A kaiming-uniform (bound 1/sqrt(I)), B zero, from `gen`; `options`' dtype (float32 or
  // float64, see precision.h) and device.
  static ExpertLora init(int64_t num_experts, int64_t in, int64_t out, const LoraOptions& lora,
                         const at::TensorOptions& options, const at::Generator& gen);
  // Validates shapes against (E, in, out), copies to `options`' dtype and device, marks trainable.
  static ExpertLora from(const at::Tensor& a_ErI, const at::Tensor& b_EOr, int64_t in, int64_t out,
                         double scale, double dropout, const at::TensorOptions& options,
                         const std::string& what);
};

struct ContrastiveOptions {
  double coef = 0.0;  // 0: off
  double temperature = 0.07;
  int64_t max_samples = 64;  // expert outputs per site entering the loss
};

class FfnMoeSite {
 public:
  FfnMoeSite(std::string name, at::Tensor router_ED, ExpertLora gate, ExpertLora up, ExpertLora down,
             RouterOptions router);

  // x_TD -> y_TD for the FFN block with base projections `gate`, `up`, `down` (their own plain
  // LoRA, if any, is ignored: the experts carry the LoRA). Records router stats in `ctx`.
  at::Tensor forward(const at::Tensor& x_TD, const LoraLinear& gate, const LoraLinear& up,
                     const LoraLinear& down, ForwardContext& ctx) const;

  const std::string& name() const { return name_; }
  int64_t num_experts() const { return router_ED_.size(0); }
  const RouterOptions& router_options() const { return router_; }
  const at::Tensor& router_weight() const { return router_ED_; }
  const ExpertLora& gate() const { return gate_; }
  const ExpertLora& up() const { return up_; }
  const ExpertLora& down() const { return down_; }
  // Replaces the expert stacks (sharding for expert parallelism, gathering before export).
  void set_experts(ExpertLora gate, ExpertLora up, ExpertLora down);

 private:
  // The shared-base computation with the stacks of every expert (local and weights modes).
  at::Tensor forward_shared_base(const at::Tensor& x_TD, const kernels::PermutePlan& plan,
                                 const at::Tensor& weight_N, const ExpertLora& gate_lora,
                                 const ExpertLora& up_lora, const ExpertLora& down_lora,
                                 const LoraLinear& gate, const LoraLinear& up,
                                 const LoraLinear& down, const ForwardContext& ctx) const;
  // Tokens mode: each rank runs the whole expert FFN (frozen base included) on the rows its
  // experts receive.
  at::Tensor forward_tokens(const at::Tensor& x_TD, const kernels::PermutePlan& plan,
                            const at::Tensor& weight_N, const LoraLinear& gate,
                            const LoraLinear& up, const LoraLinear& down,
                            const Dispatcher& dispatcher, const ForwardContext& ctx) const;

  std::string name_;
  at::Tensor router_ED_;  // float32, trainable
  ExpertLora gate_, up_, down_;
  RouterOptions router_;
};

class LinearMoeSite {
 public:
  LinearMoeSite(std::string name, at::Tensor router_EI, ExpertLora experts, RouterOptions router,
                ContrastiveOptions contrastive = {});

  // The routed LoRA delta for x_TI, float32 [T, O]. Records router stats (and the contrastive
  // loss when enabled) in `ctx`.
  at::Tensor delta(const at::Tensor& x_TI, ForwardContext& ctx) const;

  const std::string& name() const { return name_; }
  int64_t num_experts() const { return router_EI_.size(0); }
  const RouterOptions& router_options() const { return router_; }
  const at::Tensor& router_weight() const { return router_EI_; }
  const ExpertLora& experts() const { return experts_; }
  void set_experts(ExpertLora experts);

 private:
  std::string name_;
  at::Tensor router_EI_;  // float32, trainable
  ExpertLora experts_;
  RouterOptions router_;
  ContrastiveOptions contrastive_;
};

}  // namespace mole::moe
