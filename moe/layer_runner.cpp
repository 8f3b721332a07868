// Running a training pass's decoder layers (see layer_runner.h).
#include "moe/layer_runner.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <string>

#include "kernels/check.h"

namespace mole::moe {

struct TrainingLayers::Checkpoint {
  const BaseWeights* weights = nullptr;
  int64_t layer = 0;
  LayerBody body;
  ForwardContext* ctx = nullptr;
  at::Tensor input;      // detached
  bool input_needs_grad = false;
  at::Tensor rng_state;  // of ctx->generator when the layer started (undefined: no generator)
  std::vector<std::string> sites;  // the records the layer made, by name
};

namespace {

// Sets `gen` to `state` for a scope and restores the state it had, also on an exception.
class ReplayedDraws {
 public:
  ReplayedDraws(std::optional<at::Generator> gen, const at::Tensor& state) : gen_(std::move(gen)) {
    if (!gen_ || !state.defined()) return;
    saved_ = gen_->get_state();
    gen_->set_state(state);
  }
  ~ReplayedDraws() {
    if (saved_.defined()) gen_->set_state(saved_);
  }
  ReplayedDraws(const ReplayedDraws&) = delete;
  ReplayedDraws& operator=(const ReplayedDraws&) = delete;

 private:
  std::optional<at::Generator> gen_;
  at::Tensor saved_;
};

// The differentiable tensors of a router record, in a fixed order (undefined ones skipped).
std::vector<at::Tensor*> differentiable(SiteRecord& r) {
  std::vector<at::Tensor*> out;
  for (at::Tensor* t : {&r.stats.prob_sum_E, &r.stats.z_sum, &r.stats.entropy_sum, &r.contrastive}) {
    if (t->defined()) out.push_back(t);
  }
  return out;
}

SiteRecord& record_named(ForwardContext& ctx, const std::string& name) {
  for (SiteRecord& r : ctx.sites) {
    if (r.site == name) return r;
  }
  MOLE_FAIL("activation checkpointing: the recomputed layer made no record for site '", name, "'");
}

// The records layer `layer` made (their names start "layers.<layer>.").
std::vector<std::string> records_of(const ForwardContext& ctx, int64_t layer) {
  const std::string prefix = "layers." + std::to_string(layer) + ".";
  std::vector<std::string> names;
  for (const SiteRecord& r : ctx.sites) {
    if (r.site.compare(0, prefix.size(), prefix) == 0) names.push_back(r.site);
  }
  return names;
}

// One checkpointed layer as an autograd unit: inputs (h, anchor), outputs (h_out, then the
// differentiable tensors of the layer's records). `anchor` requires grad so that the unit is part
// of the graph even when h is not (the first layer's input, the embedding of frozen weights).
class CheckpointedLayer : public torch::autograd::Function<CheckpointedLayer> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* actx, const at::Tensor& h,
                                                const at::Tensor& /*anchor*/, int64_t state) {
    auto* cp = reinterpret_cast<TrainingLayers::Checkpoint*>(state);
    actx->saved_data["checkpoint"] = state;
    cp->input = h.detach();
    cp->input_needs_grad = h.requires_grad();
    if (cp->ctx->generator) cp->rng_state = cp->ctx->generator->get_state();
    // Autograd is off in here: the layer keeps no activations.
    torch::autograd::variable_list outputs{cp->body(cp->input)};
    cp->sites = records_of(*cp->ctx, cp->layer);
    for (const std::string& site : cp->sites) {
      for (at::Tensor* t : differentiable(record_named(*cp->ctx, site))) outputs.push_back(*t);
    }
    return outputs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* actx,
                                                 torch::autograd::variable_list grads) {
    auto* cp = reinterpret_cast<TrainingLayers::Checkpoint*>(actx->saved_data["checkpoint"].toInt());
    const AcquiredLayer acquired(*cp->weights, cp->layer);  // held through the recompute's backward
    at::Tensor h = cp->input.detach().requires_grad_(cp->input_needs_grad);
    torch::autograd::variable_list outputs;
    {
      // The recompute draws what the forward drew; the stream then goes on where it was.
      const ReplayedDraws replay(cp->ctx->generator, cp->rng_state);
      at::AutoGradMode enable(true);
      outputs.push_back(cp->body(h));
    }
    for (const std::string& site : cp->sites) {
      for (at::Tensor* t : differentiable(record_named(*cp->ctx, site))) outputs.push_back(*t);
    }
    MOLE_CHECK(outputs.size() == grads.size(), "activation checkpointing: layer ", cp->layer, " recomputed ",
               outputs.size(), " outputs but its forward made ", grads.size());
    torch::autograd::variable_list roots, root_grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (!grads[i].defined() || !outputs[i].requires_grad()) continue;
      roots.push_back(outputs[i]);
      root_grads.push_back(grads[i]);
    }
    if (!roots.empty()) torch::autograd::backward(roots, root_grads);
    return {cp->input_needs_grad ? h.grad() : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

TrainingLayers::TrainingLayers(const BaseWeights& weights, int64_t num_layers, ForwardContext& ctx,
                               bool checkpoint)
    : weights_(weights), num_layers_(num_layers), ctx_(ctx), checkpoint_(checkpoint) {}

TrainingLayers::~TrainingLayers() { weights_.end_pass(); }

at::Tensor TrainingLayers::run(int64_t layer, const at::Tensor& h_BSD, const LayerBody& body) const {
  const bool grad = at::GradMode::is_enabled();
  const bool last = layer == num_layers_ - 1;
  // Backward starts with the last layer: it stays.
  if (grad && last) weights_.hold(layer);
  // What runs next: the next layer, or after the last one the final norm and LM head.
  weights_.prefetch(last ? kHeadGroup : layer + 1);
  at::Tensor out = checkpoint_ && grad ? run_checkpointed(layer, h_BSD, body) : body(h_BSD);
  if (grad && out.requires_grad()) {
    // The LM head is used again at the start of backward.
    if (last) weights_.hold(kHeadGroup);
    const BaseWeights* weights = &weights_;
    out.register_hook([weights, layer, last](const at::Tensor&) {
      // What ran above this layer (the next layer, or the head) has finished its backward; this
      // layer's starts now.
      weights->release_held(last ? kHeadGroup : layer + 1);
      weights->hold(layer);
      if (layer > 0) weights->prefetch(layer - 1);
    });
  }
  return out;
}

at::Tensor TrainingLayers::run_checkpointed(int64_t layer, const at::Tensor& h_BSD, const LayerBody& body) const {
  auto cp = std::make_unique<Checkpoint>();
  cp->weights = &weights_;
  cp->layer = layer;
  cp->body = body;
  cp->ctx = &ctx_;
  Checkpoint* state = cp.get();
  checkpoints_.push_back(std::move(cp));
  const at::Tensor anchor = at::empty({0}, h_BSD.options().dtype(at::kFloat)).requires_grad_();
  torch::autograd::variable_list outputs =
      CheckpointedLayer::apply(h_BSD, anchor, reinterpret_cast<int64_t>(state));
  // The records now hold the unit's outputs, so that losses made from them flow through it.
  size_t k = 1;
  for (const std::string& site : state->sites) {
    for (at::Tensor* t : differentiable(record_named(ctx_, site))) *t = outputs.at(k++);
  }
  return outputs.front();
}

}  // namespace mole::moe
