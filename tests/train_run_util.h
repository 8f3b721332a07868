// Helpers for tests that run `mole train` as a real process, alone or under mpirun: command lines
// for short runs of the demo config, the metrics a run wrote, and the comparison of two runs.
#pragma once

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "tests/test_util.h"

namespace mole::test {

// A test that starts mpirun jobs: its own temporary folder, holding its own Open MPI session
// folder (concurrent Open MPI jobs race on a shared one).
class MpiJobTest : public ::testing::Test {
 protected:
  void SetUp() override { setenv("OMPI_MCA_orte_tmpdir_base", dir_.file("ompi").c_str(), 1); }
  TempDir dir_;
};

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

// How many lines a run's metrics.jsonl holds (0 when there is none yet).
inline size_t metrics_lines(const std::string& dir) {
  std::ifstream in(dir + "/metrics.jsonl");
  size_t n = 0;
  for (std::string line; std::getline(in, line);) ++n;
  return n;
}

// Every logged step of `got_dir` against `ref_dir`: loss, aux loss, load-balance loss and gradient
// norm agree to `rel_tol` (relative); both logged `steps` lines.
inline void expect_same_steps(const std::string& ref_dir, const std::string& got_dir,
                              size_t steps = 5, double rel_tol = 1e-5) {
  const std::vector<nlohmann::json> ref = metrics(ref_dir), got = metrics(got_dir);
  ASSERT_EQ(ref.size(), steps) << ref_dir;
  ASSERT_EQ(got.size(), ref.size()) << got_dir;
  for (size_t i = 0; i < ref.size(); ++i) {
    for (const char* key : {"loss", "aux_loss", "load_balance", "grad_norm"}) {
      const double a = ref[i].at(key).get<double>(), b = got[i].at(key).get<double>();
      EXPECT_NEAR(b, a, rel_tol * std::abs(a)) << key << " at step " << i + 1 << " of " << got_dir;
    }
  }
}

// The same for two float32 runs whose layouts differ (ranks, EP, dispatch mode): the first step
// (the same weights; only the summation order differs) agrees to 1e-5; later steps to 1e-3,
// because AdamW's first steps turn float32 rounding near zero gradient elements into +-lr
// updates. Measured: 3.3e-5 (loss) and 1.2e-4 (gradient norm) relative at step 4 between one rank
// and EP 4 on AMD EPYC machines with OpenBLAS's Haswell kernels, up to 1.2e-4 between the BLAS and
// vector kernels of different CPUs for the same run (test_golden.cpp). Exactness is checked in
// float64 (model.dtype: fp64).
inline void expect_same_steps_fp32(const std::string& ref_dir, const std::string& got_dir,
                                   size_t steps = 5) {
  const std::vector<nlohmann::json> ref = metrics(ref_dir), got = metrics(got_dir);
  ASSERT_EQ(ref.size(), steps) << ref_dir;
  ASSERT_EQ(got.size(), ref.size()) << got_dir;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double rel_tol = i == 0 ? 1e-5 : 1e-3;
    for (const char* key : {"loss", "aux_loss", "load_balance", "grad_norm"}) {
      const double a = ref[i].at(key).get<double>(), b = got[i].at(key).get<double>();
      EXPECT_NEAR(b, a, rel_tol * std::abs(a)) << key << " at step " << i + 1 << " of " << got_dir;
    }
  }
}

// The worst relative difference over the adapter tensors two runs wrote (the same names).
inline double worst_weight_error(const std::string& ref_dir, const std::string& got_dir) {
  st::SafetensorsFile ref(ref_dir + "/adapter/adapter_model.safetensors");
  st::SafetensorsFile got(got_dir + "/adapter/adapter_model.safetensors");
  EXPECT_EQ(got.names(), ref.names());
  double worst = 0.0;
  for (const std::string& name : ref.names()) {
    worst = std::max(worst, rel_error(got.tensor(name), ref.tensor(name)));
  }
  return worst;
}

}  // namespace mole::test
