// `mole bench WHAT`: benchmarks that print a table and a JSON line.
//   moe:      forward+backward time of one decoder layer with plain LoRA and with the MoE-LoRA
//             methods at the same base.
//   dispatch: one MoE site under expert parallelism (run under mpirun, world = EP): time per step
//             and bytes moved in token and weight mode, and the mode `auto` picks.
#pragma once

#include <cstdint>
#include <string>

namespace CLI {
class App;
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
  std::string dtype = "fp32";
  std::string site = "linear";   // dispatch: linear (routed LoRA deltas) or ffn (MixLoRA block)
  std::string backend = "auto";  // dispatch: communicator backend
};

void add_bench_command(CLI::App& app, BenchOptions& options);
void run_bench(const BenchOptions& options);
// Under mpirun; collective over every rank (bench_dispatch.cpp).
void bench_dispatch(const BenchOptions& options);

}  // namespace mole::launch
