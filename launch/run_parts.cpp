// Building a run's parts from its Config (see run_parts.h).
#include "launch/run_parts.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <thread>

#include "checkpoint/model_loader.h"
#include "checkpoint/moe_peft_adapter.h"
#include "dist/communicator.h"
#include "dist/runtime.h"
#include "kernels/check.h"
#include "moe/allocation.h"
#include "moe/expert_shard.h"
#include "moe/model_presets.h"
#include "moe/precision.h"
#include "moe/random.h"
#include "parallel/dispatch_plan.h"
#include "parallel/expert_dispatcher.h"
#include "parallel/parallel_dims.h"
#include "parallel/process_grid.h"
#include "parallel/sharded_base_weights.h"

namespace mole::launch {

at::Device model_device(const Config& c) {
  if (c.model.device != "cuda") return at::Device(at::kCPU);
  const int gpus = at::detail::getCUDAHooks().getNumGPUs();
  const int local = dist::detect_rank_info().local_rank;
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(gpus > 0 ? local % gpus : 0));
}

namespace {

// Options that the current build cannot honour yet are errors, not silent no-ops.
void check_supported(const Config& c) {
  MOLE_CHECK(!(c.model.dtype == "fp64" && c.model.device == "cuda"),
             "model.dtype fp64 is a CPU mode for exactness checks; use fp32 or bf16 on CUDA");
  MOLE_CHECK(!(c.model.dtype == "bf16" && c.model.device == "cpu"),
             "model.dtype bf16 is for CUDA (bf16 frozen base, float32 adapters); on CPU mole trains in "
             "fp32");
  MOLE_CHECK(c.model.device != "cuda" || at::hasCUDA(),
             "model.device is cuda but this LibTorch build has no usable CUDA device");
}

moe::RouterOptions router_options(const Config& c, moe::Method method) {
  const RouterSection& r = c.adapter.router;
  moe::RouterOptions o;
  if (r.strategy != "auto") o.strategy = moe::parse_routing_strategy(r.strategy);
  else if (method == moe::Method::kDynMole) o.strategy = moe::RoutingStrategy::kDynMole;
  else o.strategy = moe::RoutingStrategy::kTopK;
  o.top_k = r.top_k;
  o.top_p = r.top_p;
  o.jitter_noise = r.jitter_noise;
  o.capacity_factor = r.capacity_factor;
  o.entropy_q = r.entropy_q;
  o.entropy_threshold = r.entropy_threshold;
  o.keep_top_k = r.keep_top_k;
  return o;
}

moe::AuxLossOptions aux_options(const Config& c, const moe::AdapterSpec& spec) {
  moe::AuxLossOptions aux;
  aux.load_balance_coef = spec.is_moe() ? c.adapter.aux_loss_coef : 0.0;
  aux.z_loss_coef = spec.router.strategy == moe::RoutingStrategy::kSwitch ? c.adapter.z_loss_coef : 0.0;
  aux.entropy_coef = spec.router.strategy == moe::RoutingStrategy::kDynMole ? c.adapter.entropy_loss_coef : 0.0;
  aux.contrastive.coef = spec.method == moe::Method::kMoeLora ? c.adapter.contrastive_coef : 0.0;
  aux.contrastive.temperature = c.adapter.contrastive_temperature;
  aux.contrastive.max_samples = c.adapter.contrastive_samples;
  aux.balance_over_all_sites = c.adapter.balance == "all_sites";
  return aux;
}

// Chooses each site's dispatch mode, logs it, and keeps this rank's experts.
void setup_expert_parallel(RunParts& run) {
  const Config& c = run.config;
  const parallel::ParallelDims& dims = run.grid->dims();
  parallel::DispatchPlanOptions o;
  o.requested = c.parallel.dispatch;
  o.ep = dims.ep();
  o.tokens = c.train.micro_batch * c.data.seq_len;
  const at::ScalarType dtype = run.model->options().dtype().toScalarType();
  o.row_bytes = static_cast<int64_t>(at::elementSize(dtype));
  o.param_bytes = static_cast<int64_t>(at::elementSize(moe::adapter_dtype(dtype)));
  const std::vector<parallel::SiteDispatch> plan = parallel::plan_dispatch(moe::moe_sites(*run.model), o);
  spdlog::info("expert parallel: ep {} x edp {}, dispatch {} (estimates for T = {} tokens per micro-batch)",
               dims.ep(), dims.edp(), c.parallel.dispatch, o.tokens);
  for (const std::string& line : parallel::describe_dispatch(plan)) spdlog::info("  {}", line);
  if (plan.empty()) spdlog::info("  the adapter has no MoE sites: nothing to shard");
  run.dispatcher = std::make_unique<parallel::ExpertParallelDispatcher>(run.grid->ep(),
                                                                        parallel::dispatch_modes(plan));
  moe::shard_experts(*run.model, *run.dispatcher);
}

void load_data(RunParts& run) {
  const Config& c = run.config;
  DataOptions data;
  data.path = c.data.train;
  data.format = c.data.format;
  data.chat_template = c.data.chat_template;
  data.seq_len = c.data.seq_len;
  data.seed = c.train.seed;
  data.synthetic_examples = c.data.synthetic_examples;
  // Every rank tokenises the whole file; the ranks of a node share its cores.
  const int local_world = std::max(1, dist::detect_rank_info().local_world);
  data.threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / local_world);
  DatasetStats stats;
  std::vector<Example> train = load_dataset(data, *run.tokenizer, &stats);
  spdlog::info("data: {} training examples from {} ({} truncated to {} tokens, {} dropped)",
               train.size(), c.data.train, stats.truncated, c.data.seq_len, stats.dropped);
  if (!c.data.eval.empty()) {
    DataOptions eval = data;
    eval.path = c.data.eval;
    eval.seed = c.train.seed + 1;  // held-out synthetic examples
    eval.synthetic_examples = std::min<int64_t>(256, c.data.synthetic_examples);
    run.eval_examples = load_dataset(eval, *run.tokenizer);
  }
  run.loader = std::make_unique<DataLoader>(std::move(train), c.train.micro_batch, c.train.global_batch,
                                            run.rank(), run.world(), c.train.seed,
                                            run.tokenizer->pad_id());
}

}  // namespace

moe::AdapterSpec adapter_spec(const Config& c, int64_t num_layers) {
  const AdapterSection& a = c.adapter;
  moe::AdapterSpec spec;
  spec.method = moe::parse_method(a.method);
  spec.lora = {a.r, a.alpha, a.rslora, a.dropout};
  spec.expert_lora = spec.lora;
  spec.target_modules = a.target_modules;
  spec.router_init_range = a.router_init_range;
  if (spec.is_moe()) {
    try {
      if (!a.experts_list.empty()) spec.experts_per_layer = moe::list_allocation(a.experts_list, num_layers);
      else if (!a.experts_pattern.empty()) spec.experts_per_layer = moe::pattern_allocation(a.experts_pattern, num_layers);
      else spec.experts_per_layer = moe::uniform_allocation(a.experts, num_layers);
    } catch (const Error& e) {
      MOLE_FAIL("adapter.experts: ", e.what());
    }
  }
  spec.router = router_options(c, spec.method);
  spec.aux = aux_options(c, spec);
  return spec;
}

at::TensorOptions model_options(const Config& c) {
  return at::TensorOptions()
      .dtype(c.model.dtype == "bf16"   ? at::kBFloat16
             : c.model.dtype == "fp64" ? at::kDouble
                                       : at::kFloat)
      .device(model_device(c));
}

RunParts::RunParts() = default;
RunParts::~RunParts() = default;
RunParts::RunParts(RunParts&&) noexcept = default;

int RunParts::rank() const { return grid ? grid->rank() : 0; }
int RunParts::world() const { return grid ? grid->dims().world() : 1; }
bool RunParts::synthetic_base() const { return config.model.base.rfind("synthetic:", 0) == 0; }
const moe::Dispatcher* RunParts::moe_dispatcher() const { return dispatcher.get(); }

moe::ModelConfig synthetic_shape(const Config& c, int64_t tokenizer_vocab) {
  MOLE_CHECK(c.model.base.rfind("synthetic:", 0) == 0, "'", c.model.base, "' is not a synthetic base");
  const std::string preset = c.model.base.substr(10);
  moe::ModelConfig shape = preset == "tiny" ? moe::tiny_model_config(tokenizer_vocab) : moe::model_preset(preset);
  MOLE_CHECK(c.model.layers <= shape.num_layers, "model.layers is ", c.model.layers, " but ", c.model.base, " has ",
             shape.num_layers, " decoder layers");
  if (c.model.layers > 0) shape.num_layers = c.model.layers;
  return shape;
}

std::unique_ptr<moe::CausalLM> synthetic_base_model(const Config& c, int64_t tokenizer_vocab,
                                                    const at::TensorOptions& options,
                                                    std::shared_ptr<moe::BaseWeights> weights) {
  auto model = std::make_unique<moe::CausalLM>(synthetic_shape(c, tokenizer_vocab), options, std::move(weights));
  model->init_base_random(c.train.seed);
  return model;
}

int64_t base_bytes(const moe::CausalLM& model) { return model.base_weights().held_bytes(); }

std::vector<moe::NamedTensor> whole_base(const moe::CausalLM& model, bool keep) {
  // The tensors by the group they are acquired with, each with its place in the output.
  std::map<int64_t, std::vector<std::pair<size_t, moe::NamedTensor>>> by_layer;
  size_t index = 0;
  model.for_each_base_parameter([&](const std::string& name, const at::Tensor& t) {
    by_layer[model.base_group(name)].emplace_back(index++, moe::NamedTensor(name, t));
  });
  std::vector<moe::NamedTensor> out(keep ? index : 0);
  for (const auto& [layer, tensors] : by_layer) {
    const moe::AcquiredLayer acquired(model.base_weights(), layer);
    if (!keep) continue;
    for (const auto& [i, named] : tensors) out[i] = {named.first, named.second.detach().to(at::kCPU, false, true)};
  }
  return out;
}

uint64_t forward_seed(uint64_t seed, int rank) {
  // splitmix64 of (seed, rank + 1): well mixed, never the initialisation's seed itself.
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (static_cast<uint64_t>(rank) + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

RunParts build_run(Config config, std::shared_ptr<parallel::ProcessGrid> grid) {
  check_supported(config);
  // One process with parallel.ep > 1 (not under mpirun) is a layout error like any other (the
  // process grid checks multi-rank layouts).
  if (!grid) {
    parallel::ParallelDims(1, static_cast<int>(config.parallel.ep), 0, static_cast<int>(config.parallel.base_shard));
  }
  RunParts run;
  run.config = std::move(config);
  run.grid = std::move(grid);
  const Config& c = run.config;
  // The weight initialisation draws from the seed alone, so every rank builds the same adapter.
  at::Generator init_gen = at::make_generator<at::CPUGeneratorImpl>(c.train.seed);
  run.tokenizer_spec = c.data.tokenizer;
  if (run.tokenizer_spec.empty()) run.tokenizer_spec = run.synthetic_base() ? "byte" : c.model.base;
  const std::string& tokenizer_spec = run.tokenizer_spec;
  run.tokenizer = make_tokenizer(tokenizer_spec);

  const at::TensorOptions options = model_options(c);
  // parallel.base_shard: this rank keeps 1/N of every frozen tensor (null: all of it).
  std::shared_ptr<moe::BaseWeights> weights;
  if (run.grid && run.grid->dims().base_shard() > 0) {
    weights = std::make_shared<parallel::ShardedBaseWeights>(run.grid->base());
  }
  if (run.synthetic_base()) {
    run.model = synthetic_base_model(c, run.tokenizer->vocab_size(), options, weights);
  } else {
    run.model = ckpt::load_model(c.model.base, options, weights);
  }
  MOLE_CHECK(run.tokenizer->vocab_size() <= run.model->config().vocab_size, "tokenizer '",
             tokenizer_spec, "' has ", run.tokenizer->vocab_size(),
             " entries but the model's vocabulary is ", run.model->config().vocab_size);

  run.spec = adapter_spec(c, run.model->num_layers());
  if (!c.adapter.init_from.empty()) {
    moe::AuxLossOptions aux = run.spec.aux;
    run.spec = ckpt::load_adapter(*run.model, c.adapter.init_from);
    run.spec.aux = aux;
  } else {
    moe::attach_adapter(*run.model, run.spec, init_gen);
  }
  if (run.grid && run.grid->dims().ep() > 1) setup_expert_parallel(run);
  run.forward_gen = moe::make_generator(forward_seed(c.train.seed, run.rank()), options.device());

  load_data(run);
  run.registry = std::make_unique<parallel::ParameterRegistry>(
      *run.model, parallel::OptimizerHints{c.train.lora_plus_ratio, c.train.weight_decay});
  run.optimizer = parallel::make_optimizer(
      *run.registry, run.grid.get(), parallel::AdamWOptions{},
      static_cast<int64_t>(std::llround(c.parallel.zero_bucket_mib * (1 << 20))));
  spdlog::info("base: {} with {} decoder layers, {:.2f} MiB of frozen {} weights on this rank{}", c.model.base,
               run.model->num_layers(), static_cast<double>(base_bytes(*run.model)) / (1 << 20),
               c.model.dtype,
               weights ? fmt::format(" (1/{} of each tensor, parallel.base_shard)", c.parallel.base_shard) : "");
  spdlog::info("adapter: {} with {} trainable parameters in {} tensors ({} held on this rank)",
               moe::method_name(run.spec.method), run.registry->global_numel(),
               run.registry->slots().size(), run.registry->local_numel());
  const parallel::OptimizerMemory memory = run.optimizer->memory();
  const int zero = run.grid ? run.grid->dims().zero() : 0;
  spdlog::info("optimizer: AdamW{} | this rank keeps {:.2f} MiB of trainable tensors, {:.2f} MiB of "
               "gradients, {:.2f} MiB of optimizer state",
               zero > 0 ? ", ZeRO-" + std::to_string(zero) : std::string(),
               static_cast<double>(memory.trainable_bytes) / (1 << 20),
               static_cast<double>(memory.grad_bytes) / (1 << 20),
               static_cast<double>(memory.optimizer_bytes) / (1 << 20));
  return run;
}

}  // namespace mole::launch
