// Expert sharding of MoE sites (see expert_shard.h).
#include "moe/expert_shard.h"

#include <ATen/ATen.h>

#include "kernels/check.h"

namespace mole::moe {
namespace {

int64_t lora_params(const ExpertLora& lora) {
  return lora.a_ErI[0].numel() + lora.b_EOr[0].numel();
}

ExpertLora keep_shard(const ExpertLora& full, const ExpertShard& shard, const std::string& site) {
  MOLE_CHECK(full.holds_all(shard.total), site,
             ": expected the full stack of ", shard.total, " experts before sharding, found ",
             full.num_experts(), " from expert ", full.first_expert);
  return full.slice(shard.first, shard.count);
}

ExpertLora gather_full(const ExpertLora& held, const std::vector<at::Tensor>& full) {
  ExpertLora out = held.with_stacks(full[0].detach().clone(), full[1].detach().clone(), 0);
  out.a_ErI.requires_grad_(true);
  out.b_EOr.requires_grad_(true);
  return out;
}

}  // namespace

MoeSiteInfo site_info(const FfnMoeSite& site) {
  MoeSiteInfo info;
  info.name = site.name();
  info.ffn_block = true;
  info.num_experts = site.num_experts();
  info.in_features = info.out_features = site.gate().a_ErI.size(2);
  info.intermediate = site.gate().b_EOr.size(1);
  info.params_per_expert =
      lora_params(site.gate()) + lora_params(site.up()) + lora_params(site.down());
  info.router = site.router_options();
  return info;
}

MoeSiteInfo site_info(const LinearMoeSite& site) {
  MoeSiteInfo info;
  info.name = site.name();
  info.num_experts = site.num_experts();
  info.in_features = site.experts().a_ErI.size(2);
  info.out_features = site.experts().b_EOr.size(1);
  info.params_per_expert = lora_params(site.experts());
  info.router = site.router_options();
  return info;
}

std::vector<MoeSiteInfo> moe_sites(const CausalLM& model) {
  std::vector<MoeSiteInfo> out;
  for (int64_t i = 0; i < model.num_layers(); ++i) {
    const DecoderLayer& layer = model.layer(i);
    if (layer.ffn_site) out.push_back(site_info(*layer.ffn_site));
    for (const auto& [linear, site] : layer.linear_sites) out.push_back(site_info(*site));
  }
  return out;
}

void shard_experts(CausalLM& model, const Dispatcher& dispatcher) {
  for (int64_t i = 0; i < model.num_layers(); ++i) {
    DecoderLayer& layer = model.layer(i);
    if (layer.ffn_site) {
      FfnMoeSite& s = *layer.ffn_site;
      const ExpertShard shard = dispatcher.shard(s.num_experts());
      s.set_experts(keep_shard(s.gate(), shard, s.name()), keep_shard(s.up(), shard, s.name()),
                    keep_shard(s.down(), shard, s.name()));
    }
    for (auto& [linear, site] : layer.linear_sites) {
      const ExpertShard shard = dispatcher.shard(site->num_experts());
      site->set_experts(keep_shard(site->experts(), shard, site->name()));
    }
  }
}

void unshard_experts(CausalLM& model, const Dispatcher& dispatcher) {
  at::NoGradGuard no_grad;
  for (int64_t i = 0; i < model.num_layers(); ++i) {
    DecoderLayer& layer = model.layer(i);
    if (layer.ffn_site) {
      FfnMoeSite& s = *layer.ffn_site;
      if (s.gate().holds_all(s.num_experts())) continue;  // replicated site
      std::vector<at::Tensor> full = dispatcher.gather_experts(
          {s.gate().a_ErI, s.gate().b_EOr, s.up().a_ErI, s.up().b_EOr, s.down().a_ErI,
           s.down().b_EOr},
          s.num_experts());
      s.set_experts(gather_full(s.gate(), {full[0], full[1]}),
                    gather_full(s.up(), {full[2], full[3]}),
                    gather_full(s.down(), {full[4], full[5]}));
    }
    for (auto& [linear, site] : layer.linear_sites) {
      if (site->experts().holds_all(site->num_experts())) continue;
      std::vector<at::Tensor> full = dispatcher.gather_experts(
          {site->experts().a_ErI, site->experts().b_EOr}, site->num_experts());
      site->set_experts(gather_full(site->experts(), full));
    }
  }
}

std::vector<at::Tensor> sharded_expert_tensors(const CausalLM& model) {
  std::vector<at::Tensor> out;
  auto add = [&out](const ExpertLora& lora, int64_t total) {
    if (lora.holds_all(total)) return;
    out.push_back(lora.a_ErI);
    out.push_back(lora.b_EOr);
  };
  for (int64_t i = 0; i < model.num_layers(); ++i) {
    const DecoderLayer& layer = model.layer(i);
    if (layer.ffn_site) {
      const FfnMoeSite& s = *layer.ffn_site;
      for (const ExpertLora* lora : {&s.gate(), &s.up(), &s.down()}) add(*lora, s.num_experts());
    }
    for (const auto& [linear, site] : layer.linear_sites) add(site->experts(), site->num_experts());
  }
  return out;
}

}  // namespace mole::moe
