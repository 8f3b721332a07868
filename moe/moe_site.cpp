// MoE-LoRA sites (see moe_site.h).
#include "moe/moe_site.h"

#include <ATen/ATen.h>

#include <cmath>

#include "kernels/check.h"
#include "kernels/grouped_lora.h"
#include "kernels/permute.h"
#include "moe/aux_losses.h"

namespace mole::moe {
namespace {

at::Tensor trainable_copy(const at::Tensor& t, const at::TensorOptions& options) {
  return t.detach().to(options, false, true).requires_grad_(true);
}

// Dropout on the LoRA input of every routed row (each (token, expert) pair draws its own mask,
// as calling each expert separately would).
at::Tensor lora_input(const at::Tensor& rows, at::ScalarType dtype, double dropout, bool training) {
  at::Tensor x = rows.to(dtype);
  return training && dropout > 0.0 ? at::dropout(x, dropout, /*train=*/true) : x;
}

at::Tensor expert_delta(const at::Tensor& rows_NI, const ExpertLora& lora,
                        const kernels::PermutePlan& plan, bool training) {
  return kernels::grouped_lora(lora_input(rows_NI, lora.a_ErI.scalar_type(), lora.dropout, training),
                               lora.a_ErI, lora.b_EOr,
                               plan.counts, lora.scale);
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
  return ExpertLora{trainable_copy(a_ErI, opts), trainable_copy(b_EOr, opts), scale, dropout};
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

at::Tensor FfnMoeSite::forward(const at::Tensor& x_TD, const LoraLinear& gate, const LoraLinear& up,
                               const LoraLinear& down, ForwardContext& ctx) const {
  check_input(x_TD, router_ED_.size(1), name_);
  RouterOutput routed = run_router(x_TD, router_ED_, router_, ctx);
  const Routing& r = routed.routing;
  ctx.sites.push_back({name_, router_stats(routed, ctx.valid_T, router_.entropy_q), {}});
  kernels::PermutePlan plan =
      kernels::make_permute_plan(r.token_N, r.expert_N, x_TD.size(0), num_experts());

  // Frozen gate and up projections once per token, then gathered per routed pair.
  at::Tensor base_gate_NF = kernels::permute_rows(gate.forward_base(x_TD), plan);
  at::Tensor base_up_NF = kernels::permute_rows(up.forward_base(x_TD), plan);
  at::Tensor x_ND = kernels::permute_rows(x_TD, plan);
  at::Tensor gate_NF = base_gate_NF + expert_delta(x_ND, gate_, plan, ctx.training).to(x_TD.scalar_type());
  at::Tensor up_NF = base_up_NF + expert_delta(x_ND, up_, plan, ctx.training).to(x_TD.scalar_type());
  at::Tensor h_NF = at::silu(gate_NF) * up_NF;

  // y = sum_e w_e (W_d h_e + s B_e A_e h_e) = W_d (sum_e w_e h_e) + sum_e w_e s B_e A_e h_e:
  // the frozen down projection runs once per token.
  at::Tensor h_TF = kernels::unpermute_combine(h_NF, plan, r.weight_N);
  at::Tensor lora_down_TD =
      kernels::unpermute_combine(expert_delta(h_NF, down_, plan, ctx.training), plan, r.weight_N);
  return down.forward_base(h_TF) + lora_down_TD.to(x_TD.scalar_type());
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

at::Tensor LinearMoeSite::delta(const at::Tensor& x_TI, ForwardContext& ctx) const {
  check_input(x_TI, router_EI_.size(1), name_);
  RouterOutput routed = run_router(x_TI, router_EI_, router_, ctx);
  const Routing& r = routed.routing;
  SiteRecord record{name_, router_stats(routed, ctx.valid_T, router_.entropy_q), {}};
  kernels::PermutePlan plan =
      kernels::make_permute_plan(r.token_N, r.expert_N, x_TI.size(0), num_experts());
  at::Tensor rows_NO =
      expert_delta(kernels::permute_rows(x_TI, plan), experts_, plan, ctx.training);
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
  ctx.sites.push_back(std::move(record));
  return kernels::unpermute_combine(rows_NO, plan, r.weight_N);
}

}  // namespace mole::moe
