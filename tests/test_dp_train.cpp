// Data-parallel training under a real mpirun: 2 and 4 ranks reproduce one rank with the whole
// global batch (MixLoRA with aux losses on, prompt masking), a config that differs between ranks
// is refused at start-up, and a rank killed mid-training ends the whole job.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <thread>

#include "checkpoint/safetensors.h"
#include "tests/test_util.h"
#include "tests/train_run_util.h"

namespace mole {
namespace {

using test::mpirun;
using test::run;

using DpTrain = test::MpiJobTest;

// 1 rank with micro-batch 8 against np ranks with micro-batch 8/np: the same two accumulation steps
// of 8 examples each. Returns the worst relative difference over the trained adapter tensors.
double compare_with_one_rank(const test::TempDir& dir, const std::string& dtype,
                             const std::string& backend = "mpi") {
  const std::string extra = " --set model.dtype=" + dtype + " --set parallel.backend=" + backend;
  const std::string ref_dir = dir.file(dtype + "-np1");
  EXPECT_EQ(run(test::demo_train_args(ref_dir, 8) + extra, dir.file("log")), 0) << test::read_bytes(dir.file("log"));
  double worst = 0.0;
  for (int np : {2, 4}) {
    const std::string out = dir.file(backend + "-" + dtype + "-np" + std::to_string(np));
    EXPECT_EQ(run(mpirun(np) + test::demo_train_args(out, 8 / np) + extra, dir.file("log")), 0)
        << test::read_bytes(dir.file("log"));
    // Every rank said where it runs, with the backend chosen.
    const std::string log = test::read_bytes(dir.file("log"));
    for (int r = 0; r < np; ++r) {
      const std::string said = "rank " + std::to_string(r) + " of " + std::to_string(np) + " on host ";
      const size_t at = log.find(said);
      EXPECT_NE(at, std::string::npos) << log;
      if (at == std::string::npos) continue;
      const std::string line = log.substr(at, log.find('\n', at) - at);
      EXPECT_NE(line.find("(local rank " + std::to_string(r) + " of " + std::to_string(np) + "), device cpu, " +
                          backend + " backend"),
                std::string::npos)
          << line;
    }
    // float64: exact up to summation order; float32: see expect_same_steps_fp32.
    if (dtype == "fp64") test::expect_same_steps(ref_dir, out);
    else test::expect_same_steps_fp32(ref_dir, out);
    worst = std::max(worst, test::worst_weight_error(ref_dir, out));
  }
  return worst;
}

// MixLoRA with its load-balance loss and prompt masking, 5 steps of the demo model.
TEST_F(DpTrain, TwoAndFourRanksReproduceOneRank) {
  // float64: the data-parallel step is exact, so the trained weights agree to 1e-5 (in practice
  // to ~1e-12).
  const double worst64 = compare_with_one_rank(dir_, "fp64");
  RecordProperty("worst_weight_rel_error_fp64", test::sci(worst64));
  EXPECT_LT(worst64, 1e-5);
  // float32: losses agree to 1e-5 at the first step and to a measured bound after it (checked
  // inside); the weights differ more, because AdamW's
  // first steps map each gradient element to about +-lr whatever its size, so float32 rounding
  // (1e-7 of a tensor's norm) decides the update of elements whose gradient is near zero.
  const double worst32 = compare_with_one_rank(dir_, "fp32");
  // Measured on AMD EPYC with OpenBLAS's Haswell kernels: 6.9e-4 here (DP 2 and 4), 3.5e-3 for EP 4
  // (test_ep_train.cpp); the bound leaves room for other CPUs' kernels.
  RecordProperty("worst_weight_rel_error_fp32", test::sci(worst32));
  EXPECT_LT(worst32, 2e-2);
}

#ifdef MOLE_HAVE_GLOO
TEST_F(DpTrain, GlooBackendReproducesOneRank) {
  const double worst = compare_with_one_rank(dir_, "fp64", "gloo");
  RecordProperty("worst_weight_rel_error_gloo_fp64", test::sci(worst));
  EXPECT_LT(worst, 1e-5);
}
#endif

TEST_F(DpTrain, InvalidLayoutsAreStartUpErrors) {
  const std::string base = test::demo_train_args(dir_.file("run"), 4);
  EXPECT_NE(run(mpirun(3) + base + " --set parallel.ep=2", dir_.file("log")), 0);
  std::string log = test::read_bytes(dir_.file("log"));
  EXPECT_NE(log.find("world size 3 is not divisible by parallel.ep = 2"), std::string::npos) << log;
  EXPECT_EQ(log.find("training examples"), std::string::npos) << "nothing is built before the check";
  EXPECT_NE(run(mpirun(2) + base + " --set parallel.ep=2 --set adapter.experts=3", dir_.file("log")), 0);
  log = test::read_bytes(dir_.file("log"));
  EXPECT_NE(log.find("3 experts cannot be split over parallel.ep = 2"), std::string::npos) << log;
  // Every key of the layout is checked at the grid, on every rank, before anything is built.
  EXPECT_NE(run(mpirun(4) + base + " --set parallel.base_shard=3", dir_.file("log")), 0);
  log = test::read_bytes(dir_.file("log"));
  EXPECT_NE(log.find("world size 4 is not divisible by parallel.base_shard = 3"), std::string::npos) << log;
  EXPECT_EQ(log.find("training examples"), std::string::npos) << "nothing is built before the check";
}

TEST_F(DpTrain, ConfigThatDiffersBetweenRanksIsRefused) {
  // Two app contexts of one job (MPMD): rank 1 gets another learning rate.
  const std::string base = test::demo_train_args(dir_.file("run"), 4);
  const std::string cmd = std::string(MOLE_MPIRUN) + " -np 1 " + base + " : -np 1 " + base +
                          " --set train.lr=0.5";
  EXPECT_NE(run(cmd, dir_.file("log")), 0);
  const std::string log = test::read_bytes(dir_.file("log"));
  EXPECT_NE(log.find("the resolved config differs between ranks"), std::string::npos) << log;
}

TEST_F(DpTrain, KilledRankEndsTheJobWithinAMinute) {
  const std::string cmd = mpirun(2) + test::demo_train_args(dir_.file("run"), 4) +
                          " --set train.steps=100000 > " + dir_.file("log") + " 2>&1";
  pid_t job = fork();
  ASSERT_GE(job, 0);
  if (job == 0) {
    setpgid(0, 0);
    execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  // Wait until training runs (the first metrics line), then SIGKILL one rank process.
  bool started = false;
  for (int i = 0; i < 600 && !started; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    started = !test::read_bytes(dir_.file("run/metrics.jsonl")).empty();
  }
  ASSERT_TRUE(started) << test::read_bytes(dir_.file("log"));
  const std::string find_rank = "pgrep -P " + std::to_string(job) + " -f 'mole train' | tail -1";
  FILE* pipe = popen(find_rank.c_str(), "r");
  char buf[64] = {0};
  ASSERT_NE(fgets(buf, sizeof buf, pipe), nullptr);
  pclose(pipe);
  const pid_t victim = static_cast<pid_t>(std::atoi(buf));
  ASSERT_GT(victim, 0);
  const auto killed_at = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(victim, SIGKILL), 0);
  int status = 0;
  bool ended = false;
  while (std::chrono::steady_clock::now() - killed_at < std::chrono::seconds(60)) {
    if (waitpid(job, &status, WNOHANG) == job) {
      ended = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  if (!ended) {
    kill(-job, SIGKILL);
    waitpid(job, &status, 0);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - killed_at).count();
  RecordProperty("seconds_to_end", std::to_string(seconds));
  EXPECT_TRUE(ended) << "the job still ran 60 s after a rank was killed";
  EXPECT_FALSE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << test::read_bytes(dir_.file("log"));
}

}  // namespace
}  // namespace mole
