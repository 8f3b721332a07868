// The seams that sharding builds on, on one process: ParallelDims validation of every key, the
// parameter registry's replica groups and optimizer hints (from the roles the model reports, with
// expert stacks sharded as EP rank 1 of 2 holds them), the BaseWeights brackets around every
// decoder layer, site records kept once per site, and draws that need a generator.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "kernels/check.h"
#include "launch/memory_stats.h"
#include "launch/run_parts.h"
#include "moe/adapter.h"
#include "moe/layer_runner.h"
#include "moe/model_presets.h"
#include "moe/random.h"
#include "parallel/parallel_dims.h"
#include "parallel/parameter_registry.h"
#include "tests/test_util.h"

namespace mole {
namespace {

using test::error_of;

TEST(ParallelDims, EveryKeyIsValidatedOnConstruction) {
  const parallel::ParallelDims dims(8, 2, 1, 4);
  EXPECT_EQ(dims.edp(), 4);
  EXPECT_EQ(dims.zero(), 1);
  EXPECT_EQ(dims.base_shard(), 4);
  EXPECT_NE(error_of([] { parallel::ParallelDims(4, 1, 3); }).find("parallel.zero = 3: allowed values are 0"),
            std::string::npos);
  EXPECT_NE(error_of([] { parallel::ParallelDims(4, 1, -1); }).find("parallel.zero = -1"), std::string::npos);
  EXPECT_NE(error_of([] { parallel::ParallelDims(6, 1, 0, 4); })
                .find("world size 6 is not divisible by parallel.base_shard = 4"),
            std::string::npos);
  EXPECT_NE(error_of([] { parallel::ParallelDims(4, 1, 0, -2); }).find("parallel.base_shard = -2"),
            std::string::npos);
  EXPECT_NE(error_of([] { parallel::ParallelDims(6, 4); }).find("world size 6 is not divisible by parallel.ep = 4"),
            std::string::npos);
  EXPECT_NE(error_of([&] { dims.check_experts(3); }).find("3 experts cannot be split over parallel.ep = 2"),
            std::string::npos);
  EXPECT_NO_THROW(parallel::ParallelDims(4, 4).check_experts(2));  // fewer than ep: replicated
}

std::unique_ptr<moe::CausalLM> tiny_model(moe::Method method,
                                          std::shared_ptr<moe::BaseWeights> weights = nullptr) {
  auto model = std::make_unique<moe::CausalLM>(moe::tiny_model_config(64),
                                               at::TensorOptions(at::kFloat), std::move(weights));
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(3);
  model->init_base_random(3);
  moe::AdapterSpec spec;
  spec.method = method;
  spec.lora = spec.expert_lora = {4, 8.0, false, 0.0};
  spec.experts_per_layer.assign(static_cast<size_t>(model->num_layers()), 4);
  moe::attach_adapter(*model, spec, gen);
  return model;
}

TEST(ParameterRegistry, GroupsAndHintsComeFromTheModelsRoles) {
  auto model = tiny_model(moe::Method::kMixLora);
  const parallel::ParameterRegistry whole(*model, {4.0, 0.1});
  for (const parallel::ParamSlot& s : whole.slots()) {
    EXPECT_EQ(s.group(), parallel::ReplicaGroup::kWorld) << s.name;
    EXPECT_FALSE(s.sharded()) << s.name;
  }
  // Keep experts [2, 4) of every site, as EP rank 1 of 2 does.
  model->for_each_site([](const moe::SiteRef& site) {
    moe::FfnMoeSite& s = *site.ffn;
    s.set_experts(s.gate().slice(2, 2), s.up().slice(2, 2), s.down().slice(2, 2));
  });
  const parallel::ParameterRegistry registry(*model, {4.0, 0.1});
  const auto names = model->trainable_parameters();
  ASSERT_EQ(registry.slots().size(), names.size());
  int experts = 0, routers = 0, lora_b = 0;
  for (size_t i = 0; i < names.size(); ++i) {
    const parallel::ParamSlot& s = registry.slots()[i];
    EXPECT_EQ(s.name, names[i].first);
    EXPECT_TRUE(s.tensor.is_same(names[i].second)) << s.name;
    EXPECT_EQ(s.weight_decay, 0.1);
    const bool b = s.role == moe::TensorRole::kLoraB || s.role == moe::TensorRole::kExpertLoraB;
    EXPECT_EQ(s.lr_scale, b ? 4.0 : 1.0) << s.name;
    lora_b += b;
    if (moe::is_expert_stack(s.role)) {
      ++experts;
      EXPECT_EQ(s.group(), parallel::ReplicaGroup::kExpertData) << s.name;
      EXPECT_EQ(s.global_shape.front(), 4) << s.name;
      EXPECT_EQ(s.tensor.size(0), 2) << s.name;
      EXPECT_EQ(s.first_row, 2) << s.name;
    } else {
      EXPECT_EQ(s.group(), parallel::ReplicaGroup::kWorld) << s.name;
      routers += s.role == moe::TensorRole::kRouter;
    }
  }
  EXPECT_EQ(experts, 4 * 6);  // gate, up, down: A and B, 4 layers
  EXPECT_EQ(routers, 4);
  EXPECT_EQ(lora_b, 4 * 4 + 4 * 3);  // attention LoRA B, expert B stacks
  EXPECT_EQ(registry.tensors(parallel::ReplicaGroup::kExpertData).size(), 24u);
  EXPECT_EQ(registry.global_numel(), whole.global_numel());
  EXPECT_LT(registry.local_numel(), whole.local_numel());
  // Export of a sharded registry needs the EP group.
  EXPECT_NE(error_of([&] { parallel::gather_trainable(registry, nullptr); }).find("is sharded"),
            std::string::npos);
  const auto full = parallel::gather_trainable(whole, nullptr);
  ASSERT_EQ(full.size(), whole.slots().size());
}

// Records every bracket around the use of frozen weights.
class CountingWeights final : public moe::BaseWeights {
 public:
  at::Tensor declare(const std::string& name, int64_t layer, const std::vector<int64_t>& shape,
                     const at::TensorOptions& options) override {
    names.push_back(name);
    return local.declare(name, layer, shape, options);
  }
  void assign(const std::string& name, const at::Tensor& value) override { local.assign(name, value); }
  void acquire(int64_t layer) const override { events.emplace_back("acquire", layer); }
  void release(int64_t layer) const override { events.emplace_back("release", layer); }
  void prefetch(int64_t layer) const override { events.emplace_back("prefetch", layer); }
  void hold(int64_t layer) const override { events.emplace_back("hold", layer); }
  void release_held(int64_t layer) const override { events.emplace_back("release_held", layer); }
  void end_pass() const override { events.emplace_back("end_pass", 0); }
  at::Tensor kept_part(const std::string& name, const at::Tensor& value) const override {
    return local.kept_part(name, value);
  }
  std::pair<int64_t, int64_t> kept_range(const std::string& name) const override { return local.kept_range(name); }
  void assign_kept(const std::string& name, const at::Tensor& part) override { local.assign_kept(name, part); }
  int64_t held_bytes() const override { return local.held_bytes(); }
  void for_each_kept(const std::function<void(const std::string&, const at::Tensor&)>& fn) const override {
    local.for_each_kept(fn);
  }
  moe::LocalBaseWeights local;
  std::vector<std::string> names;
  mutable std::vector<std::pair<std::string, int64_t>> events;
};

TEST(BaseWeights, EveryLayerIsAcquiredAroundItsUse) {
  auto weights = std::make_shared<CountingWeights>();
  auto model = tiny_model(moe::Method::kMixLora, weights);
  std::vector<std::string> base_names;
  model->for_each_base_parameter([&](const std::string& name, const at::Tensor&) { base_names.push_back(name); });
  std::sort(base_names.begin(), base_names.end());
  std::vector<std::string> declared = weights->names;
  std::sort(declared.begin(), declared.end());
  EXPECT_EQ(declared, base_names);
  model->forward(at::randint(0, 64, {1, 6}, at::kLong));
  // The embedding for its lookup, each layer, then the final norm and LM head.
  std::vector<std::pair<std::string, int64_t>> expected = {{"acquire", moe::kEmbeddingGroup},
                                                           {"release", moe::kEmbeddingGroup}};
  for (int64_t i = 0; i < model->num_layers(); ++i) {
    expected.emplace_back("acquire", i);
    expected.emplace_back("release", i);
  }
  expected.emplace_back("acquire", moe::kHeadGroup);
  expected.emplace_back("release", moe::kHeadGroup);
  EXPECT_EQ(weights->events, expected);
}

// A training pass through TrainingLayers tells the weights the order of use: prefetch the next
// layer in forward, keep the LM head and the last layer for backward, and in backward take each
// layer again as its backward starts (letting go of the one above), then end the pass.
TEST(BaseWeights, TrainingLayersScheduleForwardAndBackward) {
  for (const bool checkpoint : {false, true}) {
    auto weights = std::make_shared<CountingWeights>();
    auto model = tiny_model(moe::Method::kMixLora, weights);
    const int64_t L = model->num_layers();
    ASSERT_GE(L, 2);
    moe::ForwardContext ctx;
    ctx.training = true;
    ctx.generator = moe::make_generator(3, at::kCPU);
    {
      moe::TrainingLayers layers(*weights, L, ctx, checkpoint);
      ctx.layer_runner = &layers;
      model->forward(at::randint(0, 64, {1, 6}, at::kLong), ctx).sum().backward();
    }
    const int64_t head = moe::kHeadGroup;
    std::vector<std::pair<std::string, int64_t>> expected = {{"acquire", moe::kEmbeddingGroup},
                                                             {"release", moe::kEmbeddingGroup}};
    for (int64_t i = 0; i < L; ++i) {
      if (i == L - 1) expected.emplace_back("hold", i);
      expected.emplace_back("prefetch", i + 1 < L ? i + 1 : head);
      expected.emplace_back("acquire", i);
      expected.emplace_back("release", i);
      if (i == L - 1) expected.emplace_back("hold", head);
    }
    expected.emplace_back("acquire", head);
    expected.emplace_back("release", head);
    for (int64_t i = L - 1; i >= 0; --i) {
      expected.emplace_back("release_held", i + 1 < L ? i + 1 : head);
      expected.emplace_back("hold", i);
      if (i > 0) expected.emplace_back("prefetch", i - 1);
      if (checkpoint) {  // the recompute, inside the layer's own bracket
        expected.emplace_back("acquire", i);
        expected.emplace_back("acquire", i);
        expected.emplace_back("release", i);
        expected.emplace_back("release", i);
      }
    }
    expected.emplace_back("end_pass", 0);
    EXPECT_EQ(weights->events, expected) << "checkpoint " << checkpoint;
  }
}

TEST(BaseWeights, AssignNamesTheTensor) {
  moe::LocalBaseWeights w;
  w.declare("model.norm.weight", -1, {4}, at::kFloat);
  EXPECT_NE(error_of([&] { w.assign("model.norm.weight", at::ones({5})); }).find("'model.norm.weight': got shape [5]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { w.assign("lm_head.weight", at::ones({4})); }).find("no frozen tensor 'lm_head.weight'"),
            std::string::npos);
  w.assign("model.norm.weight", at::full({4}, 2.0, at::kDouble));
}

// Keeps, of every frozen tensor, the part ShardedBaseWeights gives rank `rank` of `ranks` (chunk
// r of the flattened tensor), with no communication: what a synthetic base draws per rank.
class SliceWeights final : public moe::BaseWeights {
 public:
  SliceWeights(int rank, int ranks) : rank_(rank), ranks_(ranks) {}
  at::Tensor declare(const std::string& name, int64_t, const std::vector<int64_t>& shape,
                     const at::TensorOptions& options) override {
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    const int64_t chunk = (numel + ranks_ - 1) / ranks_;
    const int64_t begin = std::min(numel, rank_ * chunk);
    ranges[name] = {begin, std::min(numel, begin + chunk)};
    parts[name] = at::empty({ranges[name].second - begin}, options);
    return at::empty(shape, options.device(at::kMeta));  // shape only: this test runs no forward
  }
  void assign(const std::string& name, const at::Tensor& value) override {
    assign_kept(name, value.reshape({-1}).narrow(0, ranges.at(name).first, parts.at(name).numel()));
  }
  void assign_kept(const std::string& name, const at::Tensor& part) override { parts.at(name).copy_(part); }
  std::pair<int64_t, int64_t> kept_range(const std::string& name) const override { return ranges.at(name); }
  void acquire(int64_t) const override {}
  void release(int64_t) const override {}
  at::Tensor kept_part(const std::string& name, const at::Tensor& value) const override {
    return value.reshape({-1}).narrow(0, ranges.at(name).first, parts.at(name).numel());
  }
  int64_t held_bytes() const override {
    int64_t bytes = 0;
    for (const auto& [name, t] : parts) bytes += t.numel() * static_cast<int64_t>(t.element_size());
    return bytes;
  }
  void for_each_kept(const std::function<void(const std::string&, const at::Tensor&)>& fn) const override {
    for (const auto& [name, t] : parts) fn(name, t);
  }
  std::map<std::string, std::pair<int64_t, int64_t>> ranges;
  std::map<std::string, at::Tensor> parts;

 private:
  int rank_, ranks_;
};

// A synthetic base drawn part by part: each of 4 "ranks" makes only its chunk of every tensor,
// the chunks put together are the whole model's values bit for bit (so any layout holds the same
// model), and a rank's drawing never holds a whole tensor (the embedding here is 3 draw blocks
// long: peak tensor bytes stay below its size).
TEST(BaseWeights, SyntheticBaseIsDrawnPartByPart) {
  const moe::ModelConfig config = moe::tiny_model_config(24000);  // embedding: 3,072,000 elements
  moe::CausalLM whole(config, at::TensorOptions(at::kFloat));
  whole.init_base_random(11);
  std::map<std::string, at::Tensor> whole_values;
  whole.for_each_base_parameter([&](const std::string& name, const at::Tensor& t) { whole_values[name] = t.reshape({-1}); });
  const int64_t embedding_bytes = config.vocab_size * config.hidden_size * 4;
  ASSERT_GT(config.vocab_size * config.hidden_size, 2 * moe::CausalLM::kInitBlock);

  launch::track_cpu_tensor_bytes();
  std::map<std::string, std::vector<at::Tensor>> pieces;
  for (int rank = 0; rank < 4; ++rank) {
    auto weights = std::make_shared<SliceWeights>(rank, 4);
    moe::CausalLM model(config, at::TensorOptions(at::kFloat), weights);
    const int64_t before = launch::cpu_tensor_bytes();
    launch::reset_peak_cpu_tensor_bytes();
    model.init_base_random(11);
    EXPECT_LT(launch::peak_cpu_tensor_bytes() - before, embedding_bytes) << "rank " << rank;
    for (const auto& [name, part] : weights->parts) pieces[name].push_back(part);
  }
  for (const auto& [name, parts] : pieces) {
    EXPECT_TRUE(at::equal(at::cat(parts), whole_values.at(name))) << name;
  }
}

TEST(ForwardContext, ASiteThatRunsAgainReplacesItsRecord) {
  moe::ForwardContext ctx;
  moe::RouterStats stats;
  stats.num_tokens = 1;
  ctx.record({"layers.0.mlp", stats, {}});
  ctx.record({"layers.1.mlp", stats, {}});
  stats.num_tokens = 7;
  ctx.record({"layers.0.mlp", stats, {}});
  ASSERT_EQ(ctx.sites.size(), 2u);
  EXPECT_EQ(ctx.sites[0].site, "layers.0.mlp");
  EXPECT_EQ(ctx.sites[0].stats.num_tokens, 7);
}

TEST(Random, TrainingDrawsNeedAGenerator) {
  moe::LoraLinear linear(at::randn({6, 5}), at::Tensor());
  linear.set_lora(at::randn({2, 5}), at::randn({6, 2}), 1.0, 0.5, "test");
  const at::Tensor x = at::randn({3, 5});
  EXPECT_NE(error_of([&] { linear.forward(x, true); }).find("LoRA dropout draws random numbers in training but no generator"),
            std::string::npos);
  EXPECT_NO_THROW(linear.forward(x, false));
  // The same generator state gives the same mask.
  at::Generator g1 = moe::make_generator(5, at::kCPU), g2 = moe::make_generator(5, at::kCPU);
  EXPECT_TRUE(at::equal(linear.forward(x, true, g1), linear.forward(x, true, g2)));
  EXPECT_NE(launch::forward_seed(42, 0), launch::forward_seed(42, 1));
  EXPECT_NE(launch::forward_seed(42, 0), 42u);
}

}  // namespace
}  // namespace mole
