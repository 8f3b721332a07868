// Adapter description, fresh attachment, and the aux-loss sum (see adapter.h).
#include "moe/adapter.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "kernels/check.h"
#include "moe/aux_losses.h"

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

std::string short_name(const std::string& linear_name) {
  return linear_name.substr(linear_name.find('.') + 1);
}

at::Tensor router_init(int64_t experts, int64_t in, double range, const at::Device& device,
                       const at::Generator& gen) {
  at::Tensor w = at::empty({experts, in}, at::kFloat);
  w.normal_(0.0, range, gen);
  return w.to(device).requires_grad_(true);
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

void AdapterSpec::validate(int64_t num_layers) const {
  static const std::vector<std::string> known = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};
  MOLE_CHECK(!target_modules.empty(), "adapter.target_modules is empty");
  for (const std::string& t : target_modules) {
    MOLE_CHECK(contains(known, t), "adapter.target_modules: unknown module '", t,
               "' (allowed: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)");
  }
  for (const std::string& t : routed_modules) {
    MOLE_CHECK(contains(target_modules, t), "routed module '", t, "' is not a target module");
  }
  if (!is_moe()) return;
  MOLE_CHECK(static_cast<int64_t>(experts_per_layer.size()) == num_layers, "adapter.experts: ",
             experts_per_layer.size(), " per-layer counts for a model of ", num_layers, " layers");
  for (int64_t e : experts_per_layer) router.validate(e);
  if (method == Method::kMixLora) {
    for (const char* mlp : {"gate_proj", "up_proj", "down_proj"}) {
      MOLE_CHECK(contains(target_modules, mlp), "mixlora needs '", mlp,
                 "' in adapter.target_modules (its experts adapt the whole FFN block)");
    }
  }
}

void attach_adapter(CausalLM& model, const AdapterSpec& spec, const at::Generator& gen) {
  spec.validate(model.num_layers());
  const at::Device device = model.options().device();
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

AuxLosses aux_losses(const ForwardContext& ctx, const AuxLossOptions& options) {
  AuxLosses out;
  out.total = at::zeros({}, at::kFloat);
  if (ctx.sites.empty()) return out;
  const at::Device device = ctx.sites.front().stats.prob_sum_E.device();
  out.total = out.total.to(device);
  const double num_sites = static_cast<double>(ctx.sites.size());

  if (options.load_balance_coef > 0.0) {
    at::Tensor lb;
    if (options.balance_over_all_sites) {
      RouterStats sum = ctx.sites.front().stats;
      for (size_t i = 1; i < ctx.sites.size(); ++i) {
        MOLE_CHECK(ctx.sites[i].stats.prob_sum_E.size(0) == sum.prob_sum_E.size(0),
                   "balance_over_all_sites needs the same expert count at every site; ",
                   ctx.sites[i].site, " has ", ctx.sites[i].stats.prob_sum_E.size(0), ", ",
                   ctx.sites.front().site, " has ", sum.prob_sum_E.size(0));
        sum = sum + ctx.sites[i].stats;
      }
      lb = load_balance_loss(sum);
    } else {
      lb = at::zeros({}, at::TensorOptions(at::kFloat).device(device));
      for (const SiteRecord& site : ctx.sites) lb = lb + load_balance_loss(site.stats);
      lb = lb / num_sites;
    }
    out.load_balance = lb * options.load_balance_coef;
  }
  if (options.z_loss_coef > 0.0) {
    at::Tensor z = at::zeros({}, at::TensorOptions(at::kFloat).device(device));
    for (const SiteRecord& site : ctx.sites) z = z + z_loss(site.stats);
    out.z_loss = z / num_sites * options.z_loss_coef;
  }
  if (options.entropy_coef > 0.0) {
    at::Tensor h = at::zeros({}, at::TensorOptions(at::kFloat).device(device));
    for (const SiteRecord& site : ctx.sites) h = h + entropy_loss(site.stats);
    out.entropy = h / num_sites * options.entropy_coef;
  }
  if (options.contrastive.coef > 0.0) {
    at::Tensor c = at::zeros({}, at::TensorOptions(at::kFloat).device(device));
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

std::vector<std::pair<std::string, std::vector<double>>> expert_loads(const ForwardContext& ctx) {
  std::vector<std::pair<std::string, std::vector<double>>> out;
  for (const SiteRecord& site : ctx.sites) {
    // Device -> host copy of E numbers per site.
    at::Tensor pairs = site.stats.pairs_E.detach().to(at::kCPU, at::kDouble);
    const double total = std::max<double>(1.0, static_cast<double>(site.stats.num_pairs));
    std::vector<double> loads(static_cast<size_t>(pairs.size(0)));
    for (int64_t e = 0; e < pairs.size(0); ++e) loads[static_cast<size_t>(e)] = pairs[e].item<double>() / total;
    out.emplace_back(site.site, std::move(loads));
  }
  return out;
}

}  // namespace mole::moe
