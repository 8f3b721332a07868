// The `mole` command: parse, run the chosen subcommand, report errors.
#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include <exception>

#include "kernels/check.h"
#include "launch/forward_command.h"

int main(int argc, char** argv) {
  CLI::App app{"mole: Mixture-of-LoRA-Experts fine-tuning for LLaMA-family models"};
  app.require_subcommand(1);
  bool verbose = false;
  app.add_flag("-v,--verbose", verbose, "Debug logging");

  mole::launch::ForwardOptions forward;
  mole::launch::add_forward_command(app, forward);

  CLI11_PARSE(app, argc, argv);
  spdlog::set_level(verbose ? spdlog::level::debug : spdlog::level::info);
  try {
    if (app.got_subcommand("forward")) mole::launch::run_forward(forward);
  } catch (const mole::Error& e) {
    spdlog::error("{}", e.what());
    return 1;
  } catch (const std::exception& e) {
    spdlog::error("internal error: {}", e.what());
    return 2;
  }
  return 0;
}
