// Entry point of mole_dist_tests, run as 1 process and under mpirun: initialises MPI, creates
// the world communicator of every backend built in (Gloo's over MPI's), runs the tests on every
// rank, and makes all ranks agree on the verdict. Rank 0 prints the usual GoogleTest output; the
// other ranks print only their failures, prefixed with their rank.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "dist/mpi_communicator.h"
#include "tests/dist/dist_test_util.h"
#ifdef MOLE_HAVE_GLOO
#include "dist/gloo_communicator.h"
#endif

namespace mole::dist::test {
namespace {

MpiRuntime* g_runtime = nullptr;
std::map<std::string, Communicator*> g_worlds;  // by backend, for the life of run_tests

class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  // Remembered here: UnitTest::current_test_info() would deadlock inside OnTestPartResult.
  void OnTestStart(const ::testing::TestInfo& test) override {
    test_ = std::string(test.test_suite_name()) + "." + test.name();
  }
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s failed at %s:%d\n%s\n", rank_, test_.c_str(),
                 result.file_name() ? result.file_name() : "unknown file", result.line_number(),
                 result.message());
  }

 private:
  int rank_;
  std::string test_ = "(outside a test)";
};

// Runs every test; returns the number of failed tests summed over all ranks.
int run_tests(Communicator& world) {
  ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (world.rank() != 0) {
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(world.rank()));
  }
  const int run_rc = RUN_ALL_TESTS();
  // A failure outside any test (e.g. in global set-up) counts as one.
  const int local_failures =
      std::max(::testing::UnitTest::GetInstance()->failed_test_count(), run_rc != 0 ? 1 : 0);
  // Sync point: every rank contributes its failure count, so a test that failed on one rank
  // fails the run on all of them.
  at::Tensor failures = at::tensor({int64_t{local_failures}}, at::kLong);
  world.all_reduce(failures, ReduceOp::kSum)->wait();
  return static_cast<int>(failures.item<int64_t>());
}

}  // namespace

MpiRuntime& runtime() { return *g_runtime; }
Communicator& world() { return world("mpi"); }

std::vector<std::string> backends() {
#ifdef MOLE_HAVE_GLOO
  return {"mpi", "gloo"};
#else
  return {"mpi"};
#endif
}

Communicator& world(const std::string& backend) {
  const auto it = g_worlds.find(backend);
  if (it == g_worlds.end()) throw std::logic_error("no world communicator for " + backend);
  return *it->second;
}

}  // namespace mole::dist::test

int main(int argc, char** argv) {
  using namespace mole::dist;
  std::optional<MpiRuntime> runtime;
  try {
    runtime.emplace(&argc, &argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mole_dist_tests: MPI initialisation failed: %s\n", e.what());
    return 1;
  }
  ::testing::InitGoogleTest(&argc, argv);
  const RankInfo& info = runtime->rank_info();
  int total_failures = 0;
  try {
    std::unique_ptr<Communicator> world =
        MpiCommunicator::create_world(*runtime, test::kTestTimeout_s);
    test::g_runtime = &*runtime;
    test::g_worlds["mpi"] = world.get();
#ifdef MOLE_HAVE_GLOO
    std::unique_ptr<Communicator> gloo_world =
        GlooCommunicator::create(*world, test::kTestTimeout_s);
    test::g_worlds["gloo"] = gloo_world.get();
#endif
    if (info.rank == 0) {
      std::printf("mole_dist_tests: %d rank(s), MPI provides %s\n", info.world,
                  to_string(runtime->thread_level()));
    }
    total_failures = test::run_tests(*world);
    if (info.rank == 0 && total_failures > 0) {
      std::printf("mole_dist_tests: %d failed test(s) summed over %d rank(s)\n", total_failures,
                  info.world);
    }
    test::g_worlds.clear();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mole_dist_tests: rank %d of %d: %s\n", info.rank, info.world, e.what());
    runtime->abort(1);
  }
  return total_failures == 0 ? 0 : 1;
}
