// `mole bench checkpoint`: an adapter's training checkpoint (bench_optimizer.cpp's tensors after
// one AdamW update) written and read back, without ZeRO and with ZeRO 2, under mpirun.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "dist/backend.h"
#include "dist/communicator.h"
#include "dist/runtime.h"
#include "launch/bench_command.h"
#include "launch/checkpointing.h"
#include "moe/model_presets.h"
#include "parallel/optimizer.h"
#include "parallel/process_grid.h"

namespace mole::launch {

namespace {

// `mole bench checkpoint`: the same adapter's training checkpoint written (every rank its pieces,
// rank 0 the manifest and the commit) and read back into a fresh optimizer, without ZeRO (rank 0
// writes every tensor and moment) and with ZeRO 2 (every rank its slices). "async wait" is the
// copy to host memory, all that a step waits for under checkpoint.async.
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
    parallel::ParameterRegistry registry(bench_adapter_slots(o, c)), fresh(bench_adapter_slots(o, c));
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
    // The snapshot is what a step waits for under checkpoint.async; the write follows on.
    const CheckpointSnapshot snap = take_snapshot(&grid, registry, *optimizer, at::empty({0}, at::kByte), 1 + zero,
                                                  [&](ckpt::pb::Manifest& m) { m.set_method(o.method); });
    at::Tensor snapshot_s = at::tensor({snap.seconds}, at::kDouble);
    world->all_reduce(snapshot_s, dist::ReduceOp::kMax)->wait();
    const SavedCheckpoint saved = write_snapshot(world->size() > 1 ? world.get() : nullptr, snap, dir, 1);
    world->barrier();
    const auto start = std::chrono::steady_clock::now();
    const uint64_t read = read_trainable_state(ckpt::StoredCheckpoint(saved.folder), fresh, *loaded);
    world->barrier();
    const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    at::Tensor most = at::tensor({static_cast<int64_t>(read)}, at::kLong);
    world->all_reduce(most, dist::ReduceOp::kMax)->wait();
    char line[256];
    std::snprintf(line, sizeof(line), "%-6d %10.2f %12.3f %10.2f %14.1f %14.1f %14.1f\n", zero, saved.seconds,
                  snapshot_s.item<double>(), load_s, saved.total_bytes / kMiB, saved.max_bytes / kMiB,
                  most.item<int64_t>() / kMiB);
    table += line;
    json["results"].push_back({{"zero", zero}, {"save_s", saved.seconds}, {"async_blocking_s", snapshot_s.item<double>()},
                               {"load_s", load_s},
                               {"total_bytes", saved.total_bytes}, {"max_written_bytes_per_rank", saved.max_bytes},
                               {"max_read_bytes_per_rank", most.item<int64_t>()}});
  }
  world->barrier();
  if (world->rank() != 0) return;
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  const int64_t params = parallel::ParameterRegistry(bench_adapter_slots(o, c)).global_numel();
  std::printf("mole bench checkpoint: %s adapter (r=%lld) on %s: %lld trainable parameters (float32), "
              "%d rank(s), in %s\n",
              o.method.c_str(), (long long)o.rank, o.shape.c_str(), (long long)params, world->size(), dir.c_str());
  std::printf("%-6s %10s %12s %10s %14s %14s %14s\n%s", "zero", "save s", "async wait s", "load s", "total MiB",
              "written/rank", "read/rank", table.c_str());
  json["params"] = params;
  std::printf("%s\n", json.dump().c_str());
}

}  // namespace

void bench_checkpoint(const BenchOptions& o) {
  run_under_mpi([&](const dist::MpiRuntime& runtime) { run_checkpoint_bench(o, runtime); });
}

}  // namespace mole::launch
