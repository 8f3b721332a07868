// `mole bench optimizer`: the optimizer's part of a step (gradient reduction, the global norm,
// clipping, the AdamW update and, under ZeRO, the all-gather of the updated slices) for the
// trainable tensors of an adapter at a model shape, without the model, for ZeRO stages 0, 1 and 2
// in turn; with the bytes each rank keeps. Run under mpirun for data parallelism. Also the
// adapter's tensors for the checkpoint benchmark (bench_checkpoint.cpp).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <unistd.h>

#include "dist/backend.h"
#include "dist/communicator.h"
#include "dist/runtime.h"
#include "kernels/check.h"
#include "launch/bench_command.h"
#include "moe/model_presets.h"
#include "parallel/optimizer.h"
#include "parallel/process_grid.h"

namespace mole::launch {
namespace {

parallel::ParamSlot slot(const std::string& name, std::vector<int64_t> shape, moe::TensorRole role,
                         at::Generator& gen) {
  parallel::ParamSlot s;
  s.name = name;
  s.global_shape = shape;
  s.tensor = at::empty(shape, at::kFloat).normal_(0.0, 0.02, gen).requires_grad_(true);
  s.role = role;
  return s;
}

}  // namespace

// LoRA on the attention projections, and on the FFN projections either plain LoRA (lora) or a
// MixLoRA block (router and expert stacks).
std::vector<parallel::ParamSlot> bench_adapter_slots(const BenchOptions& o, const moe::ModelConfig& c) {
  MOLE_CHECK(o.method == "lora" || o.method == "mixlora",
             "bench optimizer: --method lora or mixlora, got '", o.method, "'");
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  const int64_t D = c.hidden_size, F = c.intermediate_size, r = o.rank, E = o.experts;
  const int64_t q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  const int64_t layers = o.layers > 0 ? std::min(o.layers, c.num_layers) : c.num_layers;
  std::vector<parallel::ParamSlot> slots;
  using moe::TensorRole;
  auto lora = [&](const std::string& name, int64_t in, int64_t out) {
    slots.push_back(slot(name + ".lora_A.weight", {r, in}, TensorRole::kLoraA, gen));
    slots.push_back(slot(name + ".lora_B.weight", {out, r}, TensorRole::kLoraB, gen));
  };
  for (int64_t i = 0; i < layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    lora(p + "self_attn.q_proj", D, q);
    lora(p + "self_attn.k_proj", D, kv);
    lora(p + "self_attn.v_proj", D, kv);
    lora(p + "self_attn.o_proj", q, D);
    if (o.method == "lora") {
      lora(p + "mlp.gate_proj", D, F);
      lora(p + "mlp.up_proj", D, F);
      lora(p + "mlp.down_proj", F, D);
      continue;
    }
    slots.push_back(slot(p + "mlp.moe_gate.weight", {E, D}, TensorRole::kRouter, gen));
    for (const auto& [proj, in, out] : {std::tuple<const char*, int64_t, int64_t>{"gate_proj", D, F},
                                        {"up_proj", D, F}, {"down_proj", F, D}}) {
      slots.push_back(slot(p + "mlp." + proj + ".experts.lora_A", {E, r, in}, TensorRole::kExpertLoraA, gen));
      slots.push_back(slot(p + "mlp." + proj + ".experts.lora_B", {E, out, r}, TensorRole::kExpertLoraB, gen));
    }
  }
  return slots;
}

namespace {

struct StageResult {
  int zero = 0;
  double median_ms = 0.0, min_ms = 0.0;
  parallel::OptimizerMemory memory;
};

StageResult time_stage(const BenchOptions& o, const moe::ModelConfig& c,
                       const std::shared_ptr<dist::Communicator>& world, int zero) {
  parallel::ParameterRegistry registry(bench_adapter_slots(o, c));
  parallel::ProcessGrid grid(parallel::ParallelSizes{world->size(), 1, zero, 0}, world);
  std::unique_ptr<parallel::Optimizer> optimizer =
      parallel::make_optimizer(registry, &grid, parallel::AdamWOptions{},
                               static_cast<int64_t>(std::llround(o.zero_bucket_mib * (1 << 20))));
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 1 + world->rank());
  std::vector<double> ms;
  for (int64_t it = 0; it < o.warmup + o.iters; ++it) {
    for (const parallel::ParamSlot& s : registry.slots()) {
      s.tensor.mutable_grad() = at::empty_like(s.tensor).normal_(0.0, 1e-3, gen);
    }
    world->barrier();
    const auto start = std::chrono::steady_clock::now();
    optimizer->reduce_gradients();
    const double norm = optimizer->grad_norm();
    optimizer->clip(1.0, norm);
    optimizer->step(1e-4);
    optimizer->zero_grad();
    world->barrier();
    const double elapsed =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (it >= o.warmup) ms.push_back(elapsed);
  }
  std::sort(ms.begin(), ms.end());
  return {zero, ms[ms.size() / 2], ms.front(), optimizer->memory()};
}

void run_optimizer_bench(const BenchOptions& o, const dist::MpiRuntime& runtime) {
  dist::WorldCommunicator made = dist::make_world_communicator(
      o.backend, runtime, false, runtime.rank_info().local_rank, 600.0);
  const std::shared_ptr<dist::Communicator> world = made.comm;
  const moe::ModelConfig c = moe::model_preset(o.shape);
  std::vector<StageResult> results;
  for (int zero : {0, 1, 2}) results.push_back(time_stage(o, c, world, zero));
  if (world->rank() != 0) return;
  const int64_t params = parallel::ParameterRegistry(bench_adapter_slots(o, c)).global_numel();
  std::printf("mole bench optimizer: %s adapter (r=%lld%s) on %s, %lld layers: %lld trainable "
              "parameters (float32), DP %d, %s backend, ZeRO buckets of %g MiB\n",
              o.method.c_str(), (long long)o.rank,
              o.method == "mixlora" ? (", " + std::to_string(o.experts) + " experts").c_str() : "",
              o.shape.c_str(), (long long)(o.layers > 0 ? std::min(o.layers, c.num_layers) : c.num_layers),
              (long long)params, world->size(), world->backend(), o.zero_bucket_mib);
  std::printf("%-6s %12s %12s %16s %16s %16s\n", "zero", "median ms", "min ms", "params MiB/rank",
              "grads MiB/rank", "optim MiB/rank");
  nlohmann::json json = {{"bench", "optimizer"}, {"shape", o.shape}, {"method", o.method},
                         {"rank", o.rank}, {"experts", o.experts}, {"params", params},
                         {"dp", world->size()}, {"backend", world->backend()},
                         {"zero_bucket_mib", o.zero_bucket_mib}};
  constexpr double kMiB = 1024.0 * 1024.0;
  for (const StageResult& r : results) {
    std::printf("%-6d %12.1f %12.1f %16.1f %16.1f %16.1f\n", r.zero, r.median_ms, r.min_ms,
                r.memory.trainable_bytes / kMiB, r.memory.grad_bytes / kMiB,
                r.memory.optimizer_bytes / kMiB);
    json["results"].push_back({{"zero", r.zero}, {"median_ms", r.median_ms}, {"min_ms", r.min_ms},
                               {"trainable_bytes", r.memory.trainable_bytes},
                               {"grad_bytes", r.memory.grad_bytes},
                               {"optimizer_bytes", r.memory.optimizer_bytes}});
  }
  std::printf("%s\n", json.dump().c_str());
}

}  // namespace

void bench_optimizer(const BenchOptions& o) {
  run_under_mpi([&](const dist::MpiRuntime& runtime) { run_optimizer_bench(o, runtime); });
}

}  // namespace mole::launch
