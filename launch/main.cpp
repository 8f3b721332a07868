// The `mole` command: parse, run the chosen subcommand, report errors.
#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <sched.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <thread>

#include "dist/runtime.h"
#include "kernels/check.h"
#include "launch/bench_command.h"
#include "launch/export_command.h"
#include "launch/forward_command.h"
#include "launch/inspect_command.h"
#include "launch/memory_stats.h"
#include "launch/plan_command.h"
#include "launch/tokenize_command.h"
#include "launch/trainer.h"

int main(int argc, char** argv) {
  // Before any tensor: summary.json and `mole plan` read the bytes of the CPU tensors.
  mole::launch::track_cpu_tensor_bytes();
  CLI::App app{"mole: Mixture-of-LoRA-Experts fine-tuning for LLaMA-family models"};
  app.require_subcommand(1);
  bool verbose = false;
  app.add_flag("-v,--verbose", verbose, "Debug logging");

  mole::launch::TrainOptions train;
  mole::launch::add_train_command(app, train);
  mole::launch::ForwardOptions forward;
  mole::launch::add_forward_command(app, forward);
  mole::launch::ExportOptions export_options;
  mole::launch::add_export_command(app, export_options);
  mole::launch::InspectOptions inspect;
  mole::launch::add_inspect_command(app, inspect);
  mole::launch::PlanOptions plan;
  mole::launch::add_plan_command(app, plan);
  mole::launch::TokenizeOptions tokenize;
  mole::launch::add_tokenize_command(app, tokenize);
  mole::launch::BenchOptions bench;
  mole::launch::add_bench_command(app, bench);

  // An unknown first word is named (CLI11 alone would answer "A subcommand is required").
  for (int i = 1; i < argc; ++i) {
    const std::string word = argv[i];
    if (word.empty() || word[0] == '-') continue;
    std::string known;
    bool found = false;
    for (const CLI::App* sub : app.get_subcommands({})) {
      known += (known.empty() ? "" : ", ") + sub->get_name();
      found = found || sub->get_name() == word;
    }
    if (!found) {
      std::fprintf(stderr, "mole: unknown subcommand '%s' (known: %s); see mole --help\n",
                   word.c_str(), known.c_str());
      return 1;
    }
    break;
  }
  CLI11_PARSE(app, argc, argv);
  // Under mpirun each rank writes through the launcher, often a pseudo-terminal even when the
  // job's own output goes to a file: no colour codes there.
  if (std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") || std::getenv("PMIX_RANK")) {
    spdlog::set_default_logger(spdlog::stdout_color_mt("mole", spdlog::color_mode::never));
  }
  spdlog::set_level(verbose ? spdlog::level::debug : spdlog::level::info);
  try {
    // OpenMP may start with one thread on some machines: unless told otherwise, use the cores
    // this process may run on. A rank not bound to a subset (the whole machine is allowed)
    // shares the node's cores with the other ranks there (the launcher's count).
    if (!std::getenv("OMP_NUM_THREADS")) {
      const int machine = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
      cpu_set_t allowed;
      const int cores = sched_getaffinity(0, sizeof allowed, &allowed) == 0
                            ? std::max(1, CPU_COUNT(&allowed))
                            : machine;
      int ranks_here = 1;
      try {
        ranks_here = std::max(1, mole::dist::detect_rank_info().local_world);
      } catch (const mole::Error&) {  // a malformed launcher variable: `train` reports it
      }
      at::set_num_threads(cores < machine ? cores : std::max(1, cores / ranks_here));
    }
    if (app.got_subcommand("train")) return mole::launch::run_train(train);
    if (app.got_subcommand("forward")) mole::launch::run_forward(forward);
    if (app.got_subcommand("export")) mole::launch::run_export(export_options);
    if (app.got_subcommand("inspect")) mole::launch::run_inspect(inspect);
    if (app.got_subcommand("bench")) mole::launch::run_bench(bench);
    if (app.got_subcommand("plan")) mole::launch::run_plan(plan);
    if (app.got_subcommand("tokenize")) mole::launch::run_tokenize(tokenize);
  } catch (const mole::Error& e) {
    spdlog::error("{}", e.what());
    return 1;
  } catch (const std::exception& e) {
    spdlog::error("internal error: {}", e.what());
    return 2;
  }
  return 0;
}
