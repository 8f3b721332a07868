// The frozen base sharded over a group of N ranks (parallel.base_shard, DESIGN.md §4): each rank
// keeps 1/N of every frozen tensor (flattened, zero-padded to a multiple of N; rank r keeps chunk
// r); a layer's tensors are all-gathered into the model's handles when the layer is acquired and
// their memory is returned when the last use releases it. The handles keep their shapes all the
// time; their storage holds bytes only while the layer is gathered (the model reads them only
// then, between acquire and release, and autograd's saved references to them see the bytes again
// once the layer is gathered for its backward).
//
// Layers are the groups the model declares its tensors in (decoder layers, embedding, head).
// Gathers are asynchronous: prefetch(layer) starts one; acquire waits for it. Every rank of the
// group makes the same calls in the same order (the model's layer order), so their collectives
// match.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "moe/base_weights.h"

namespace mole::dist {
class Communicator;
class Work;
}  // namespace mole::dist

namespace mole::parallel {

class ShardedBaseWeights final : public moe::BaseWeights {
 public:
  // `group`: the base-shard group of this rank (must outlive this object).
  explicit ShardedBaseWeights(dist::Communicator& group);
  ~ShardedBaseWeights() override;

  at::Tensor declare(const std::string& name, int64_t layer, const std::vector<int64_t>& shape,
                     const at::TensorOptions& options) override;
  // Keeps this rank's chunk of `value` (only that part of it is read).
  void assign(const std::string& name, const at::Tensor& value) override;
  void acquire(int64_t layer) const override;
  void release(int64_t layer) const override;
  void prefetch(int64_t layer) const override;
  void hold(int64_t layer) const override;
  void release_held(int64_t layer) const override;
  void end_pass() const override;
  at::Tensor kept_part(const std::string& name, const at::Tensor& value) const override;
  std::pair<int64_t, int64_t> kept_range(const std::string& name) const override;
  void assign_kept(const std::string& name, const at::Tensor& part) override;
  int64_t held_bytes() const override;
  void for_each_kept(const std::function<void(const std::string&, const at::Tensor&)>& fn) const override;

  // Bytes of the layers gathered or being gathered right now; the most that the gathered layers
  // and the host pool of freed buffers held at once so far.
  int64_t gathered_bytes() const { return gathered_bytes_; }
  int64_t peak_gathered_bytes() const override { return peak_gathered_bytes_; }
  int group_size() const;

 private:
  struct Entry {
    std::string name;
    int64_t layer = 0;
    int64_t numel = 0;
    int64_t chunk = 0;    // elements per rank: ceil(numel / N)
    at::Tensor full;      // [chunk * N] flat, gathered into; shares its storage with `handle`
    at::Tensor handle;    // the model's tensor; its storage has bytes only while gathered
    at::Tensor shard;     // [chunk]: this rank's part, zero-padded past numel
  };
  enum class State { kFree, kInFlight, kGathered };
  struct Layer {
    std::vector<size_t> entries;
    State state = State::kFree;
    int refs = 0;
    bool held = false;
    int64_t bytes = 0;  // of the gathered handles (padded)
    std::vector<std::shared_ptr<dist::Work>> works;
  };

  Entry& entry(const std::string& name);
  const Entry& entry(const std::string& name) const;
  Layer* find_layer(int64_t layer) const;
  void start_gather(Layer& layer) const;
  void finish_gather(Layer& layer) const;
  void free_layer(Layer& layer) const;
  void drop_bytes(const at::Tensor& t) const;
  void give_bytes(const at::Tensor& t, size_t nbytes) const;

  dist::Communicator& group_;
  std::vector<Entry> entries_;
  std::map<std::string, size_t> index_;
  mutable std::map<int64_t, Layer> layers_;
  mutable int64_t gathered_bytes_ = 0;
  mutable int64_t peak_gathered_bytes_ = 0;
  int64_t max_layer_bytes_ = 0;
  // Freed host buffers by size, for the next gathers.
  mutable std::multimap<size_t, at::DataPtr> pool_;
  mutable int64_t pooled_bytes_ = 0;
};

}  // namespace mole::parallel
