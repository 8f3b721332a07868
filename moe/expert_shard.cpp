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
  model.for_each_site([&out](const SiteRef& site) {
    out.push_back(site.ffn ? site_info(*site.ffn) : site_info(*site.linear));
  });
  return out;
}

void shard_experts(CausalLM& model, const Dispatcher& dispatcher) {
  model.for_each_site([&dispatcher](const SiteRef& site) {
    if (site.ffn) {
      FfnMoeSite& s = *site.ffn;
      const ExpertShard shard = dispatcher.shard(s.num_experts());
      s.set_experts(keep_shard(s.gate(), shard, s.name()), keep_shard(s.up(), shard, s.name()),
                    keep_shard(s.down(), shard, s.name()));
    } else {
      LinearMoeSite& s = *site.linear;
      s.set_experts(keep_shard(s.experts(), dispatcher.shard(s.num_experts()), s.name()));
    }
  });
}

}  // namespace mole::moe
