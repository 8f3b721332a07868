// MoE-LoRA sites (see moe_site.h).
#include "moe/moe_site.h"

#include <ATen/ATen.h>

#include <cmath>

#include "kernels/check.h"
#include "kernels/grouped_lora.h"
#include "kernels/permute.h"
#include "moe/aux_losses.h"
#include "moe/precision.h"
#include "moe/random.h"

namespace mole::moe {
namespace {

at::Tensor trainable_copy(const at::Tensor& t, const at::TensorOptions& options) {
  return t.detach().to(options, false, true).requires_grad_(true);
}

// Dropout on the LoRA input of every routed row in training, from the pass's generator (each
// (token, expert) pair draws its own mask, as calling each expert separately would). bf16 rows
// stay bf16: grouped_lora reads them with the float32 weights (lora_compute_dtype).
at::Tensor lora_input(const at::Tensor& rows, at::ScalarType weight_dtype, double p,
                      const ForwardContext& ctx) {
  at::Tensor x = rows.to(lora_compute_dtype(rows.scalar_type(), weight_dtype));
  if (!ctx.training || p == 0.0) return x;
  return dropout(x, p, require_generator(ctx.generator, "expert LoRA dropout"));
}

// rows_NI grouped by expert with `counts` rows for each expert of `lora`'s stack.
at::Tensor expert_delta(const at::Tensor& rows_NI, const ExpertLora& lora,
                        const std::vector<int64_t>& counts, const ForwardContext& ctx) {
  return kernels::grouped_lora(lora_input(rows_NI, lora.a_ErI.scalar_type(), lora.dropout, ctx),
                               lora.a_ErI, lora.b_EOr, counts, lora.scale);
}

// The site's mode, after checking that the stacks it holds are the ones the dispatcher places
// here.
DispatchMode site_mode(const ForwardContext& ctx, const std::string& site, const ExpertLora& lora,
                       int64_t num_experts) {
  if (ctx.dispatcher == nullptr) {
    MOLE_CHECK(lora.holds_all(num_experts), site, ": holds ",
               lora.num_experts(), " of its ", num_experts,
               " experts but no dispatcher reaches the others");
    return DispatchMode::kLocal;
  }
  const ExpertShard shard = ctx.dispatcher->shard(num_experts);
  MOLE_CHECK(lora.first_expert == shard.first && lora.num_experts() == shard.count, site,
             ": holds experts [", lora.first_expert, ", ", lora.first_expert + lora.num_experts(),
             ") but the dispatcher places [", shard.first, ", ", shard.first + shard.count,
             ") of ", num_experts, " here");
  const DispatchMode mode = ctx.dispatcher->mode(site);
  MOLE_CHECK(mode != DispatchMode::kLocal || shard.is_full(), site,
             ": local mode needs every expert here");
  return mode;
}

RouterOutput run_router(const at::Tensor& x_TD, const at::Tensor& router_ED,
                        const RouterOptions& options, const ForwardContext& ctx) {
  return route(router_logits(x_TD, router_ED, options.jitter_noise, ctx.training, ctx.generator),
               options);
}

void check_input(const at::Tensor& x, int64_t features, const std::string& site) {
  MOLE_CHECK(x.dim() == 2 && x.size(1) == features, site, ": expected input [T, ", features,
             "], got ", x.sizes());
}

}  // namespace

ExpertLora ExpertLora::init(int64_t num_experts, int64_t in, int64_t out, const LoraOptions& lora,
                            const at::TensorOptions& options, const at::Generator& gen) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  at::Tensor a = at::empty({num_experts, lora.r, in}, at::kFloat);
  a.uniform_(-bound, bound, gen);
  return from(a, at::zeros({num_experts, out, lora.r}), in, out, lora.scale(), lora.dropout,
              options, "initialised experts");
}

ExpertLora ExpertLora::from(const at::Tensor& a_ErI, const at::Tensor& b_EOr, int64_t in,
                            int64_t out, double scale, double dropout,
                            const at::TensorOptions& options, const std::string& what) {
  MOLE_CHECK(a_ErI.dim() == 3 && a_ErI.size(2) == in, what, ": expert lora_A must be [E, r, ", in,
             "], got ", a_ErI.sizes());
  MOLE_CHECK(b_EOr.dim() == 3 && b_EOr.size(1) == out, what, ": expert lora_B must be [E, ", out,
             ", r], got ", b_EOr.sizes());
  MOLE_CHECK(a_ErI.size(0) == b_EOr.size(0) && a_ErI.size(1) == b_EOr.size(2), what,
             ": expert lora_A ", a_ErI.sizes(), " and lora_B ", b_EOr.sizes(), " do not pair");
  MOLE_CHECK(dropout >= 0.0 && dropout < 1.0, what, ": dropout must be in [0, 1), got ", dropout);
  const at::TensorOptions opts =
      options.dtype(options.has_dtype() ? options.dtype().toScalarType() : at::kFloat);
  return ExpertLora{trainable_copy(a_ErI, opts), trainable_copy(b_EOr, opts), scale, dropout, 0};
}

ExpertLora ExpertLora::slice(int64_t first, int64_t count) const {
  MOLE_CHECK(first >= 0 && count >= 0 && first + count <= num_experts(), "expert slice [", first,
             ", ", first + count, ") outside a stack of ", num_experts());
  const at::TensorOptions opts = a_ErI.options();
  return ExpertLora{trainable_copy(a_ErI.narrow(0, first, count), opts),
                    trainable_copy(b_EOr.narrow(0, first, count), opts), scale, dropout,
                    first_expert + first};
}

ExpertLora ExpertLora::with_stacks(at::Tensor a, at::Tensor b, int64_t first) const {
  MOLE_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) &&
                 a.sizes().slice(1) == a_ErI.sizes().slice(1) &&
                 b.sizes().slice(1) == b_EOr.sizes().slice(1),
             "expert stacks ", a.sizes(), " and ", b.sizes(), " do not match ", a_ErI.sizes(),
             " and ", b_EOr.sizes());
  return ExpertLora{std::move(a), std::move(b), scale, dropout, first};
}

FfnMoeSite::FfnMoeSite(std::string name, at::Tensor router_ED, ExpertLora gate, ExpertLora up,
                       ExpertLora down, RouterOptions router)
    : name_(std::move(name)),
      router_ED_(std::move(router_ED)),
      gate_(std::move(gate)),
      up_(std::move(up)),
      down_(std::move(down)),
      router_(router) {
  const int64_t E = router_ED_.size(0);
  MOLE_CHECK(gate_.num_experts() == E && up_.num_experts() == E && down_.num_experts() == E, name_,
             ": router has ", E, " experts but the expert LoRA stacks have ", gate_.num_experts(),
             "/", up_.num_experts(), "/", down_.num_experts());
  router_.validate(E);
}

void FfnMoeSite::set_experts(ExpertLora gate, ExpertLora up, ExpertLora down) {
  MOLE_CHECK(gate.num_experts() == up.num_experts() && up.num_experts() == down.num_experts() &&
                 gate.first_expert == up.first_expert && up.first_expert == down.first_expert,
             name_, ": gate/up/down expert stacks differ");
  gate_ = std::move(gate);
  up_ = std::move(up);
  down_ = std::move(down);
}

at::Tensor FfnMoeSite::forward(const at::Tensor& x_TD, const LoraLinear& gate, const LoraLinear& up,
                               const LoraLinear& down, ForwardContext& ctx) const {
  check_input(x_TD, router_ED_.size(1), name_);
  const DispatchMode mode = site_mode(ctx, name_, gate_, num_experts());
  RouterOutput routed = run_router(x_TD, router_ED_, router_, ctx);
  const Routing& r = routed.routing;
  ctx.record({name_, router_stats(routed, ctx.valid_T, router_.entropy_q), {}});
  kernels::PermutePlan plan =
      kernels::make_permute_plan(r.token_N, r.expert_N, x_TD.size(0), num_experts());
  switch (mode) {
    case DispatchMode::kTokens:
      return forward_tokens(x_TD, plan, r.weight_N, gate, up, down, *ctx.dispatcher, ctx);
    case DispatchMode::kWeights: {
      std::vector<at::Tensor> all = ctx.dispatcher->gather_experts(
          {gate_.a_ErI, gate_.b_EOr, up_.a_ErI, up_.b_EOr, down_.a_ErI, down_.b_EOr},
          num_experts());
      return forward_shared_base(x_TD, plan, r.weight_N, gate_.with_stacks(all[0], all[1], 0),
                                 up_.with_stacks(all[2], all[3], 0),
                                 down_.with_stacks(all[4], all[5], 0), gate, up, down,
                                 ctx);
    }
    case DispatchMode::kLocal:
      break;
  }
  return forward_shared_base(x_TD, plan, r.weight_N, gate_, up_, down_, gate, up, down,
                             ctx);
}

at::Tensor FfnMoeSite::forward_shared_base(const at::Tensor& x_TD, const kernels::PermutePlan& plan,
                                           const at::Tensor& weight_N, const ExpertLora& gate_lora,
                                           const ExpertLora& up_lora, const ExpertLora& down_lora,
                                           const LoraLinear& gate, const LoraLinear& up,
                                           const LoraLinear& down, const ForwardContext& ctx) const {
  // Frozen gate and up projections once per token, then gathered per routed pair.
  at::Tensor base_gate_NF = kernels::permute_rows(gate.forward_base(x_TD), plan);
  at::Tensor base_up_NF = kernels::permute_rows(up.forward_base(x_TD), plan);
  at::Tensor x_ND = kernels::permute_rows(x_TD, plan);
  const at::ScalarType dtype = x_TD.scalar_type();
  at::Tensor gate_NF = base_gate_NF + expert_delta(x_ND, gate_lora, plan.counts, ctx).to(dtype);
  at::Tensor up_NF = base_up_NF + expert_delta(x_ND, up_lora, plan.counts, ctx).to(dtype);
  at::Tensor h_NF = at::silu(gate_NF) * up_NF;

  // y = sum_e w_e (W_d h_e + s B_e A_e h_e) = W_d (sum_e w_e h_e) + sum_e w_e s B_e A_e h_e:
  // the frozen down projection runs once per token.
  at::Tensor h_TF = kernels::unpermute_combine(h_NF, plan, weight_N);
  at::Tensor lora_down_TD = kernels::unpermute_combine(
      expert_delta(h_NF, down_lora, plan.counts, ctx), plan, weight_N);
  return down.forward_base(h_TF) + lora_down_TD.to(dtype);
}

at::Tensor FfnMoeSite::forward_tokens(const at::Tensor& x_TD, const kernels::PermutePlan& plan,
                                      const at::Tensor& weight_N, const LoraLinear& gate,
                                      const LoraLinear& up, const LoraLinear& down,
                                      const Dispatcher& dispatcher, const ForwardContext& ctx) const {
  Dispatched in = dispatcher.dispatch(x_TD, plan);
  const at::Tensor& x_RD = in.rows_RD;
  const at::ScalarType dtype = x_TD.scalar_type();
  // The whole expert FFN per received row: the frozen projections run once per routed pair.
  at::Tensor gate_RF = gate.forward_base(x_RD) + expert_delta(x_RD, gate_, in.counts(), ctx).to(dtype);
  at::Tensor up_RF = up.forward_base(x_RD) + expert_delta(x_RD, up_, in.counts(), ctx).to(dtype);
  at::Tensor h_RF = at::silu(gate_RF) * up_RF;
  at::Tensor y_RD = down.forward_base(h_RF) + expert_delta(h_RF, down_, in.counts(), ctx).to(dtype);
  return dispatcher.combine(y_RD, *in.handle, weight_N);
}

LinearMoeSite::LinearMoeSite(std::string name, at::Tensor router_EI, ExpertLora experts,
                             RouterOptions router, ContrastiveOptions contrastive)
    : name_(std::move(name)),
      router_EI_(std::move(router_EI)),
      experts_(std::move(experts)),
      router_(router),
      contrastive_(contrastive) {
  MOLE_CHECK(experts_.num_experts() == router_EI_.size(0), name_, ": router has ",
             router_EI_.size(0), " experts but the expert LoRA stack has ", experts_.num_experts());
  router_.validate(router_EI_.size(0));
}

void LinearMoeSite::set_experts(ExpertLora experts) { experts_ = std::move(experts); }

at::Tensor LinearMoeSite::delta(const at::Tensor& x_TI, ForwardContext& ctx) const {
  check_input(x_TI, router_EI_.size(1), name_);
  const DispatchMode mode = site_mode(ctx, name_, experts_, num_experts());
  RouterOutput routed = run_router(x_TI, router_EI_, router_, ctx);
  const Routing& r = routed.routing;
  SiteRecord record{name_, router_stats(routed, ctx.valid_T, router_.entropy_q), {}};
  kernels::PermutePlan plan =
      kernels::make_permute_plan(r.token_N, r.expert_N, x_TI.size(0), num_experts());
  at::Tensor rows_NO;  // one LoRA delta per routed pair, in plan order
  if (mode == DispatchMode::kTokens) {
    Dispatched in = ctx.dispatcher->dispatch(x_TI, plan);
    rows_NO = ctx.dispatcher->return_rows(
        expert_delta(in.rows_RD, experts_, in.counts(), ctx), *in.handle);
  } else {
    ExpertLora experts = experts_;
    if (mode == DispatchMode::kWeights) {
      std::vector<at::Tensor> all =
          ctx.dispatcher->gather_experts({experts_.a_ErI, experts_.b_EOr}, num_experts());
      experts = experts_.with_stacks(all[0], all[1], 0);
    }
    rows_NO = expert_delta(kernels::permute_rows(x_TI, plan), experts, plan.counts, ctx);
  }
  if (contrastive_.coef > 0.0 && ctx.training) {
    // A bounded, evenly strided sample of the expert outputs (sorted by expert).
    const int64_t n = rows_NO.size(0);
    const int64_t m = std::min(n, contrastive_.max_samples);
    at::Tensor pick = at::linspace(0, std::max<int64_t>(n - 1, 0), m, at::kDouble)
                          .round()
                          .to(at::kLong)
                          .to(rows_NO.device());
    at::Tensor expert_sorted = r.expert_N.index_select(0, plan.order_N);
    record.contrastive = contrastive_loss(rows_NO.index_select(0, pick),
                                          expert_sorted.index_select(0, pick.to(expert_sorted.device())),
                                          contrastive_.temperature);
  }
  ctx.record(std::move(record));
  return kernels::unpermute_combine(rows_NO, plan, r.weight_N);
}

}  // namespace mole::moe
