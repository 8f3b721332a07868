// Where the frozen base weights of a model live (DESIGN.md §4). The model declares each frozen
// tensor once, reads it through the handle it got back, and brackets every use of a decoder
// layer's weights (its forward, and any recompute) with acquire(layer) / release(layer). The
// local implementation holds every tensor whole, so the brackets do nothing; a sharded one
// (parallel/) keeps 1/N of each tensor per rank and gathers a layer into the handles for its use.
// Names are Hugging Face's (`model.layers.0.mlp.up_proj.weight`). Layers are the decoder layers
// 0..L-1 and two groups outside them: kEmbeddingGroup (the embedding, used for the lookup at the
// start) and kHeadGroup (final norm and LM head, used at the end and again at the start of
// backward; tied embeddings belong here, as they are the LM head too).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace mole::moe {

constexpr int64_t kEmbeddingGroup = -1;
constexpr int64_t kHeadGroup = -2;

class BaseWeights {
 public:
  virtual ~BaseWeights() = default;
  // The handle the model reads frozen tensor `name` of `shape` through (declared once).
  virtual at::Tensor declare(const std::string& name, int64_t layer, const std::vector<int64_t>& shape,
                             const at::TensorOptions& options) = 0;
  // Sets frozen tensor `name` from `value`: the whole tensor (any floating dtype and device; may
  // be a view of a memory-mapped file). Shape checked.
  virtual void assign(const std::string& name, const at::Tensor& value) = 0;
  // Brackets around a use of layer `layer`'s weights. Calls nest (counted per layer).
  virtual void acquire(int64_t layer) const = 0;
  virtual void release(int64_t layer) const = 0;

  // Scheduling hints from whoever runs the layers (see moe/layer_runner.h); a whole-tensor base
  // ignores them. prefetch: `layer` will be acquired next, start fetching it (a layer that does
  // not exist is ignored). hold: acquire `layer` until end_pass() or release_held(layer), e.g.
  // from the start of its backward to the start of the previous layer's. end_pass: the backward
  // pass is over, release every hold.
  virtual void prefetch(int64_t /*layer*/) const {}
  virtual void hold(int64_t /*layer*/) const {}
  virtual void release_held(int64_t /*layer*/) const {}
  virtual void end_pass() const {}

  // The part of frozen tensor `name`'s value this rank keeps, flattened (a whole-tensor base: all
  // of it): what a loader has to read and check. `value` as assign() takes it.
  virtual at::Tensor kept_part(const std::string& name, const at::Tensor& value) const = 0;
  // The elements [first, second) of frozen tensor `name`, flattened, that this rank keeps (a
  // whole-tensor base: all of them).
  virtual std::pair<int64_t, int64_t> kept_range(const std::string& name) const = 0;
  // Sets the elements this rank keeps of `name` from `part`: kept_range()'s elements, flattened
  // (any floating dtype and device). Whoever makes values can so make only these.
  virtual void assign_kept(const std::string& name, const at::Tensor& part) = 0;
  // Bytes of frozen weights this rank keeps between uses.
  virtual int64_t held_bytes() const = 0;
  // The most bytes of whole (gathered) layers held at once so far, with any buffers kept for the
  // next gathers, beyond held_bytes(): zero for a whole-tensor base.
  virtual int64_t peak_gathered_bytes() const { return 0; }
  // Every frozen tensor's kept part (flattened; whole tensors for a whole-tensor base), in
  // declaration order: the values a rank can read without gathering.
  virtual void for_each_kept(const std::function<void(const std::string&, const at::Tensor&)>& fn) const = 0;
};

// acquire(layer) for a scope; release(layer) when it ends, also by an exception.
class AcquiredLayer {
 public:
  AcquiredLayer(const BaseWeights& weights, int64_t layer) : weights_(weights), layer_(layer) {
    weights_.acquire(layer_);
  }
  ~AcquiredLayer() { weights_.release(layer_); }
  AcquiredLayer(const AcquiredLayer&) = delete;
  AcquiredLayer& operator=(const AcquiredLayer&) = delete;

 private:
  const BaseWeights& weights_;
  int64_t layer_;
};

// Every frozen tensor whole, on the model's device, for the model's lifetime.
class LocalBaseWeights final : public BaseWeights {
 public:
  at::Tensor declare(const std::string& name, int64_t layer, const std::vector<int64_t>& shape,
                     const at::TensorOptions& options) override;
  void assign(const std::string& name, const at::Tensor& value) override;
  void acquire(int64_t) const override {}
  void release(int64_t) const override {}
  at::Tensor kept_part(const std::string& name, const at::Tensor& value) const override;
  std::pair<int64_t, int64_t> kept_range(const std::string& name) const override;
  void assign_kept(const std::string& name, const at::Tensor& part) override;
  int64_t held_bytes() const override;
  void for_each_kept(const std::function<void(const std::string&, const at::Tensor&)>& fn) const override;

 private:
  std::map<std::string, at::Tensor> tensors_;
  std::vector<std::string> order_;  // declaration order
};

}  // namespace mole::moe
