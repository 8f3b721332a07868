// The ZeRO optimizer against the unsharded one on this job's ranks, without a model: the same
// trainable tensors (dense ones over the world, expert-like shards over the EDP group when the
// world splits into EP 2), the same per-rank gradients from two backward passes per step
// (accumulation), three steps with clipping, LoRA+-style multipliers and weight decay. Stage 1 and
// stage 2 (gradient-accumulator hooks, buckets reduced during backward) train the same tensors
// and see the same gradient norms as stage 0, in float64 to 1e-12 relative. One tensor is large
// enough that its slice spans several collective chunks (on up to 2 ranks), the small ones share
// buckets, and the flat buffers need padding. Then the error when a second backward() runs
// without end_backward() between them.
#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "parallel/optimizer.h"
#include "parallel/process_grid.h"
#include "tests/dist/dist_test_util.h"

namespace mole::dist::test {
namespace {

constexpr double kTol = 1e-12;
constexpr int kSteps = 3;

// name, global shape, sharded over EP (rows split), lr multiplier, weight decay
struct SlotSpec {
  std::string name;
  std::vector<int64_t> shape;
  bool sharded;
  double lr_scale, weight_decay;
};

std::vector<SlotSpec> specs() {
  return {{"a.lora_A", {7, 33}, false, 1.0, 0.1},
          {"a.lora_B", {33, 7}, false, 16.0, 0.1},
          // 1.2 M elements: on 1 or 2 ranks a slice of more than one chunk of the collectives
          // (512 K elements per peer).
          {"big.lora_A", {1200, 1000}, false, 1.0, 0.0},
          {"router", {5, 13}, false, 1.0, 0.0},
          {"experts.lora_A", {4, 3, 29}, true, 1.0, 0.1},
          {"experts.lora_B", {4, 29, 3}, true, 16.0, 0.1}};
}

// This rank's tensors (expert shards: rows of EP rank `ep_rank` of `ep`), each element a
// function of its global index so that every layout starts from the same global values.
std::vector<parallel::ParamSlot> make_slots(int ep, int ep_rank) {
  std::vector<parallel::ParamSlot> slots;
  for (const SlotSpec& s : specs()) {
    parallel::ParamSlot slot;
    slot.name = s.name;
    slot.global_shape = s.shape;
    std::vector<int64_t> shape = s.shape;
    if (s.sharded && ep > 1) {
      shape[0] /= ep;
      slot.first_row = shape[0] * ep_rank;
    }
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    const int64_t row = numel / shape[0];
    slot.tensor = (at::arange(slot.first_row * row, slot.first_row * row + numel, at::kDouble) * 0.61)
                      .sin().mul(0.1).view(shape).requires_grad_(true);
    slot.lr_scale = s.lr_scale;
    slot.weight_decay = s.weight_decay;
    slots.push_back(std::move(slot));
  }
  return slots;
}

// Trains `kSteps` steps with ZeRO stage `zero` and returns every tensor gathered whole (expert
// shards over the EP group), then the gradient norms of the steps.
std::pair<std::vector<moe::NamedTensor>, std::vector<double>> train(int ep, int zero) {
  std::shared_ptr<Communicator> comm = test_comm(world());
  auto grid = std::make_shared<parallel::ProcessGrid>(
      parallel::ParallelSizes{comm->size(), ep, zero, 0}, comm);
  parallel::ParameterRegistry registry(make_slots(ep, grid->ep_rank()));
  std::unique_ptr<parallel::Optimizer> optimizer =
      parallel::make_optimizer(registry, grid.get(), parallel::AdamWOptions{}, int64_t{1} << 20);
  std::vector<double> norms;
  for (int step = 0; step < kSteps; ++step) {
    for (int pass = 0; pass < 2; ++pass) {
      // Per rank, step and pass: loss = sum of tensor * coefficients, so the gradient is the
      // coefficients (drawn from the global index, the rank and the pass).
      at::Tensor loss = at::zeros({}, at::kDouble);
      for (const parallel::ParamSlot& s : registry.slots()) {
        const int64_t row = s.tensor.numel() / s.tensor.size(0);
        at::Tensor index = at::arange(s.first_row * row, s.first_row * row + s.tensor.numel(), at::kDouble);
        // Kept away from zero: stage 2 adds the passes after reducing them, a different summation
        // order, and AdamW would turn the rounding of a near-zero sum into a visible step.
        at::Tensor coeff =
            (index * 1.3 + 7.0 * comm->rank() + 3.0 * pass + 11.0 * step).cos().add(1.5).view_as(s.tensor);
        loss = loss + (s.tensor * coeff).sum();
      }
      loss.backward();
      optimizer->end_backward();
    }
    optimizer->reduce_gradients();
    const double norm = optimizer->grad_norm();
    norms.push_back(norm);
    optimizer->clip(0.5 * norm, norm);  // always clips
    optimizer->step(1e-2);
    optimizer->zero_grad();
  }
  return {parallel::gather_trainable(registry, ep > 1 ? &grid->ep() : nullptr), norms};
}

class ZeroOptimizer : public ::testing::TestWithParam<int> {};

TEST_P(ZeroOptimizer, StagesOneAndTwoTrainWhatStageZeroTrains) {
  const int ep = GetParam();
  if (world().size() % ep != 0) GTEST_SKIP() << "ep " << ep << " does not divide the world";
  const auto [want, want_norms] = train(ep, 0);
  const std::vector<parallel::ParamSlot> start = make_slots(1, 0);  // whole tensors
  for (size_t i = 0; i < want.size(); ++i) {
    // Training moved every tensor: the comparison below is not of the starting values.
    EXPECT_GT((want[i].second - start[i].tensor.detach()).abs().max().item<double>(), 1e-4) << want[i].first;
  }
  for (int zero : {1, 2}) {
    const auto [got, norms] = train(ep, zero);
    ASSERT_EQ(got.size(), want.size());
    for (int step = 0; step < kSteps; ++step) {
      EXPECT_NEAR(norms[step], want_norms[step], kTol * want_norms[step]) << "zero " << zero << " step " << step;
    }
    for (size_t i = 0; i < want.size(); ++i) {
      const double scale = want[i].second.abs().max().item<double>();
      EXPECT_LE((got[i].second - want[i].second).abs().max().item<double>(), kTol * scale)
          << "zero " << zero << ": " << want[i].first;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Ep, ZeroOptimizer, ::testing::Values(1, 2),
                         [](const ::testing::TestParamInfo<int>& p) { return "ep" + std::to_string(p.param); });

TEST(ZeroOptimizerErrors, SecondBackwardWithoutEndBackwardIsAnError) {
  std::shared_ptr<Communicator> comm = test_comm(world());
  auto grid = std::make_shared<parallel::ProcessGrid>(parallel::ParallelSizes{comm->size(), 1, 2, 0}, comm);
  parallel::ParameterRegistry registry(make_slots(1, 0));
  std::unique_ptr<parallel::Optimizer> optimizer =
      parallel::make_optimizer(registry, grid.get(), parallel::AdamWOptions{}, int64_t{1} << 30);
  const auto loss = [&] {
    at::Tensor l = at::zeros({}, at::kDouble);
    for (const parallel::ParamSlot& s : registry.slots()) l = l + s.tensor.sum();
    return l;
  };
  loss().backward();  // one bucket: complete, so sent during this backward
  EXPECT_ERROR_CONTAINS(loss().backward(), "call Optimizer::end_backward() after each backward()");
  optimizer->end_backward();
  optimizer->reduce_gradients();
  // Only the first pass counts: every element's gradient is 1 on every rank, so the norm of the
  // sum is sqrt(numel) * world.
  const double numel = static_cast<double>(registry.local_numel());
  EXPECT_NEAR(optimizer->grad_norm(), std::sqrt(numel) * comm->size(), 1e-9 * numel);
  optimizer->zero_grad();
}

}  // namespace
}  // namespace mole::dist::test
