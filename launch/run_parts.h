// The parts of a training run, built from its Config in one place (the trainer only uses them):
// tokenizer, model with its adapter, expert sharding, data, the parameter registry and the
// optimizer, and the generator of the run's forward-pass draws.
#pragma once

#include <ATen/core/Generator.h>

#include <memory>
#include <string>
#include <vector>

#include "launch/config.h"
#include "launch/data.h"
#include "moe/adapter.h"
#include "moe/llama.h"
#include "parallel/optimizer.h"
#include "parallel/parameter_registry.h"

namespace mole::parallel {
class ExpertParallelDispatcher;
class ProcessGrid;
}  // namespace mole::parallel

namespace mole::launch {

struct RunParts {
  Config config;
  std::shared_ptr<parallel::ProcessGrid> grid;  // null for one process
  std::unique_ptr<Tokenizer> tokenizer;
  std::string tokenizer_spec;  // data.tokenizer, or what it defaults to
  std::unique_ptr<moe::CausalLM> model;
  moe::AdapterSpec spec;
  // Expert parallelism (parallel.ep > 1): how sites reach remote experts; null otherwise.
  std::unique_ptr<parallel::ExpertParallelDispatcher> dispatcher;
  std::unique_ptr<DataLoader> loader;
  std::vector<Example> eval_examples;
  std::unique_ptr<parallel::ParameterRegistry> registry;
  std::unique_ptr<parallel::Optimizer> optimizer;
  // Every random draw of the forward passes (LoRA dropout, router jitter): seeded by train.seed
  // and the rank, on the model's device.
  at::Generator forward_gen;

  RunParts();
  ~RunParts();
  RunParts(RunParts&&) noexcept;
  int rank() const;
  int world() const;
  bool synthetic_base() const;
  const moe::Dispatcher* moe_dispatcher() const;
};

// Builds every part. Under expert parallelism every rank draws the full adapter from the seed
// (as one rank would) and then keeps its experts; the registry and the optimizer are built after
// that. `grid` null: one process. Collective over the grid when there is one (none today, but
// parts may need it).
RunParts build_run(Config config, std::shared_ptr<parallel::ProcessGrid> grid);

// The architecture of model.base synthetic:<preset> (tiny: sized to `tokenizer_vocab`), cut to
// model.layers. Throws naming the preset when it is unknown, or the layers when too many.
moe::ModelConfig synthetic_shape(const Config& c, int64_t tokenizer_vocab);

// model.base synthetic:<preset>: the preset's architecture (tiny: sized to `tokenizer_vocab`),
// cut to model.layers, its weights drawn on the host from train.seed (CausalLM::init_base_random):
// each rank draws only the part of each tensor `weights` keeps (null: whole tensors), and every
// layout holds the same model. Throws naming the preset when it is unknown.
std::unique_ptr<moe::CausalLM> synthetic_base_model(const Config& c, int64_t tokenizer_vocab,
                                                    const at::TensorOptions& options,
                                                    std::shared_ptr<moe::BaseWeights> weights = nullptr);

// The adapter `c.adapter` describes for a model of `num_layers` layers (the allocation of experts
// resolved, router and auxiliary-loss options by method).
moe::AdapterSpec adapter_spec(const Config& c, int64_t num_layers);
// The model's dtype and device from `c.model` (GPU ranks bind to their node-local device).
at::TensorOptions model_options(const Config& c);

// The device this rank trains on: the CPU, or for model.device cuda its node-local GPU (local
// rank modulo the GPUs this process sees).
at::Device model_device(const Config& c);

// The bytes of `model`'s frozen base tensors this rank keeps between uses (its shard under
// parallel.base_shard).
int64_t base_bytes(const moe::CausalLM& model);

// Every frozen tensor of `model`, whole, on the host, in for_each_base_parameter() order; a
// sharded base is gathered one layer at a time (collective over its group). Only ranks with
// `keep` get the tensors; the others take part and get nothing.
std::vector<moe::NamedTensor> whole_base(const moe::CausalLM& model, bool keep);

// The seed of the stream of forward-pass draws (dropout, jitter) of `rank` in a run seeded with
// `seed`: distinct per rank, and distinct from the seed of the weight initialisation.
uint64_t forward_seed(uint64_t seed, int rank);

}  // namespace mole::launch
