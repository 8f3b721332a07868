// The frozen base sharded over a group of ranks (see sharded_base_weights.h).
#include "parallel/sharded_base_weights.h"

#include <ATen/ATen.h>
#include <c10/core/StorageImpl.h>

#include <algorithm>
#include <exception>

#include "dist/communicator.h"
#include "kernels/check.h"

namespace mole::parallel {

// Takes the bytes of `t`'s storage (every view of it keeps its shape and sees no bytes). Host
// buffers go to the pool while it and the layers gathered hold at most two of the largest layer
// (what a pass gathers at once anyway), so that the next gather does not fault fresh pages in
// and the peak does not grow; CUDA's caching allocator does this itself.
void ShardedBaseWeights::drop_bytes(const at::Tensor& t) const {
  c10::StorageImpl* storage = t.storage().unsafeGetStorageImpl();
  const size_t nbytes = storage->nbytes();
  at::DataPtr old = storage->set_data_ptr(at::DataPtr(nullptr, t.device()));
  storage->set_nbytes(0);
  if (t.device().is_cpu() && old.get() != nullptr &&
      gathered_bytes_ + pooled_bytes_ + static_cast<int64_t>(nbytes) <= 2 * max_layer_bytes_) {
    pooled_bytes_ += static_cast<int64_t>(nbytes);
    pool_.emplace(nbytes, std::move(old));
  }
}

// Gives `t`'s storage `nbytes` (uninitialised) bytes: a pooled buffer of that size, or fresh ones
// from its allocator.
void ShardedBaseWeights::give_bytes(const at::Tensor& t, size_t nbytes) const {
  c10::StorageImpl* storage = t.storage().unsafeGetStorageImpl();
  auto it = pool_.find(nbytes);
  if (it != pool_.end()) {
    storage->set_data_ptr_noswap(std::move(it->second));
    pool_.erase(it);
    pooled_bytes_ -= static_cast<int64_t>(nbytes);
  } else {
    // Fresh bytes: pooled buffers of other sizes go first where they would raise the peak.
    while (!pool_.empty() && gathered_bytes_ + pooled_bytes_ > 2 * max_layer_bytes_) {
      auto largest = std::prev(pool_.end());
      pooled_bytes_ -= static_cast<int64_t>(largest->first);
      pool_.erase(largest);
    }
    storage->set_data_ptr_noswap(storage->allocator()->allocate(nbytes));
  }
  storage->set_nbytes(nbytes);
}

ShardedBaseWeights::ShardedBaseWeights(dist::Communicator& group) : group_(group) {}

ShardedBaseWeights::~ShardedBaseWeights() {
  // A gather still in flight writes into the handles' storage: let it land first.
  for (auto& [index, layer] : layers_) {
    for (const std::shared_ptr<dist::Work>& work : layer.works) {
      try {
        work->wait();
      } catch (const std::exception&) {
        // The run is failing already; the error that ended it is reported elsewhere.
      }
    }
  }
}

int ShardedBaseWeights::group_size() const { return group_.size(); }

at::Tensor ShardedBaseWeights::declare(const std::string& name, int64_t layer, const std::vector<int64_t>& shape,
                                       const at::TensorOptions& options) {
  MOLE_CHECK(!index_.count(name), "frozen tensor '", name, "' declared twice");
  const int64_t n = group_.size();
  Entry e;
  e.name = name;
  e.layer = layer;
  e.numel = 1;
  for (int64_t d : shape) e.numel *= d;
  e.chunk = (e.numel + n - 1) / n;
  // The gathered flat buffer [chunk * n]; the handle is the first numel elements in `shape`.
  e.full = at::empty({e.chunk * n}, options);
  e.handle = e.full.narrow(0, 0, e.numel).view(shape);
  c10::StorageImpl* storage = e.full.storage().unsafeGetStorageImpl();
  storage->set_data_ptr_noswap(at::DataPtr(nullptr, e.full.device()));
  storage->set_nbytes(0);
  e.shard = at::zeros({e.chunk}, options);
  Layer& l = layers_[layer];
  l.entries.push_back(entries_.size());
  l.bytes += e.chunk * n * static_cast<int64_t>(e.full.element_size());
  max_layer_bytes_ = std::max(max_layer_bytes_, l.bytes);
  index_.emplace(name, entries_.size());
  entries_.push_back(std::move(e));
  return entries_.back().handle;
}

ShardedBaseWeights::Entry& ShardedBaseWeights::entry(const std::string& name) {
  auto it = index_.find(name);
  MOLE_CHECK(it != index_.end(), "the model has no frozen tensor '", name, "'");
  return entries_[it->second];
}

const ShardedBaseWeights::Entry& ShardedBaseWeights::entry(const std::string& name) const {
  auto it = index_.find(name);
  MOLE_CHECK(it != index_.end(), "the model has no frozen tensor '", name, "'");
  return entries_[it->second];
}

std::pair<int64_t, int64_t> ShardedBaseWeights::kept_range(const std::string& name) const {
  const Entry& e = entry(name);
  const int64_t begin = std::min(e.numel, group_.rank() * e.chunk);
  return {begin, std::min(e.numel, begin + e.chunk)};
}

at::Tensor ShardedBaseWeights::kept_part(const std::string& name, const at::Tensor& value) const {
  const Entry& e = entry(name);
  MOLE_CHECK(value.sizes() == e.handle.sizes(), "frozen tensor '", name, "': got shape ", value.sizes(),
             ", the model expects ", e.handle.sizes());
  const auto [begin, end] = kept_range(name);
  // A contiguous value (a memory-mapped file's tensor) is viewed, not read, here.
  return value.reshape({-1}).narrow(0, begin, end - begin);
}

void ShardedBaseWeights::assign(const std::string& name, const at::Tensor& value) {
  assign_kept(name, kept_part(name, value));
}

void ShardedBaseWeights::assign_kept(const std::string& name, const at::Tensor& part) {
  const auto [begin, end] = kept_range(name);
  MOLE_CHECK(part.dim() == 1 && part.numel() == end - begin, "frozen tensor '", name, "': got ", part.sizes(),
             " elements for its part [", begin, ", ", end, ")");
  at::NoGradGuard no_grad;
  entry(name).shard.narrow(0, 0, part.numel()).copy_(part);
}

int64_t ShardedBaseWeights::held_bytes() const {
  int64_t bytes = 0;
  for (const Entry& e : entries_) bytes += e.shard.numel() * static_cast<int64_t>(e.shard.element_size());
  return bytes;
}

void ShardedBaseWeights::for_each_kept(
    const std::function<void(const std::string&, const at::Tensor&)>& fn) const {
  for (const Entry& e : entries_) {
    const auto [begin, end] = kept_range(e.name);
    fn(e.name, e.shard.narrow(0, 0, end - begin));
  }
}

ShardedBaseWeights::Layer* ShardedBaseWeights::find_layer(int64_t layer) const {
  auto it = layers_.find(layer);
  return it == layers_.end() ? nullptr : &it->second;
}

void ShardedBaseWeights::start_gather(Layer& layer) const {
  gathered_bytes_ += layer.bytes;  // first: give_bytes weighs the pool against it
  // In flight from the first gather on: should a later one fail to start, the ones started are
  // still waited for (free_layer, the destructor) before their buffers are touched.
  layer.state = State::kInFlight;
  for (size_t i : layer.entries) {
    const Entry& e = entries_[i];
    give_bytes(e.full, static_cast<size_t>(e.full.numel() * static_cast<int64_t>(e.full.element_size())));
    at::Tensor full = e.full;  // all_gather's output parameter is a non-const reference
    layer.works.push_back(group_.all_gather(e.shard, full));
  }
  // What the base's buffers hold now: the gathered layers and the host pool.
  peak_gathered_bytes_ = std::max(peak_gathered_bytes_, gathered_bytes_ + pooled_bytes_);
}

void ShardedBaseWeights::finish_gather(Layer& layer) const {
  for (const std::shared_ptr<dist::Work>& work : layer.works) work->wait();
  layer.works.clear();
  layer.state = State::kGathered;
}

void ShardedBaseWeights::free_layer(Layer& layer) const {
  if (layer.state == State::kInFlight) finish_gather(layer);
  if (layer.state == State::kFree) return;
  layer.state = State::kFree;
  gathered_bytes_ -= layer.bytes;
  for (size_t i : layer.entries) drop_bytes(entries_[i].handle);
}

void ShardedBaseWeights::acquire(int64_t index) const {
  Layer* layer = find_layer(index);
  if (!layer) return;
  if (layer->state == State::kFree) start_gather(*layer);
  if (layer->state == State::kInFlight) finish_gather(*layer);
  ++layer->refs;
}

void ShardedBaseWeights::release(int64_t index) const {
  Layer* layer = find_layer(index);
  if (!layer) return;
  MOLE_CHECK(layer->refs > 0, "frozen base layer ", index, " released more often than acquired");
  if (--layer->refs == 0) free_layer(*layer);
}

void ShardedBaseWeights::prefetch(int64_t index) const {
  Layer* layer = find_layer(index);
  if (layer && layer->state == State::kFree) start_gather(*layer);
}

void ShardedBaseWeights::hold(int64_t index) const {
  Layer* layer = find_layer(index);
  if (!layer || layer->held) return;
  acquire(index);
  layer->held = true;
}

void ShardedBaseWeights::release_held(int64_t index) const {
  Layer* layer = find_layer(index);
  if (!layer || !layer->held) return;
  layer->held = false;
  release(index);
}

void ShardedBaseWeights::end_pass() const {
  for (auto& [index, layer] : layers_) release_held(index);
}

}  // namespace mole::parallel
