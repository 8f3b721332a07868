// The collective timeout: a rank whose peers never join gets a clear error instead of a hang,
// and the collective can still complete once they do.
#include <chrono>

#include "tests/dist/dist_test_util.h"

namespace mole::dist::test {
namespace {

class Timeout : public DistTest {};

TEST_F(Timeout, AllReduceThatPeersSkipTimesOutOnRankZero) {
  const int n = comm().size();
  const int r = comm().rank();
  if (n < 2) GTEST_SKIP() << "needs two ranks or more";
  const double timeout_s = 1.0;
  // Created in the same order on every rank: `fast` times out quickly; `side` tells the other
  // ranks when rank 0 has seen its timeout.
  std::unique_ptr<Communicator> fast = comm().split(0, r, "fast", timeout_s);
  std::unique_ptr<Communicator> side = comm().split(0, r, "side", kTestTimeout_s);
  at::Tensor x = at::full({3}, r, at::kFloat);
  const std::vector<double> expected(3, n * (n - 1) / 2.0);

  if (r == 0) {
    std::shared_ptr<Work> work = fast->all_reduce(x, ReduceOp::kSum);
    const auto start = std::chrono::steady_clock::now();
    EXPECT_ERROR_CONTAINS(work->wait(),
                          "timed out after 1 s in all_reduce on communicator "
                          "'fast' (rank 0 of " +
                              std::to_string(n) + "); a peer rank may have died");
    const double waited_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_GE(waited_s, timeout_s);
    EXPECT_LT(waited_s, timeout_s + 1.0);
    EXPECT_FALSE(work->is_completed());
    // Sync point: releases the other ranks into the same all_reduce; the Work kept x alive.
    side->barrier();
    work->wait();
  } else {
    // Sync point: waits (up to kTestTimeout_s) until rank 0 has timed out.
    side->barrier();
    fast->all_reduce(x, ReduceOp::kSum)->wait();
  }
  EXPECT_EQ(values(x), expected);
  fast->barrier();
}

TEST_F(Timeout, BarrierThatPeersSkipTimesOut) {
  const int n = comm().size();
  const int r = comm().rank();
  if (n < 2) GTEST_SKIP() << "needs two ranks or more";
  std::unique_ptr<Communicator> fast = comm().split(0, r, "fast", 0.5);
  const int last = n - 1;
  if (r != last) {
    EXPECT_ERROR_CONTAINS(fast->barrier(),
                          "timed out after 0.5 s in barrier on communicator "
                          "'fast' (rank " +
                              std::to_string(r) + " of " + std::to_string(n) + ")");
    comm().barrier();
  } else {
    // Sync point: joins `fast` only after the others have timed out in it. Their timed-out
    // barriers are still in flight in MPI and complete now, driven by their next waits.
    comm().barrier();
    fast->barrier();
  }
  comm().barrier();
}

}  // namespace
}  // namespace mole::dist::test
