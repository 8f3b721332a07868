// ZeRO-1/2 AdamW (see zero_optimizer.h).
#include "parallel/zero_optimizer.h"

#include <ATen/ATen.h>

#include <cmath>

#include "dist/communicator.h"
#include "kernels/check.h"
#include "parallel/process_grid.h"

namespace mole::parallel {

FlatLayout flat_layout(const ParameterRegistry& registry, ReplicaGroup group, int group_size,
                       int group_rank) {
  FlatLayout layout;
  layout.group = group == ReplicaGroup::kWorld ? "world" : "edp";
  for (const ParamSlot& s : registry.slots()) {
    if (s.group() != group) continue;
    layout.entries.push_back({s.name, layout.numel, s.tensor.numel()});
    layout.numel += s.tensor.numel();
  }
  const int64_t n = group_size;
  layout.padded = (layout.numel + n - 1) / n * n;
  layout.slice = layout.padded / n;
  layout.slice_begin = layout.slice * group_rank;
  return layout;
}

namespace {

// The part of one slot inside this rank's slice.
struct Segment {
  at::Tensor param;      // a flat view of the live tensor's elements in the slice
  int64_t slice_offset;  // of the segment in the slice
  double lr_scale;
  double weight_decay;
};

struct Group {
  FlatLayout layout;
  dist::Communicator* comm = nullptr;
  std::vector<at::Tensor> tensors;  // the slots' tensors, in layout order
  std::vector<Segment> segments;
  at::Tensor grad_slice;            // the reduced gradient of the slice (after reduce_gradients)
  at::Tensor exp_avg, exp_avg_sq;   // [slice]
};

// Elements of a slice per collective call (every rank sends this many per peer).
constexpr int64_t kChunk = int64_t{2} << 20;

class ZeroAdamW final : public Optimizer {
 public:
  ZeroAdamW(const ParameterRegistry& registry, const ProcessGrid& grid, const AdamWOptions& options,
            int stage)
      : registry_(registry), grid_(grid), options_(options), stage_(stage) {
    MOLE_CHECK(stage == 1 || stage == 2, "ZeRO stage ", stage, " (allowed: 1, 2)");
    for (ReplicaGroup kind : {ReplicaGroup::kWorld, ReplicaGroup::kExpertData}) {
      dist::Communicator& comm = kind == ReplicaGroup::kWorld ? grid.world() : grid.edp();
      Group g;
      g.layout = flat_layout(registry, kind, comm.size(), comm.rank());
      if (g.layout.entries.empty()) continue;
      g.comm = &comm;
      int64_t offset = 0;
      for (const ParamSlot& s : registry.slots()) {
        if (s.group() != kind) continue;
        MOLE_CHECK(s.tensor.scalar_type() == at::kFloat || s.tensor.scalar_type() == at::kDouble,
                   "optimizer: trainable tensor '", s.name, "' must be float32 (or float64), got ",
                   s.tensor.scalar_type());
        MOLE_CHECK(g.tensors.empty() || s.tensor.scalar_type() == g.tensors.front().scalar_type(),
                   "ZeRO: trainable tensors of one group must share a dtype ('", s.name, "')");
        g.tensors.push_back(s.tensor);
        // This slot's elements [offset, offset + numel) meet the slice [begin, begin + slice).
        const int64_t begin = std::max(offset, g.layout.slice_begin);
        const int64_t end = std::min(offset + s.tensor.numel(), g.layout.slice_begin + g.layout.slice);
        if (begin < end) {
          g.segments.push_back({s.tensor.detach().view({-1}).narrow(0, begin - offset, end - begin),
                                begin - g.layout.slice_begin, s.lr_scale, s.weight_decay});
        }
        offset += s.tensor.numel();
      }
      const at::TensorOptions slice_options = g.tensors.front().options();
      g.exp_avg = at::zeros({g.layout.slice}, slice_options);
      g.exp_avg_sq = at::zeros({g.layout.slice}, slice_options);
      groups_.push_back(std::move(g));
    }
  }

  void reduce_gradients() override {
    at::NoGradGuard no_grad;
    for (Group& g : groups_) {
      const int64_t n = g.comm->size(), slice = g.layout.slice;
      const at::TensorOptions options = g.tensors.front().options().device(g.comm->tensor_device());
      g.grad_slice = at::empty({slice}, options);
      // In chunks of the slice (bounded messages, as the unsharded reducer's buckets): chunk k of
      // the collective holds every rank's elements [k c, (k + 1) c) of its slice, in rank order,
      // copied straight from the gradients (no flat copy of the whole buffer).
      for (int64_t begin = 0; begin < slice; begin += kChunk) {
        const int64_t c = std::min(kChunk, slice - begin);
        at::Tensor chunk = at::empty({n * c}, options);
        for (int64_t p = 0; p < n; ++p) {
          copy_gradients(g, p * slice + begin, chunk.narrow(0, p * c, c));
        }
        at::Tensor out = g.grad_slice.narrow(0, begin, c);
        if (stage_ == 1) {
          // Stage 1: the sum of every element, as without ZeRO; this rank keeps its part.
          g.comm->all_reduce(chunk, dist::ReduceOp::kSum)->wait();
          out.copy_(chunk.narrow(0, g.comm->rank() * c, c));
        } else {
          at::Tensor mine = at::empty({c}, options);
          g.comm->reduce_scatter(chunk, mine)->wait();
          out.copy_(mine);
        }
      }
      g.grad_slice = g.grad_slice.to(g.tensors.front().device());
      // The tensors' own gradients are not read again: free them (ZeRO-2 never keeps the full
      // reduced gradient; stage 1 keeps only the slice too, after the reduction).
      for (at::Tensor t : g.tensors) t.mutable_grad() = at::Tensor();
    }
  }

  double grad_norm() const override {
    double local = 0.0;
    for (const Group& g : groups_) {
      if (g.grad_slice.defined()) local += g.grad_slice.to(at::kDouble).pow(2).sum().item<double>();
    }
    // Sync point: one scalar over the world (every element of the whole gradient is in exactly
    // one rank's slice).
    at::Tensor total = at::tensor({local}, at::kDouble).to(grid_.world().tensor_device());
    grid_.world().all_reduce(total, dist::ReduceOp::kSum)->wait();
    return std::sqrt(total.cpu().item<double>());
  }

  void clip(double max_norm, double norm) override {
    const double factor = clip_factor(max_norm, norm);
    if (factor == 1.0) return;
    for (Group& g : groups_) {
      if (g.grad_slice.defined()) g.grad_slice.mul_(factor);
    }
  }

  void step(double lr) override {
    at::NoGradGuard no_grad;
    ++step_;
    for (Group& g : groups_) {
      MOLE_CHECK(g.grad_slice.defined(), "ZeRO: step() without reduce_gradients()");
      // AdamW on this rank's slice, segment by segment (each segment is one tensor's part, with
      // its learning-rate multiplier and weight decay), in place on the live tensors.
      for (Segment& s : g.segments) {
        const int64_t n = s.param.numel();
        adamw_update(s.param, g.grad_slice.narrow(0, s.slice_offset, n),
                     g.exp_avg.narrow(0, s.slice_offset, n), g.exp_avg_sq.narrow(0, s.slice_offset, n),
                     lr * s.lr_scale, s.weight_decay, step_, options_);
      }
      all_gather_parameters(g);
    }
  }

  void zero_grad() override {
    for (Group& g : groups_) {
      g.grad_slice = at::Tensor();
      for (at::Tensor t : g.tensors) {
        if (t.grad().defined()) t.mutable_grad() = at::Tensor();
      }
    }
  }

  OptimizerMemory memory() const override {
    OptimizerMemory m;
    for (const Group& g : groups_) {
      const int64_t element = static_cast<int64_t>(g.tensors.front().element_size());
      m.trainable_bytes += g.layout.numel * element;
      // Backward writes whole gradients at every stage (the reduction runs after it), so that is
      // the gradient memory; stage 2 halves the traffic, not yet this peak.
      m.grad_bytes += g.layout.numel * element;
      m.optimizer_bytes += 2 * g.layout.slice * element;
    }
    return m;
  }

  std::vector<FlatLayout> flat_layouts() const override {
    std::vector<FlatLayout> out;
    for (const Group& g : groups_) out.push_back(g.layout);
    return out;
  }

  OptimizerState state() const override {
    OptimizerState s;
    s.steps = step_;
    for (const Group& g : groups_) {
      s.slots.push_back({state_name(g), g.exp_avg.detach().clone(), g.exp_avg_sq.detach().clone()});
    }
    return s;
  }

  void load_state(const OptimizerState& state) override {
    MOLE_CHECK(state.slots.size() == groups_.size(), "optimizer state holds ", state.slots.size(),
               " slices but the ZeRO optimizer has ", groups_.size());
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < groups_.size(); ++i) {
      Group& g = groups_[i];
      const OptimizerSlotState& slot = state.slots[i];
      MOLE_CHECK(slot.name == state_name(g) && slot.exp_avg.numel() == g.layout.slice &&
                     slot.exp_avg_sq.numel() == g.layout.slice,
                 "optimizer state slice ", i, " is '", slot.name, "' of ", slot.exp_avg.numel(),
                 " elements, expected '", state_name(g), "' of ", g.layout.slice);
      g.exp_avg.copy_(slot.exp_avg.view({-1}));
      g.exp_avg_sq.copy_(slot.exp_avg_sq.view({-1}));
    }
    step_ = state.steps;
  }

  const ParameterRegistry& registry() const override { return registry_; }

 private:
  std::string state_name(const Group& g) const {
    return "zero" + std::to_string(stage_) + "/" + g.layout.group + "/slice" +
           std::to_string(g.layout.slice_begin / std::max<int64_t>(1, g.layout.slice));
  }

  // Calls fn(tensor index, offset in the tensor, offset in the range, count) for each tensor's
  // part of the flat buffer's elements [start, start + length); padding is skipped.
  template <typename Fn>
  static void for_each_piece(const Group& g, int64_t start, int64_t length, Fn&& fn) {
    for (size_t i = 0; i < g.layout.entries.size(); ++i) {
      const FlatEntry& e = g.layout.entries[i];
      const int64_t begin = std::max(start, e.offset);
      const int64_t end = std::min(start + length, e.offset + e.numel);
      if (begin < end) fn(i, begin - e.offset, begin - start, end - begin);
    }
  }

  // The flat buffer's gradient elements [start, start + dst.numel()) into dst: zeros for a tensor
  // without a gradient (every rank runs the same collectives) and for the padding.
  static void copy_gradients(const Group& g, int64_t start, at::Tensor dst) {
    dst.zero_();
    for_each_piece(g, start, dst.numel(), [&](size_t i, int64_t at, int64_t to, int64_t count) {
      const at::Tensor& grad = g.tensors[i].grad();
      if (grad.defined()) dst.narrow(0, to, count).copy_(grad.reshape({-1}).narrow(0, at, count));
    });
  }

  // The updated slices of every rank into every rank's tensors, in chunks as reduce_gradients.
  void all_gather_parameters(Group& g) {
    const int64_t n = g.comm->size(), slice = g.layout.slice;
    const at::TensorOptions options = g.tensors.front().options().device(g.comm->tensor_device());
    at::Tensor mine = at::zeros({slice}, options);
    for (const Segment& s : g.segments) mine.narrow(0, s.slice_offset, s.param.numel()).copy_(s.param);
    for (int64_t begin = 0; begin < slice; begin += kChunk) {
      const int64_t c = std::min(kChunk, slice - begin);
      at::Tensor chunk = at::empty({n * c}, options);
      g.comm->all_gather(mine.narrow(0, begin, c), chunk)->wait();
      for (int64_t p = 0; p < n; ++p) {
        const at::Tensor part = chunk.narrow(0, p * c, c);
        for_each_piece(g, p * slice + begin, c, [&](size_t i, int64_t at, int64_t from, int64_t count) {
          g.tensors[i].detach().view({-1}).narrow(0, at, count).copy_(part.narrow(0, from, count));
        });
      }
    }
  }

  const ParameterRegistry& registry_;
  const ProcessGrid& grid_;
  AdamWOptions options_;
  int stage_;
  std::vector<Group> groups_;
  int64_t step_ = 0;
};

}  // namespace

std::unique_ptr<Optimizer> make_zero_optimizer(const ParameterRegistry& registry,
                                               const ProcessGrid& grid, const AdamWOptions& options,
                                               int stage) {
  return std::make_unique<ZeroAdamW>(registry, grid, options, stage);
}

}  // namespace mole::parallel
