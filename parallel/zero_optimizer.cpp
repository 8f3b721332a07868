// ZeRO-1/2 AdamW (see zero_optimizer.h).
#include "parallel/zero_optimizer.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <functional>
#include <memory>

#include "dist/collective_stream.h"
#include "dist/communicator.h"
#include "kernels/check.h"
#include "parallel/process_grid.h"

namespace mole::parallel {

std::vector<FlatLayout> flat_layouts(const ParameterRegistry& registry, ReplicaGroup group,
                                     int group_size, int group_rank, int64_t bucket_elements) {
  std::vector<FlatLayout> out;
  const auto finish = [&](FlatLayout& l) {
    const int64_t n = group_size;
    l.padded = (l.numel + n - 1) / n * n;
    l.slice = l.padded / n;
    l.slice_begin = l.slice * group_rank;
  };
  for (const ParamSlot& s : registry.slots()) {
    if (s.group() != group) continue;
    if (out.empty() || (!out.back().entries.empty() &&
                        out.back().numel + s.tensor.numel() > bucket_elements)) {
      if (!out.empty()) finish(out.back());
      out.emplace_back();
      out.back().group = group == ReplicaGroup::kWorld ? "world" : "edp";
      out.back().bucket = static_cast<int>(out.size()) - 1;
    }
    FlatLayout& l = out.back();
    l.entries.push_back({s.name, l.numel, s.tensor.numel()});
    l.numel += s.tensor.numel();
  }
  if (!out.empty()) finish(out.back());
  return out;
}

OptimizerMemory zero_memory(const std::vector<FlatLayout>& layouts,
                            const std::vector<int64_t>& element_bytes, int stage) {
  MOLE_CHECK(layouts.size() == element_bytes.size(), layouts.size(), " layouts but ",
             element_bytes.size(), " element sizes");
  OptimizerMemory m;
  int64_t largest_bucket = 0;
  for (size_t i = 0; i < layouts.size(); ++i) {
    const FlatLayout& l = layouts[i];
    const int64_t element = element_bytes[i];
    m.trainable_bytes += l.numel * element;
    // Both stages keep the reduced slices; stage 1 holds the whole gradient until it is reduced,
    // stage 2 a bucket's gradients until that bucket is (the collectives' transient buffers are
    // not counted, as without ZeRO).
    m.grad_bytes += l.slice * element;
    if (stage == 1) m.grad_bytes += l.numel * element;
    else largest_bucket = std::max(largest_bucket, l.numel * element);
    m.optimizer_bytes += 2 * l.slice * element;
  }
  m.grad_bytes += largest_bucket;
  return m;
}

namespace {

// The part of one slot inside this rank's slice.
struct Segment {
  at::Tensor param;      // a flat view of the live tensor's elements in the slice
  int64_t slice_offset;  // of the segment in the slice
  double lr_scale;
  double weight_decay;
  std::string name;      // the slot's global name
  int64_t global_begin;  // of the segment's first element in the flattened whole tensor
};

// One bucket of one replica group.
struct Group {
  FlatLayout layout;
  dist::Communicator* comm = nullptr;  // the replica group: all-gathers, stage 1's all-reduces
  size_t stream = 0;                   // stage 2: the ReduceStream that reduces it
  std::vector<at::Tensor> tensors;     // the slots' tensors, in layout order
  std::vector<Segment> segments;
  // The reduced gradient of the slice: after reduce_gradients(); at stage 2 the sum of the
  // backward passes' reduce-scatters, written by the stream's thread only until it is drained.
  at::Tensor grad_slice;
  at::Tensor exp_avg, exp_avg_sq;  // [slice]
  // Stage 2, the current backward pass: the gradients taken out of the tensors (undefined: none
  // yet) and how many of them are defined.
  std::vector<at::Tensor> held;
  size_t ready = 0;
  bool sent = false;  // handed to its stream in this pass
};

// Elements of a slice per collective call (every rank sends this many per peer).
constexpr int64_t kChunk = int64_t{1} << 19;

// Calls fn(tensor index, offset in the tensor, offset in the range, count) for each tensor's part
// of the flat buffer's elements [start, start + length); padding is skipped.
template <typename Fn>
void for_each_piece(const FlatLayout& layout, int64_t start, int64_t length, Fn&& fn) {
  for (size_t i = 0; i < layout.entries.size(); ++i) {
    const FlatEntry& e = layout.entries[i];
    const int64_t begin = std::max(start, e.offset);
    const int64_t end = std::min(start + length, e.offset + e.numel);
    if (begin < end) fn(i, begin - e.offset, begin - start, end - begin);
  }
}

// The flat buffer's gradient elements [start, start + dst.numel()) into dst, from `grads` (one per
// tensor of the layout): zeros for an undefined gradient (every rank runs the same collectives)
// and for the padding.
void copy_gradients(const FlatLayout& layout, const std::vector<at::Tensor>& grads, int64_t start,
                    at::Tensor dst) {
  dst.zero_();
  for_each_piece(layout, start, dst.numel(), [&](size_t i, int64_t at, int64_t to, int64_t count) {
    if (grads[i].defined()) dst.narrow(0, to, count).copy_(grads[i].reshape({-1}).narrow(0, at, count));
  });
}

// The sum over `comm` of the bucket's gradients `grads`, this rank's slice of it: chunk by chunk
// of the slice (bounded messages), chunk k holding every rank's elements [k c, (k + 1) c) of its
// slice, in rank order, copied straight from the gradients (no flat copy of the whole buffer).
// Stage 1 all-reduces each chunk and keeps its part, stage 2 reduce-scatters it.
at::Tensor reduce_slice(const Group& g, const std::vector<at::Tensor>& grads, dist::Communicator& comm,
                        bool scatter) {
  const int64_t n = comm.size(), slice = g.layout.slice;
  const at::TensorOptions options = g.tensors.front().options().device(comm.tensor_device());
  at::Tensor out = at::empty({slice}, options);
  for (int64_t begin = 0; begin < slice; begin += kChunk) {
    const int64_t c = std::min(kChunk, slice - begin);
    at::Tensor chunk = at::empty({n * c}, options);
    for (int64_t p = 0; p < n; ++p) copy_gradients(g.layout, grads, p * slice + begin, chunk.narrow(0, p * c, c));
    at::Tensor part = out.narrow(0, begin, c);
    if (scatter) {
      comm.reduce_scatter(chunk, part)->wait();
    } else {
      comm.all_reduce(chunk, dist::ReduceOp::kSum)->wait();
      part.copy_(chunk.narrow(0, comm.rank() * c, c));
    }
  }
  return out.to(g.tensors.front().device());
}

// Stage 2: the reduce-scatters of one replica group's buckets, on a stream of their own, in one
// fixed order on every rank.
struct ReduceStream {
  std::unique_ptr<dist::CollectiveStream> stream;
  std::vector<size_t> order;  // the group's buckets (indices into groups_), last layers first
  size_t next = 0;            // the next one due in this backward pass
};

// Runs `fn` after a leaf's gradient accumulator has written its gradient.
class AfterAccumulate final : public torch::autograd::FunctionPostHook {
 public:
  explicit AfterAccumulate(std::function<void()> fn) : fn_(std::move(fn)) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list& /*inputs*/) override {
    fn_();
    return outputs;
  }

 private:
  std::function<void()> fn_;
};

class ZeroAdamW final : public Optimizer {
 public:
  ZeroAdamW(const ParameterRegistry& registry, const ProcessGrid& grid, const AdamWOptions& options,
            int stage, int64_t bucket_bytes)
      : registry_(registry), grid_(grid), options_(options), stage_(stage) {
    MOLE_CHECK(stage == 1 || stage == 2, "ZeRO stage ", stage, " (allowed: 1, 2)");
    MOLE_CHECK(bucket_bytes > 0, "ZeRO bucket of ", bucket_bytes, " bytes");
    for (ReplicaGroup kind : {ReplicaGroup::kWorld, ReplicaGroup::kExpertData}) {
      dist::Communicator& comm = kind == ReplicaGroup::kWorld ? grid.world() : grid.edp();
      std::vector<ParamSlot> slots;
      for (const ParamSlot& s : registry.slots()) {
        if (s.group() != kind) continue;
        MOLE_CHECK(s.tensor.scalar_type() == at::kFloat || s.tensor.scalar_type() == at::kDouble,
                   "optimizer: trainable tensor '", s.name, "' must be float32 (or float64), got ",
                   s.tensor.scalar_type());
        MOLE_CHECK(slots.empty() || s.tensor.scalar_type() == slots.front().tensor.scalar_type(),
                   "ZeRO: trainable tensors of one group must share a dtype ('", s.name, "')");
        slots.push_back(s);
      }
      if (slots.empty()) continue;
      const int64_t bucket_elements =
          std::max<int64_t>(1, bucket_bytes / static_cast<int64_t>(slots.front().tensor.element_size()));
      const size_t first_group = groups_.size();
      size_t next_slot = 0;
      for (FlatLayout& layout : parallel::flat_layouts(registry, kind, comm.size(), comm.rank(), bucket_elements)) {
        Group g;
        g.layout = std::move(layout);
        g.comm = &comm;
        g.stream = streams_.size();
        for (const FlatEntry& e : g.layout.entries) {
          const ParamSlot& s = slots[next_slot++];
          g.tensors.push_back(s.tensor);
          // This slot's elements [offset, offset + numel) meet the slice [begin, begin + slice).
          const int64_t begin = std::max(e.offset, g.layout.slice_begin);
          const int64_t end = std::min(e.offset + e.numel, g.layout.slice_begin + g.layout.slice);
          if (begin < end) {
            g.segments.push_back({s.tensor.detach().view({-1}).narrow(0, begin - e.offset, end - begin),
                                  begin - g.layout.slice_begin, s.lr_scale, s.weight_decay, s.name,
                                  global_begin(s) + (begin - e.offset)});
          }
        }
        const at::TensorOptions slice_options = g.tensors.front().options();
        g.exp_avg = at::zeros({g.layout.slice}, slice_options);
        g.exp_avg_sq = at::zeros({g.layout.slice}, slice_options);
        g.held.resize(g.tensors.size());
        groups_.push_back(std::move(g));
      }
      if (stage_ == 2) {
        MOLE_CHECK(comm.concurrent_use(), "parallel.zero = 2 reduces gradients on a thread of its own, "
                   "which needs MPI_THREAD_MULTIPLE, and this MPI library provides less; use "
                   "parallel.zero = 1, or parallel.backend = gloo");
        // Backward produces the last layers' gradients first.
        std::vector<size_t> order;
        for (size_t i = groups_.size(); i-- > first_group;) order.push_back(i);
        streams_.push_back({std::make_unique<dist::CollectiveStream>(
                                comm.split(0, comm.rank(), comm.name() + "-grads", comm.timeout_s())),
                            std::move(order)});
      }
    }
    if (stage_ == 2) {
      try {
        add_hooks();
      } catch (...) {
        remove_hooks();  // the destructor does not run for a constructor that throws
        throw;
      }
    }
  }

  ~ZeroAdamW() override {
    remove_hooks();
    streams_.clear();  // joins the threads before the groups go
  }

  void end_backward() override {
    if (stage_ != 2) return;
    // Every bucket not sent in this pass, in the fixed order: gradients written without the hooks
    // (set by hand) are taken now, missing ones are zeros.
    for (ReduceStream& stream : streams_) {
      for (; stream.next < stream.order.size(); ++stream.next) {
        Group& g = groups_[stream.order[stream.next]];
        for (size_t i = 0; i < g.tensors.size(); ++i) take_gradient(g, i);
        send(g);
      }
      stream.next = 0;
    }
    for (Group& g : groups_) g.sent = false;
    pass_open_ = false;
    ++passes_;
  }

  void reduce_gradients() override {
    at::NoGradGuard no_grad;
    if (stage_ == 2) {
      // A backward pass without end_backward(), or gradients set by hand: one more pass.
      if (pass_open_ || passes_ == 0) end_backward();
      drain();
      passes_ = 0;
      return;
    }
    for (Group& g : groups_) {
      std::vector<at::Tensor> grads;
      for (const at::Tensor& t : g.tensors) grads.push_back(t.grad());
      g.grad_slice = reduce_slice(g, grads, *g.comm, /*scatter=*/false);
      // The tensors' own gradients are not read again.
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
    drain();
    for (ReduceStream& stream : streams_) stream.next = 0;
    pass_open_ = false;
    passes_ = 0;
    for (Group& g : groups_) {
      g.grad_slice = at::Tensor();
      for (at::Tensor& h : g.held) h = at::Tensor();
      g.ready = 0;
      g.sent = false;
      for (at::Tensor t : g.tensors) {
        if (t.grad().defined()) t.mutable_grad() = at::Tensor();
      }
    }
  }

  OptimizerMemory memory() const override {
    std::vector<FlatLayout> layouts;
    std::vector<int64_t> element_bytes;
    for (const Group& g : groups_) {
      layouts.push_back(g.layout);
      element_bytes.push_back(static_cast<int64_t>(g.tensors.front().element_size()));
    }
    return zero_memory(layouts, element_bytes, stage_);
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

  std::vector<StatePiece> state_pieces() const override {
    std::vector<StatePiece> out;
    for (const Group& g : groups_) {
      for (const Segment& s : g.segments) {
        const int64_t n = s.param.numel();
        out.push_back({s.name, "exp_avg", s.global_begin, g.exp_avg.narrow(0, s.slice_offset, n).clone()});
        out.push_back({s.name, "exp_avg_sq", s.global_begin, g.exp_avg_sq.narrow(0, s.slice_offset, n).clone()});
      }
    }
    return out;
  }

  void load_state_pieces(const StateReader& read, int64_t steps) override {
    at::NoGradGuard no_grad;
    for (Group& g : groups_) {
      // The padding's moments stay zero (it never gets a gradient).
      g.exp_avg.zero_();
      g.exp_avg_sq.zero_();
      for (const Segment& s : g.segments) {
        const int64_t n = s.param.numel();
        g.exp_avg.narrow(0, s.slice_offset, n).copy_(read(s.name, "exp_avg", s.global_begin, n));
        g.exp_avg_sq.narrow(0, s.slice_offset, n).copy_(read(s.name, "exp_avg_sq", s.global_begin, n));
      }
    }
    step_ = steps;
  }

  int64_t steps_taken() const override { return step_; }

 private:
  std::string state_name(const Group& g) const {
    return "zero" + std::to_string(stage_) + "/" + g.layout.group + "/bucket" +
           std::to_string(g.layout.bucket) + "/slice" +
           std::to_string(g.layout.slice_begin / std::max<int64_t>(1, g.layout.slice));
  }

  // Stage 2: a hook on each tensor's gradient accumulator (kept alive here, removed with the
  // optimizer) that runs once backward has written the tensor's gradient.
  void add_hooks() {
    for (size_t gi = 0; gi < groups_.size(); ++gi) {
      for (size_t ti = 0; ti < groups_[gi].tensors.size(); ++ti) {
        const at::Tensor& t = groups_[gi].tensors[ti];
        std::shared_ptr<torch::autograd::Node> accumulator = torch::autograd::impl::grad_accumulator(t);
        MOLE_CHECK(accumulator != nullptr, "ZeRO-2: trainable tensor '", groups_[gi].layout.entries[ti].name,
                   "' is not a leaf that requires a gradient");
        const uintptr_t key = accumulator->add_post_hook(
            std::make_unique<AfterAccumulate>([this, gi, ti] { gradient_arrived(gi, ti); }));
        hooks_.emplace_back(std::move(accumulator), key);
      }
    }
  }

  void remove_hooks() {
    for (auto& [accumulator, key] : hooks_) accumulator->del_post_hook(key);
    hooks_.clear();
  }

  // Waits for every stream (all of them, also after an error in one), then rethrows the first
  // error.
  void drain() {
    std::exception_ptr first;
    for (ReduceStream& stream : streams_) {
      try {
        stream.stream->drain();
      } catch (...) {
        if (!first) first = std::current_exception();
      }
    }
    if (first) std::rethrow_exception(first);
  }

  // Moves tensor i's gradient, if it has one, into the group's held gradients.
  static void take_gradient(Group& g, size_t i) {
    at::Tensor grad = g.tensors[i].grad();
    if (!grad.defined()) return;
    g.tensors[i].mutable_grad() = at::Tensor();
    if (g.held[i].defined()) {
      g.held[i] = g.held[i] + grad;  // a second gradient before the bucket went out
    } else {
      g.held[i] = grad;
      ++g.ready;
    }
  }

  void send(Group& g) {
    // The group outlives the stream; the gradients are freed as soon as the bucket is reduced.
    streams_[g.stream].stream->submit([group = &g, grads = std::move(g.held)](dist::Communicator* comm) mutable {
      at::Tensor mine = reduce_slice(*group, grads, *comm, /*scatter=*/true);
      grads.clear();
      if (group->grad_slice.defined()) group->grad_slice.add_(mine);
      else group->grad_slice = mine;
    });
    g.held.assign(g.tensors.size(), at::Tensor());
    g.ready = 0;
    g.sent = true;
  }

  // Backward wrote tensor ti of group gi: take it, then send every bucket now complete that is
  // next in its stream's order.
  void gradient_arrived(size_t gi, size_t ti) {
    pass_open_ = true;
    Group& g = groups_[gi];
    // Its bucket is already reduced in this pass: a second backward() without end_backward()
    // between them, or a tensor accumulated twice in one pass. Dropping the gradient would be
    // silent, and sending the bucket again would not match the other ranks' collectives.
    MOLE_CHECK(!g.sent, "ZeRO-2: a gradient for '", g.layout.entries[ti].name,
               "' arrived after its bucket was reduce-scattered in this backward pass; call "
               "Optimizer::end_backward() after each backward()");
    take_gradient(g, ti);
    ReduceStream& stream = streams_[g.stream];
    while (stream.next < stream.order.size()) {
      Group& due = groups_[stream.order[stream.next]];
      if (due.ready < due.tensors.size()) break;
      send(due);
      ++stream.next;
    }
  }

  // The updated slices of every rank into every rank's tensors, in chunks as reduce_slice.
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
        for_each_piece(g.layout, p * slice + begin, c, [&](size_t i, int64_t at, int64_t from, int64_t count) {
          g.tensors[i].detach().view({-1}).narrow(0, at, count).copy_(part.narrow(0, from, count));
        });
      }
    }
  }

  const ParameterRegistry& registry_;
  const ProcessGrid& grid_;
  AdamWOptions options_;
  int stage_;
  std::vector<Group> groups_;  // not resized after construction: the streams point into it
  std::vector<ReduceStream> streams_;
  std::vector<std::pair<std::shared_ptr<torch::autograd::Node>, uintptr_t>> hooks_;
  bool pass_open_ = false;  // a hook ran since the last end_backward()
  int64_t passes_ = 0;      // end_backward() calls since the last reduce_gradients()
  int64_t step_ = 0;
};

}  // namespace

std::unique_ptr<Optimizer> make_zero_optimizer(const ParameterRegistry& registry,
                                               const ProcessGrid& grid, const AdamWOptions& options,
                                               int stage, int64_t bucket_bytes) {
  return std::make_unique<ZeroAdamW>(registry, grid, options, stage, bucket_bytes);
}

}  // namespace mole::parallel
