// Helpers for tests that run `mole train` as a real process, alone or under mpirun: command lines
// for short runs of the demo config, and the metrics a run wrote.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

namespace mole::test {

// "mpirun [--oversubscribe --allow-run-as-root] -np N " (the flags CMake found for this MPI).
inline std::string mpirun(int np) {
  return std::string(MOLE_MPIRUN) + " -np " + std::to_string(np) + " ";
}

// `mole train` on the demo config for 5 steps of a 16-example global batch, logging every step
// to `dir`; every rank reads `micro_batch` examples per micro-step.
inline std::string demo_train_args(const std::string& dir, int micro_batch) {
  return std::string(MOLE_BINARY) + " train " + MOLE_SOURCE_DIR +
         "/examples/demo-mixlora.yaml --set train.steps=5 --set train.warmup=0"
         " --set train.global_batch=16 --set data.eval= --set log.every=1 --set train.micro_batch=" +
         std::to_string(micro_batch) + " --set log.dir=" + dir;
}

// Runs `command` through the shell with stdout and stderr to `log`; the exit status.
inline int run(const std::string& command, const std::string& log) {
  return std::system((command + " > " + log + " 2>&1").c_str());
}

// The lines of a run's metrics.jsonl.
inline std::vector<nlohmann::json> metrics(const std::string& dir) {
  std::ifstream in(dir + "/metrics.jsonl");
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

}  // namespace mole::test
