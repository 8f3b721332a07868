// Rank detection from a fake launcher environment (saved and restored around each test), the
// MPI runtime's own view of the ranks, and the MOLE_MPI_CHECK message.
#include <cstdlib>
#include <map>
#include <optional>

#include "dist/mpi_utils.h"
#include "tests/dist/dist_test_util.h"

namespace mole::dist::test {
namespace {

const char* const kLauncherVars[] = {"OMPI_COMM_WORLD_RANK",
                                     "OMPI_COMM_WORLD_SIZE",
                                     "OMPI_COMM_WORLD_LOCAL_RANK",
                                     "OMPI_COMM_WORLD_LOCAL_SIZE",
                                     "PMI_RANK",
                                     "PMI_SIZE",
                                     "MPI_LOCALRANKID",
                                     "MPI_LOCALNRANKS",
                                     "SLURM_PROCID",
                                     "SLURM_NTASKS",
                                     "SLURM_LOCALID",
                                     "SLURM_NODEID",
                                     "SLURM_STEP_TASKS_PER_NODE",
                                     "SLURM_TASKS_PER_NODE"};

// Clears every launcher variable for the test and restores the real ones afterwards.
class FakeEnv : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* name : kLauncherVars) {
      if (const char* value = std::getenv(name)) saved_[name] = value;
      unsetenv(name);
    }
  }
  void TearDown() override {
    for (const char* name : kLauncherVars) unsetenv(name);
    for (const auto& [name, value] : saved_) setenv(name.c_str(), value.c_str(), 1);
  }
  void set(const char* name, const char* value) { setenv(name, value, 1); }

 private:
  std::map<std::string, std::string> saved_;
};

void expect_info(const RankInfo& info, int rank, int world, int local_rank, int local_world) {
  EXPECT_EQ(info.rank, rank);
  EXPECT_EQ(info.world, world);
  EXPECT_EQ(info.local_rank, local_rank);
  EXPECT_EQ(info.local_world, local_world);
}

TEST_F(FakeEnv, NoLauncherIsRankZeroOfOne) { expect_info(detect_rank_info(), 0, 1, 0, 1); }

TEST_F(FakeEnv, OpenMpi) {
  set("OMPI_COMM_WORLD_RANK", "5");
  set("OMPI_COMM_WORLD_SIZE", "8");
  set("OMPI_COMM_WORLD_LOCAL_RANK", "1");
  set("OMPI_COMM_WORLD_LOCAL_SIZE", "4");
  expect_info(detect_rank_info(), 5, 8, 1, 4);
}

TEST_F(FakeEnv, OpenMpiWinsOverTheSlurmJobAroundIt) {
  // mpirun inside an sbatch script: every process inherits the batch step's SLURM_PROCID=0.
  set("SLURM_PROCID", "0");
  set("SLURM_NTASKS", "1");
  set("OMPI_COMM_WORLD_RANK", "3");
  set("OMPI_COMM_WORLD_SIZE", "4");
  expect_info(detect_rank_info(), 3, 4, 3, 4);  // no local variables: one node
}

TEST_F(FakeEnv, Pmi) {
  set("PMI_RANK", "6");
  set("PMI_SIZE", "12");
  set("MPI_LOCALRANKID", "2");
  set("MPI_LOCALNRANKS", "4");
  expect_info(detect_rank_info(), 6, 12, 2, 4);
}

TEST_F(FakeEnv, SlurmTasksPerNodeList) {
  set("SLURM_PROCID", "6");
  set("SLURM_NTASKS", "7");
  set("SLURM_LOCALID", "0");
  set("SLURM_NODEID", "3");
  set("SLURM_TASKS_PER_NODE", "2(x3),1");
  expect_info(detect_rank_info(), 6, 7, 0, 1);
  set("SLURM_PROCID", "3");
  set("SLURM_LOCALID", "1");
  set("SLURM_NODEID", "1");
  expect_info(detect_rank_info(), 3, 7, 1, 2);
  set("SLURM_STEP_TASKS_PER_NODE", "4,3");  // the step's layout wins over the job's
  set("SLURM_NODEID", "0");
  expect_info(detect_rank_info(), 3, 7, 1, 4);
}

TEST_F(FakeEnv, MalformedValuesNameTheVariable) {
  set("OMPI_COMM_WORLD_SIZE", "4");
  for (const char* bad : {"abc", "-1", "2x", " 1", "", "99999999999"}) {
    set("OMPI_COMM_WORLD_RANK", bad);
    EXPECT_ERROR_CONTAINS(detect_rank_info(), std::string("environment variable ") +
                                                  "OMPI_COMM_WORLD_RANK='" + bad +
                                                  "' is not a non-negative integer");
  }
  set("OMPI_COMM_WORLD_RANK", "4");
  EXPECT_ERROR_CONTAINS(detect_rank_info(),
                        "OMPI_COMM_WORLD_RANK=4 is not below OMPI_COMM_WORLD_SIZE=4");
  set("OMPI_COMM_WORLD_RANK", "0");
  set("OMPI_COMM_WORLD_SIZE", "0");
  EXPECT_ERROR_CONTAINS(detect_rank_info(), "OMPI_COMM_WORLD_SIZE=0 must be at least 1");
}

TEST_F(FakeEnv, RankWithoutSizeNamesTheMissingVariable) {
  set("PMI_RANK", "1");
  EXPECT_ERROR_CONTAINS(detect_rank_info(), "PMI_RANK is set but PMI_SIZE is not");
}

TEST_F(FakeEnv, BadSlurmLayoutNamesTheVariable) {
  set("SLURM_PROCID", "0");
  set("SLURM_NTASKS", "4");
  set("SLURM_LOCALID", "0");
  set("SLURM_TASKS_PER_NODE", "2(3)");
  EXPECT_ERROR_CONTAINS(detect_rank_info(), "SLURM_TASKS_PER_NODE='2(3)' is not a tasks-per-node");
  set("SLURM_TASKS_PER_NODE", "2,2");
  set("SLURM_LOCALID", "2");
  EXPECT_ERROR_CONTAINS(detect_rank_info(), "SLURM_LOCALID=2 is not below the 2 tasks");
  set("SLURM_LOCALID", "0");
  set("SLURM_NODEID", "2");
  EXPECT_ERROR_CONTAINS(detect_rank_info(), "SLURM_NODEID=2 is not below the 2 nodes");
}

TEST(MpiRuntime, RankInfoMatchesTheWorld) {
  const RankInfo& info = runtime().rank_info();
  EXPECT_EQ(info.rank, world().rank());
  EXPECT_EQ(info.world, world().size());
  EXPECT_GE(info.local_rank, 0);
  EXPECT_LT(info.local_rank, info.local_world);
  EXPECT_LE(info.local_world, info.world);
  EXPECT_TRUE(runtime().owns_mpi());
  EXPECT_EQ(world().backend(), std::string("mpi"));
  if (std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr) {  // launched by Open MPI's mpirun
    const RankInfo env = detect_rank_info();
    expect_info(env, info.rank, info.world, info.local_rank, info.local_world);
  }
}

TEST(MpiRuntime, MpiCheckNamesTheCallTheErrorAndThePlace) {
  MPI_Comm comm = MPI_COMM_NULL;
  MOLE_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm));
  MOLE_MPI_CHECK(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN));
  // A null output pointer: MPI's argument check fails locally, on every rank alike.
  EXPECT_ERROR_CONTAINS(MOLE_MPI_CHECK(MPI_Comm_rank(comm, nullptr)), "MPI_Comm_rank failed: ");
  EXPECT_ERROR_CONTAINS(MOLE_MPI_CHECK(MPI_Comm_rank(comm, nullptr)), "dist/test_runtime.cpp:");
  MOLE_MPI_CHECK(MPI_Comm_free(&comm));
}

}  // namespace
}  // namespace mole::dist::test
