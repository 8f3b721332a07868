// `mole bench WHAT`: benchmarks that print a table and a JSON line.
//   moe:      forward+backward time of one decoder layer with plain LoRA and with the MoE-LoRA
//             methods at the same base.
//   dispatch: one MoE site under expert parallelism (run under mpirun, world = EP): time per step
//             and bytes moved in token and weight mode, and the mode `auto` picks.
//   train:    whole training steps (forward, backward, clipping, AdamW) of a random-initialised
//             model at a real shape (--shape) with the adapter `mole train` builds for --method:
//             step time, tokens/s, peak memory (the CUDA allocator's on a GPU, else the host's
//             resident set) and MFU. On a CPU use --shape tiny or --layers.
//   kernels:  the MoE primitives of one MixLoRA FFN site (permute, combine, grouped LoRA forward
//             and backward) at --tokens/--hidden/--intermediate, in GB/s against a device copy.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "moe/model_config.h"

namespace CLI {
class App;
}

namespace mole::dist {
class MpiRuntime;
}

namespace mole::parallel {
struct ParamSlot;
}

namespace mole::launch {

struct BenchOptions {
  std::string what;
  int64_t tokens = 1024;  // per step (batch 1 x tokens)
  int64_t hidden = 512;
  int64_t intermediate = 1408;
  int64_t heads = 8;
  int64_t kv_heads = 8;
  int64_t experts = 8;
  int64_t top_k = 2;
  int64_t rank = 16;
  int64_t iters = 5;
  int64_t warmup = 2;
  std::string device = "cpu";
  std::string dtype;  // empty: bf16 on cuda, fp32 on cpu
  // train
  std::string shape = "tiny";  // a model preset (moe/model_presets.h)
  std::string method = "mixlora";
  int64_t batch = 4;
  int64_t seq = 512;
  int64_t layers = 0;  // 0: every layer of the shape
  uint64_t seed = 42;
  double peak_tflops = 0.0;  // MFU denominator; 0: 989 (H100/H200 dense bf16) on cuda, none on cpu
  bool json = false;         // only the JSON line
  std::string site = "linear";   // dispatch: linear (routed LoRA deltas) or ffn (MixLoRA block)
  std::string backend = "auto";  // dispatch: communicator backend
  double zero_bucket_mib = 32.0;  // optimizer: ZeRO's bucket size (parallel.zero_bucket_mib)
};

void add_bench_command(CLI::App& app, BenchOptions& options);
void run_bench(const BenchOptions& options);
// Under mpirun; collective over every rank (bench_dispatch.cpp).
void bench_dispatch(const BenchOptions& options);
// One process (bench_train.cpp).
void bench_train(const BenchOptions& options);
// One process (bench_kernels.cpp).
void bench_kernels(const BenchOptions& options);
void bench_optimizer(const BenchOptions& options);
// Under mpirun or alone (bench_checkpoint.cpp).
void bench_checkpoint(const BenchOptions& options);
// The trainable tensors `mole train` builds for `options.method` (lora or mixlora) on the shape's
// layers (the first options.layers), every rank holding all (bench_optimizer.cpp).
std::vector<parallel::ParamSlot> bench_adapter_slots(const BenchOptions& options, const moe::ModelConfig& model);
// Runs `bench` inside an MPI runtime (a bench under mpirun); an error is reported with the rank
// before it leaves the runtime's scope (which aborts every rank).
void run_under_mpi(const std::function<void(const dist::MpiRuntime&)>& bench);
// Model FLOPs per token of a frozen-base LoRA training step at sequence length `seq` (the MFU
// numerator): 4 P for the base matrix products (forward and input gradients) plus attention.
double bench_train_model_flops_per_token(const moe::ModelConfig& model, int64_t seq);

}  // namespace mole::launch
