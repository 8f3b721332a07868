// `mole bench optimizer`: the optimizer's part of a step (gradient reduction, the global norm,
// clipping, the AdamW update and, under ZeRO, the all-gather of the updated slices) for the
// trainable tensors of an adapter at a model shape, without the model, for ZeRO stages 0, 1 and 2
// in turn; with the bytes each rank keeps. Run under mpirun for data parallelism.
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
#include "launch/checkpointing.h"
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

// The trainable tensors `mole train` builds for `o.method` (lora or mixlora) on the shape's
// layers: LoRA on the attention projections, and on the FFN projections either plain LoRA (lora)
// or a MixLoRA block (router and expert stacks). Every rank holds every tensor (DP only).
std::vector<parallel::ParamSlot> adapter_slots(const BenchOptions& o, const moe::ModelConfig& c) {
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

struct StageResult {
  int zero = 0;
  double median_ms = 0.0, min_ms = 0.0;
  parallel::OptimizerMemory memory;
};

StageResult time_stage(const BenchOptions& o, const moe::ModelConfig& c,
                       const std::shared_ptr<dist::Communicator>& world, int zero) {
  parallel::ParameterRegistry registry(adapter_slots(o, c));
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
  const int64_t params = parallel::ParameterRegistry(adapter_slots(o, c)).global_numel();
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

namespace {

// `mole bench checkpoint`: the same adapter's training checkpoint written (every rank its pieces,
// rank 0 the manifest and the commit) and read back into a fresh optimizer, without ZeRO (rank 0
// writes every tensor and moment) and with ZeRO 2 (every rank its slices).
void run_checkpoint_bench(const BenchOptions& o, const dist::MpiRuntime& runtime) {
  dist::WorldCommunicator made = dist::make_world_communicator(
      o.backend, runtime, false, runtime.rank_info().local_rank, 600.0);
  const std::shared_ptr<dist::Communicator> world = made.comm;
  const moe::ModelConfig c = moe::model_preset(o.shape);
  // One folder for the job, named by rank 0's process id.
  at::Tensor id = at::tensor({static_cast<int64_t>(world->rank() == 0 ? ::getpid() : 0)}, at::kLong);
  world->all_reduce(id, dist::ReduceOp::kMax)->wait();
  const char* tmp = std::getenv("TMPDIR");
  const std::string dir = std::string(tmp ? tmp : "/tmp") + "/mole-bench-checkpoint." + std::to_string(id.item<int64_t>());
  constexpr double kMiB = 1024.0 * 1024.0;
  nlohmann::json json = {{"bench", "checkpoint"}, {"shape", o.shape}, {"method", o.method},
                         {"ranks", world->size()}};
  std::string table;
  for (int zero : {0, 2}) {
    parallel::ParameterRegistry registry(adapter_slots(o, c)), fresh(adapter_slots(o, c));
    parallel::ProcessGrid grid(parallel::ParallelSizes{world->size(), 1, zero, 0}, world);
    std::unique_ptr<parallel::Optimizer> optimizer = parallel::make_optimizer(registry, &grid, parallel::AdamWOptions{});
    std::unique_ptr<parallel::Optimizer> loaded = parallel::make_optimizer(fresh, &grid, parallel::AdamWOptions{});
    // One update, so that the moments hold values.
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 1 + world->rank());
    for (const parallel::ParamSlot& s : registry.slots()) {
      s.tensor.mutable_grad() = at::empty_like(s.tensor).normal_(0.0, 1e-3, gen);
    }
    optimizer->reduce_gradients();
    optimizer->clip(1.0, optimizer->grad_norm());
    optimizer->step(1e-4);
    optimizer->zero_grad();
    world->barrier();
    const SavedCheckpoint saved = write_checkpoint(
        &grid, registry, *optimizer, at::empty({0}, at::kByte), dir, 1 + zero, 1,
        [&](ckpt::pb::Manifest& m) { m.set_method(o.method); });
    world->barrier();
    const auto start = std::chrono::steady_clock::now();
    const uint64_t read = read_trainable_state(ckpt::StoredCheckpoint(saved.folder), fresh, *loaded);
    world->barrier();
    const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    at::Tensor most = at::tensor({static_cast<int64_t>(read)}, at::kLong);
    world->all_reduce(most, dist::ReduceOp::kMax)->wait();
    char line[256];
    std::snprintf(line, sizeof(line), "%-6d %10.2f %10.2f %14.1f %14.1f %14.1f\n", zero, saved.seconds, load_s,
                  saved.total_bytes / kMiB, saved.max_bytes / kMiB, most.item<int64_t>() / kMiB);
    table += line;
    json["results"].push_back({{"zero", zero}, {"save_s", saved.seconds}, {"load_s", load_s},
                               {"total_bytes", saved.total_bytes}, {"max_written_bytes_per_rank", saved.max_bytes},
                               {"max_read_bytes_per_rank", most.item<int64_t>()}});
  }
  world->barrier();
  if (world->rank() != 0) return;
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  const int64_t params = parallel::ParameterRegistry(adapter_slots(o, c)).global_numel();
  std::printf("mole bench checkpoint: %s adapter (r=%lld) on %s: %lld trainable parameters (float32), "
              "%d rank(s), in %s\n",
              o.method.c_str(), (long long)o.rank, o.shape.c_str(), (long long)params, world->size(), dir.c_str());
  std::printf("%-6s %10s %10s %14s %14s %14s\n%s", "zero", "save s", "load s", "total MiB", "written/rank",
              "read/rank", table.c_str());
  json["params"] = params;
  std::printf("%s\n", json.dump().c_str());
}

}  // namespace

void bench_checkpoint(const BenchOptions& o) {
  run_under_mpi([&](const dist::MpiRuntime& runtime) { run_checkpoint_bench(o, runtime); });
}

void bench_optimizer(const BenchOptions& o) {
  run_under_mpi([&](const dist::MpiRuntime& runtime) { run_optimizer_bench(o, runtime); });
}

}  // namespace mole::launch
