// The unsharded optimizer: gradient reduction over each replica group, then AdamW (see
// optimizer.h).
#include "parallel/optimizer.h"

#include <ATen/ATen.h>

#include "kernels/check.h"
#include "parallel/gradient_reduction.h"
#include "parallel/process_grid.h"
#include "parallel/zero_optimizer.h"

namespace mole::parallel {
namespace {

std::vector<AdamWParam> adamw_params(const ParameterRegistry& registry) {
  std::vector<AdamWParam> params;
  for (const ParamSlot& s : registry.slots()) {
    params.push_back({s.name, s.tensor, s.lr_scale, s.weight_decay});
  }
  return params;
}

class ReplicatedAdamW final : public Optimizer {
 public:
  ReplicatedAdamW(const ParameterRegistry& registry, const ProcessGrid* grid,
                  const AdamWOptions& options)
      : registry_(registry), grid_(grid), adam_(adamw_params(registry), options) {
    if (grid_) reducer_ = std::make_unique<GradientReducer>(*grid_, registry);
  }

  void reduce_gradients() override {
    if (reducer_) reducer_->reduce();
  }
  double grad_norm() const override {
    return reducer_ ? reducer_->global_norm() : global_grad_norm(registry_.tensors());
  }
  void clip(double max_norm, double norm) override {
    clip_grad_norm(registry_.tensors(), max_norm, norm);
  }
  void step(double lr) override { adam_.step(lr); }
  OptimizerMemory memory() const override {
    OptimizerMemory m;
    for (const ParamSlot& s : registry_.slots()) {
      const int64_t bytes = s.tensor.numel() * static_cast<int64_t>(s.tensor.element_size());
      m.trainable_bytes += bytes;
      m.grad_bytes += bytes;
      m.optimizer_bytes += 2 * bytes;
    }
    return m;
  }
  void zero_grad() override { adam_.zero_grad(); }

  OptimizerState state() const override {
    OptimizerState s;
    s.steps = adam_.steps_taken();
    for (size_t i = 0; i < adam_.params().size(); ++i) {
      s.slots.push_back({adam_.params()[i].name, adam_.exp_avg(i).detach().clone(),
                         adam_.exp_avg_sq(i).detach().clone()});
    }
    return s;
  }
  void load_state(const OptimizerState& state) override {
    const auto& params = adam_.params();
    MOLE_CHECK(state.slots.size() == params.size(), "optimizer state holds ", state.slots.size(),
               " tensors but the optimizer has ", params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      MOLE_CHECK(state.slots[i].name == params[i].name, "optimizer state tensor ", i, " is '",
                 state.slots[i].name, "', expected '", params[i].name, "'");
      adam_.restore(i, state.slots[i].exp_avg, state.slots[i].exp_avg_sq);
    }
    adam_.set_steps_taken(state.steps);
  }
  const ParameterRegistry& registry() const override { return registry_; }

  std::vector<StatePiece> state_pieces() const override {
    std::vector<StatePiece> out;
    for (size_t i = 0; i < registry_.slots().size(); ++i) {
      const ParamSlot& s = registry_.slots()[i];
      // One holder writes: world rank 0 for a tensor every rank holds, EDP rank 0 for a shard.
      const bool writer = !grid_ || (s.sharded() ? grid_->edp_rank() == 0 : grid_->rank() == 0);
      if (!writer) continue;
      out.push_back({s.name, "exp_avg", global_begin(s), adam_.exp_avg(i).detach().reshape({-1}).clone()});
      out.push_back({s.name, "exp_avg_sq", global_begin(s), adam_.exp_avg_sq(i).detach().reshape({-1}).clone()});
    }
    return out;
  }

  void load_state_pieces(const StateReader& read, int64_t steps) override {
    for (size_t i = 0; i < registry_.slots().size(); ++i) {
      const ParamSlot& s = registry_.slots()[i];
      const int64_t n = s.tensor.numel();
      adam_.restore(i, read(s.name, "exp_avg", global_begin(s), n).view(s.tensor.sizes()),
                    read(s.name, "exp_avg_sq", global_begin(s), n).view(s.tensor.sizes()));
    }
    adam_.set_steps_taken(steps);
  }

  int64_t steps_taken() const override { return adam_.steps_taken(); }

 private:
  const ParameterRegistry& registry_;
  const ProcessGrid* grid_;
  AdamW adam_;
  std::unique_ptr<GradientReducer> reducer_;
};

}  // namespace

int64_t global_begin(const ParamSlot& slot) {
  return slot.tensor.size(0) == 0 ? 0 : slot.first_row * (slot.tensor.numel() / slot.tensor.size(0));
}

std::unique_ptr<Optimizer> make_optimizer(const ParameterRegistry& registry,
                                          const ProcessGrid* grid, const AdamWOptions& options,
                                          int64_t zero_bucket_bytes) {
  if (grid && grid->dims().zero() > 0) {
    return make_zero_optimizer(registry, *grid, options, grid->dims().zero(), zero_bucket_bytes);
  }
  return std::make_unique<ReplicatedAdamW>(registry, grid, options);
}

}  // namespace mole::parallel
