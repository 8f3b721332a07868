// The gradient of the one global-batch loss does not depend on how the experts are sharded: on
// this job's ranks, the first step's reduced gradients of every trainable tensor (expert stacks
// gathered under their global expert ids, routers and attention LoRA as they are) are the same
// for parallel.ep = 1 (every rank holds every expert) and for every other EP size that divides
// the world, at the same global batch and seed. An EP-dependent scaling of the expert gradients
// (DeepSpeed #5618: expert gradients averaged over the EDP group while dense ones are averaged
// over the world) shows here as a factor of ep. MixLoRA in token and weight mode, and MoLA with a
// layer of fewer experts than EP ranks (replicated, reduced over the world). float64, relative to
// each tensor's largest element.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "launch/data.h"
#include "launch/run_parts.h"
#include "launch/train_step.h"
#include "parallel/process_grid.h"
#include "tests/dist/dist_test_util.h"

namespace mole::dist::test {
namespace {

// float64, the layouts differing only in summation order (observed about 1e-15).
constexpr double kTol = 1e-12;

struct StepGradients {
  double loss = 0.0;
  std::vector<moe::NamedTensor> grads;  // every trainable tensor whole, in registry order
};

// One accumulate_gradients() of the tiny synthetic model on this job's ranks with parallel.ep =
// `ep` and the `--set` style `sets`; then the reduced gradients gathered whole.
StepGradients first_step(int ep, const std::vector<std::string>& sets) {
  std::shared_ptr<Communicator> comm = test_comm(world());
  std::vector<std::string> all = sets;
  all.push_back("parallel.ep=" + std::to_string(ep));
  launch::Config config = launch::parse_config(
      "model: {base: 'synthetic:tiny', dtype: fp64}\n"
      "adapter: {method: mixlora, r: 4, alpha: 8, dropout: 0.0, experts: 4, router: {top_k: 2}}\n"
      "data: {train: 'synthetic:multitask', eval: '', seq_len: 32, synthetic_examples: 64}\n"
      "train: {steps: 1, micro_batch: 2, global_batch: 8, seed: 11}\n",
      "expert-gradients.yaml", all);
  auto grid = std::make_shared<parallel::ProcessGrid>(
      parallel::ParallelSizes{comm->size(), ep, 0, 0}, comm);
  launch::RunParts run = launch::build_run(config, grid);
  // LoRA B starts at zero, which leaves every A without a gradient: give every trainable element
  // a value from its global index instead, so every gradient is non-zero.
  {
    at::NoGradGuard no_grad;
    for (const parallel::ParamSlot& s : run.registry->slots()) {
      const int64_t row = s.tensor.numel() / std::max<int64_t>(1, s.tensor.size(0));
      at::Tensor index = at::arange(s.first_row * row, s.first_row * row + s.tensor.numel(),
                                    s.tensor.options());
      s.tensor.detach().copy_((index * 0.37).sin().mul(0.05).view_as(s.tensor));
    }
  }
  StepGradients out;
  out.loss = launch::accumulate_gradients(run, launch::StepCounters{}).loss;
  std::vector<parallel::ParamSlot> slots = run.registry->slots();
  for (parallel::ParamSlot& s : slots) {
    EXPECT_TRUE(s.tensor.grad().defined()) << s.name << " has no gradient";
    s.tensor = s.tensor.grad().defined() ? s.tensor.grad() : at::zeros_like(s.tensor);
  }
  out.grads = parallel::gather_trainable(parallel::ParameterRegistry(std::move(slots)),
                                         ep > 1 ? &grid->ep() : nullptr);
  return out;
}

// The worst relative error over every tensor, with the tensor that has it.
void expect_same_gradients(const StepGradients& got, const StepGradients& want, const std::string& what) {
  EXPECT_NEAR(got.loss, want.loss, kTol * std::abs(want.loss)) << what;
  ASSERT_EQ(got.grads.size(), want.grads.size()) << what;
  int experts_compared = 0;
  for (size_t i = 0; i < want.grads.size(); ++i) {
    const auto& [name, w] = want.grads[i];
    const at::Tensor& g = got.grads[i].second;
    ASSERT_EQ(got.grads[i].first, name) << what;
    ASSERT_EQ(g.sizes(), w.sizes()) << what << ": " << name;
    const double scale = w.abs().max().item<double>();
    ASSERT_GT(scale, 0.0) << what << ": the gradient of " << name << " is zero";
    EXPECT_LE((g - w).abs().max().item<double>() / scale, kTol) << what << ": " << name;
    if (name.find("experts") != std::string::npos) ++experts_compared;
  }
  EXPECT_GT(experts_compared, 0) << what << ": no expert tensor among the gradients";
}

class ExpertGradients : public ::testing::Test {
 protected:
  void SetUp() override {
    if (world().size() == 1) GTEST_SKIP() << "needs 2 or more ranks (one rank has only ep = 1)";
  }
  // Every EP size above 1 that divides the world against ep = 1.
  void check(const std::vector<std::string>& sets, const std::string& what) {
    const StepGradients ref = first_step(1, sets);
    for (int ep = 2; ep <= world().size(); ++ep) {
      if (world().size() % ep != 0) continue;
      expect_same_gradients(first_step(ep, sets), ref, what + ", ep " + std::to_string(ep));
    }
  }
};

TEST_F(ExpertGradients, MixLoraTokenDispatchMatchesEp1) {
  check({"parallel.dispatch=tokens"}, "mixlora tokens");
}

TEST_F(ExpertGradients, MixLoraWeightGatherMatchesEp1) {
  check({"parallel.dispatch=weights"}, "mixlora weights");
}

TEST_F(ExpertGradients, MolaWithAReplicatedLayerMatchesEp1) {
  check({"adapter.method=mola", "adapter.experts=2,4,4,8", "parallel.dispatch=tokens"},
        "mola 2,4,4,8");
}

// ZeRO-2 reduces during backward: right after each micro-batch's backward() no trainable tensor
// holds a gradient any more (hooks took every one to its bucket, and small buckets went out
// while backward ran), and the reduced gradient's norm equals the unsharded optimizer's, for
// EP 1 and the largest EP dividing the world (world and EDP buckets), with accumulation.
double zero_step_norm(int ep, int zero) {
  std::shared_ptr<Communicator> comm = test_comm(world());
  launch::Config config = launch::parse_config(
      "model: {base: 'synthetic:tiny', dtype: fp64}\n"
      "adapter: {method: mixlora, r: 4, alpha: 8, dropout: 0.0, experts: 4, router: {top_k: 2},\n"
      "          aux_loss_coef: 0.0}\n"
      "data: {train: 'synthetic:multitask', eval: '', seq_len: 32, synthetic_examples: 64}\n"
      "train: {steps: 1, micro_batch: 1, global_batch: 8, seed: 11}\n"
      "parallel: {dispatch: tokens, zero_bucket_mib: 0.01}\n",
      "zero-gradients.yaml", {"parallel.ep=" + std::to_string(ep), "parallel.zero=" + std::to_string(zero)});
  auto grid = std::make_shared<parallel::ProcessGrid>(
      parallel::ParallelSizes{comm->size(), ep, zero, 0}, comm);
  launch::RunParts run = launch::build_run(config, grid);
  if (zero == 2) {
    // 0.01 MiB buckets: several per group.
    EXPECT_GT(run.optimizer->flat_layouts().size(), 4u);
  }
  launch::StepBatch batch = run.loader->next();
  EXPECT_GT(batch.micro_batches.size(), 1u);
  for (const launch::MicroBatch& mb : batch.micro_batches) {
    moe::ForwardContext ctx;
    ctx.training = true;
    ctx.generator = run.forward_gen;
    ctx.valid_T = mb.valid_BS.reshape({-1});
    ctx.dispatcher = run.moe_dispatcher();
    at::Tensor logits = run.model->forward(mb.input_ids_BS, ctx);
    (moe::causal_lm_loss_sum(logits, mb.labels_BS).sum /
     static_cast<double>(batch.global_target_tokens)).backward();
    if (zero == 2) {
      for (const parallel::ParamSlot& s : run.registry->slots()) {
        EXPECT_FALSE(s.tensor.grad().defined()) << s.name << " still holds its gradient after backward";
      }
    }
    run.optimizer->end_backward();
  }
  run.optimizer->reduce_gradients();
  return run.optimizer->grad_norm();
}

TEST_F(ExpertGradients, ZeroStage2ReducesDuringBackward) {
  for (int ep : {1, world().size()}) {
    const double want = zero_step_norm(ep, 0);
    ASSERT_GT(want, 0.0);
    EXPECT_NEAR(zero_step_norm(ep, 2), want, kTol * want) << "ep " << ep;
    EXPECT_NEAR(zero_step_norm(ep, 1), want, kTol * want) << "ep " << ep;
  }
}

}  // namespace
}  // namespace mole::dist::test
