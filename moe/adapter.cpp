// Adapter description, fresh attachment, and the aux-loss sum (see adapter.h).
#include "moe/adapter.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "kernels/check.h"
#include "moe/aux_losses.h"
#include "moe/precision.h"

namespace mole::moe {
namespace {

const std::vector<std::pair<Method, const char*>>& method_names() {
  static const std::vector<std::pair<Method, const char*>> names = {
      {Method::kLora, "lora"},       {Method::kMixLora, "mixlora"}, {Method::kMola, "mola"},
      {Method::kDynMole, "dynmole"}, {Method::kMoeLora, "moelora"}, {Method::kLoraMoe, "loramoe"}};
  return names;
}

bool contains(const std::vector<std::string>& list, const std::string& item) {
  return std::find(list.begin(), list.end(), item) != list.end();
}

at::Tensor router_init(int64_t experts, int64_t in, double range, const at::TensorOptions& options,
                       const at::Generator& gen) {
  // float32 draws (float64 for a float64 adapter: CPU-independent, see init_base_random).
  at::Tensor w = at::empty({experts, in}, options.dtype() == at::kDouble ? at::kDouble : at::kFloat);
  w.normal_(0.0, range, gen);
  return w.to(options).requires_grad_(true);
}

}  // namespace

Method parse_method(const std::string& name) {
  for (const auto& [method, text] : method_names()) {
    if (name == text) return method;
  }
  MOLE_FAIL("unknown adapter method '", name, "' (allowed: lora, mixlora, mola, dynmole, moelora)");
}

const char* method_name(Method method) {
  for (const auto& [m, text] : method_names()) {
    if (m == method) return text;
  }
  return "?";
}

void check_target_modules(const std::vector<std::string>& targets, Method method,
                          const std::string& what) {
  MOLE_CHECK(!targets.empty(), what, " is empty");
  for (const std::string& t : targets) {
    bool known = false;
    for (const std::string& name : linear_names()) known = known || short_name(name) == t;
    MOLE_CHECK(known, what, ": unknown module '", t, "' (allowed: ", target_names_text(), ")");
  }
  if (method != Method::kMixLora) return;
  for (const char* mlp : {"gate_proj", "up_proj", "down_proj"}) {
    MOLE_CHECK(contains(targets, mlp), what, " lacks '", mlp,
               "': mixlora experts adapt gate_proj, up_proj and down_proj together");
  }
}

void AdapterSpec::validate(int64_t num_layers) const {
  check_target_modules(target_modules, method, "adapter.target_modules");
  for (const std::string& t : routed_modules) {
    MOLE_CHECK(contains(target_modules, t), "routed module '", t, "' is not a target module");
  }
  if (!is_moe()) return;
  MOLE_CHECK(static_cast<int64_t>(experts_per_layer.size()) == num_layers, "adapter.experts: ",
             experts_per_layer.size(), " per-layer counts for a model of ", num_layers, " layers");
  for (int64_t e : experts_per_layer) router.validate(e);
}

void attach_adapter(CausalLM& model, const AdapterSpec& spec, const at::Generator& gen) {
  spec.validate(model.num_layers());
  const at::TensorOptions device = model.options().dtype(
      adapter_dtype(model.options().dtype().toScalarType()));  // adapter dtype, model device
  for (int64_t i = 0; i < model.num_layers(); ++i) {
    DecoderLayer& layer = model.layer(i);
    const std::string prefix = "layers." + std::to_string(i) + ".";
    const int64_t experts = spec.is_moe() ? spec.experts_per_layer[static_cast<size_t>(i)] : 0;
    for (const std::string& name : linear_names()) {
      const std::string target = short_name(name);
      if (!contains(spec.target_modules, target)) continue;
      LoraLinear& linear = layer.linear(name);
      const bool in_mlp = name.rfind("mlp.", 0) == 0;
      if (spec.method == Method::kMixLora && in_mlp) continue;  // carried by the FFN site
      const bool routed = spec.is_moe() && spec.method != Method::kMixLora &&
                          (spec.routed_modules.empty() || contains(spec.routed_modules, target));
      if (!routed) {
        linear.init_lora(spec.lora, gen);
        continue;
      }
      ContrastiveOptions contrastive;  // off unless MoELoRA
      if (spec.method == Method::kMoeLora) contrastive = spec.aux.contrastive;
      layer.linear_sites[name] = std::make_unique<LinearMoeSite>(
          prefix + name,
          router_init(experts, linear.in_features(), spec.router_init_range, device, gen),
          ExpertLora::init(experts, linear.in_features(), linear.out_features(), spec.expert_lora,
                           device, gen),
          spec.router, contrastive);
    }
    if (spec.method == Method::kMixLora) {
      const int64_t D = layer.gate_proj.in_features(), F = layer.gate_proj.out_features();
      layer.ffn_site = std::make_unique<FfnMoeSite>(
          prefix + "mlp", router_init(experts, D, spec.router_init_range, device, gen),
          ExpertLora::init(experts, D, F, spec.expert_lora, device, gen),
          ExpertLora::init(experts, D, F, spec.expert_lora, device, gen),
          ExpertLora::init(experts, F, D, spec.expert_lora, device, gen), spec.router);
    }
  }
}

namespace {

// Replaces every site's statistics by their sum over the ranks, keeping the gradient path through
// this rank's own contribution: global = local + (sum of all ranks - local), the bracket detached.
std::vector<RouterStats> sum_stats_over_ranks(std::vector<RouterStats> stats,
                                              const SumOverRanks& sum_over_ranks) {
  std::vector<at::Tensor> parts;
  for (const RouterStats& s : stats) {
    parts.push_back(s.pairs_E.detach().to(at::kDouble));
    parts.push_back(s.prob_sum_E.detach().to(at::kDouble));
    parts.push_back(at::stack({s.z_sum.detach().to(at::kDouble), s.entropy_sum.detach().to(at::kDouble),
                               at::scalar_tensor(static_cast<double>(s.num_pairs), at::kDouble)
                                   .to(s.z_sum.device()),
                               at::scalar_tensor(static_cast<double>(s.num_tokens), at::kDouble)
                                   .to(s.z_sum.device())}));
  }
  // Sync point: one collective for every site, then the counts back on the host.
  at::Tensor total = sum_over_ranks(at::cat(parts)).cpu();
  int64_t offset = 0;
  auto take = [&](int64_t n) {
    at::Tensor t = total.narrow(0, offset, n);
    offset += n;
    return t;
  };
  for (RouterStats& s : stats) {
    const int64_t E = s.pairs_E.size(0);
    const at::TensorOptions f32 = s.prob_sum_E.options();
    s.pairs_E = take(E).to(f32);
    at::Tensor prob_all = take(E).to(f32);
    s.prob_sum_E = s.prob_sum_E + (prob_all - s.prob_sum_E.detach());
    at::Tensor rest = take(4);
    s.z_sum = s.z_sum + (rest[0].to(f32) - s.z_sum.detach());
    s.entropy_sum = s.entropy_sum + (rest[1].to(f32) - s.entropy_sum.detach());
    s.num_pairs = static_cast<int64_t>(std::llround(rest[2].item<double>()));
    s.num_tokens = static_cast<int64_t>(std::llround(rest[3].item<double>()));
  }
  return stats;
}

}  // namespace

AuxLosses aux_losses(const ForwardContext& ctx, const AuxLossOptions& options,
                     const SumOverRanks& sum_over_ranks) {
  AuxLosses out;
  out.total = at::zeros({}, at::kFloat);
  if (ctx.sites.empty()) return out;
  const at::TensorOptions f32 = ctx.sites.front().stats.prob_sum_E.options();  // stats' dtype
  out.total = out.total.to(f32);
  std::vector<RouterStats> stats;
  for (const SiteRecord& site : ctx.sites) stats.push_back(site.stats);
  if (sum_over_ranks) stats = sum_stats_over_ranks(std::move(stats), sum_over_ranks);
  const double num_sites = static_cast<double>(stats.size());

  if (options.load_balance_coef > 0.0) {
    at::Tensor lb;
    if (options.balance_over_all_sites) {
      RouterStats sum = stats.front();
      for (size_t i = 1; i < stats.size(); ++i) {
        MOLE_CHECK(stats[i].prob_sum_E.size(0) == sum.prob_sum_E.size(0),
                   "balance_over_all_sites needs the same expert count at every site; ",
                   ctx.sites[i].site, " has ", stats[i].prob_sum_E.size(0), ", ",
                   ctx.sites.front().site, " has ", sum.prob_sum_E.size(0));
        sum = sum + stats[i];
      }
      lb = load_balance_loss(sum);
    } else {
      lb = at::zeros({}, f32);
      for (const RouterStats& s : stats) lb = lb + load_balance_loss(s);
      lb = lb / num_sites;
    }
    out.load_balance = lb * options.load_balance_coef;
  }
  if (options.z_loss_coef > 0.0) {
    at::Tensor z = at::zeros({}, f32);
    for (const RouterStats& s : stats) z = z + z_loss(s);
    out.z_loss = z / num_sites * options.z_loss_coef;
  }
  if (options.entropy_coef > 0.0) {
    at::Tensor h = at::zeros({}, f32);
    for (const RouterStats& s : stats) h = h + entropy_loss(s);
    out.entropy = h / num_sites * options.entropy_coef;
  }
  if (options.contrastive.coef > 0.0) {
    // Sampled per rank: not summed over ranks (each rank's sample is its own).
    at::Tensor c = at::zeros({}, f32);
    int64_t n = 0;
    for (const SiteRecord& site : ctx.sites) {
      if (!site.contrastive.defined()) continue;
      c = c + site.contrastive;
      ++n;
    }
    if (n > 0) out.contrastive = c / static_cast<double>(n) * options.contrastive.coef;
  }
  for (const at::Tensor& part : {out.load_balance, out.z_loss, out.entropy, out.contrastive}) {
    if (part.defined()) out.total = out.total + part;
  }
  return out;
}

}  // namespace mole::moe
