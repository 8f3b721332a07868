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
  MOLE_CHECK(full.first_expert == 0 && full.num_experts() == shard.total, site,
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

std::vector<MoeSiteInfo> moe_sites(const CausalLM& model) {
  std::vector<MoeSiteInfo> out;
  for (int64_t i = 0; i < model.num_layers(); ++i) {
    const DecoderLayer& layer = model.layer(i);
    if (layer.ffn_site) {
      const FfnMoeSite& s = *layer.ffn_site;
      MoeSiteInfo info;
      info.name = s.name();
      info.ffn_block = true;
      info.num_experts = s.num_experts();
      info.in_features = info.out_features = layer.gate_proj.in_features();
      info.intermediate = layer.gate_proj.out_features();
      info.params_per_expert = lora_params(s.gate()) + lora_params(s.up()) + lora_params(s.down());
      info.experts_held = s.gate().num_experts();
      info.router = s.router_options();
      out.push_back(info);
    }
    for (const auto& [linear, site] : layer.linear_sites) {
      MoeSiteInfo info;
      info.name = site->name();
      info.num_experts = site->num_experts();
      info.in_features = layer.linear(linear).in_features();
      info.out_features = layer.linear(linear).out_features();
      info.params_per_expert = lora_params(site->experts());
      info.experts_held = site->experts().num_experts();
      info.router = site->router_options();
      out.push_back(info);
    }
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
      if (s.gate().num_experts() == s.num_experts()) continue;  // replicated site
      std::vector<at::Tensor> full = dispatcher.gather_experts(
          {s.gate().a_ErI, s.gate().b_EOr, s.up().a_ErI, s.up().b_EOr, s.down().a_ErI,
           s.down().b_EOr},
          s.num_experts());
      s.set_experts(gather_full(s.gate(), {full[0], full[1]}),
                    gather_full(s.up(), {full[2], full[3]}),
                    gather_full(s.down(), {full[4], full[5]}));
    }
    for (auto& [linear, site] : layer.linear_sites) {
      if (site->experts().num_experts() == site->num_experts()) continue;
      std::vector<at::Tensor> full = dispatcher.gather_experts(
          {site->experts().a_ErI, site->experts().b_EOr}, site->num_experts());
      site->set_experts(gather_full(site->experts(), full));
    }
  }
}

std::vector<at::Tensor> sharded_expert_tensors(const CausalLM& model) {
  std::vector<at::Tensor> out;
  auto add = [&out](const ExpertLora& lora, int64_t total) {
    if (lora.num_experts() == total && lora.first_expert == 0) return;
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
