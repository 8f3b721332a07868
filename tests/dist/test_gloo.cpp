// What only the Gloo backend has: creation over a bootstrap communicator, split's key order, and
// its timeout, after which the communicator refuses further use (Gloo's operations block, so a
// timed-out one cannot complete later as MPI's do; see test_timeout.cpp). The shared collective
// tests run on Gloo as well. Built only with Gloo (MOLE_HAVE_GLOO).
#include "dist/gloo_communicator.h"
#include "tests/dist/dist_test_util.h"

namespace mole::dist::test {
namespace {

class Gloo : public ::testing::Test {
 protected:
  void SetUp() override { comm_ = test_comm(world("gloo")); }
  Communicator& comm() { return *comm_; }
  std::shared_ptr<Communicator> comm_;
};

// Each rank's world rank, gathered in the rank order of `group`.
std::vector<double> members(Communicator& group) {
  at::Tensor mine = at::full({1}, world().rank(), at::kLong);
  at::Tensor all = at::empty({group.size()}, at::kLong);
  group.all_gather(mine, all)->wait();
  return values(all);
}

TEST(GlooWorld, MirrorsTheBootstrap) {
  Communicator& gloo = world("gloo");
  EXPECT_EQ(gloo.rank(), world().rank());
  EXPECT_EQ(gloo.size(), world().size());
  EXPECT_EQ(gloo.backend(), std::string("gloo"));
  EXPECT_EQ(gloo.name(), "world");
  EXPECT_EQ(gloo.timeout_s(), kTestTimeout_s);
}

TEST(GlooWorld, NonPositiveTimeoutFailsBeforeTheRendezvous) {
  const std::string where = "Gloo communicator 'bad' (rank " + std::to_string(world().rank()) +
                            " of " + std::to_string(world().size()) + "): ";
  EXPECT_ERROR_CONTAINS(GlooCommunicator::create(world(), 0.0, "bad"),
                        where + "timeout_s 0 must be positive");
  EXPECT_ERROR_CONTAINS(GlooCommunicator::create(world(), -1.0, "bad"), "timeout_s -1");
  world().barrier();
}

// The bootstrap can be any group: here the MPI ranks of one parity.
TEST(GlooWorld, CreatedOverAnMpiSubgroup) {
  const int r = world().rank();
  std::unique_ptr<Communicator> half = world().split(r % 2, r, "half", kTestTimeout_s);
  std::unique_ptr<GlooCommunicator> gloo = GlooCommunicator::create(*half, kTestTimeout_s, "gh");
  EXPECT_EQ(gloo->rank(), half->rank());
  EXPECT_EQ(gloo->size(), half->size());
  std::vector<double> expected;
  for (int p = r % 2; p < world().size(); p += 2) expected.push_back(p);
  EXPECT_EQ(members(*gloo), expected);
}

TEST_F(Gloo, SplitOrdersByKeyThenRank) {
  const int n = comm().size();
  const int r = comm().rank();
  // Descending keys reverse the ranks.
  std::unique_ptr<Communicator> reversed = comm().split(0, n - r, "reversed", kTestTimeout_s);
  EXPECT_EQ(reversed->rank(), n - 1 - r);
  EXPECT_EQ(reversed->backend(), std::string("gloo"));
  std::vector<double> expected;
  for (int p = n - 1; p >= 0; --p) expected.push_back(p);
  EXPECT_EQ(members(*reversed), expected);
  // Equal keys keep the ranks' order; a group split again.
  std::unique_ptr<Communicator> parity = reversed->split(r % 2, 7, "parity", kTestTimeout_s);
  std::vector<double> same_parity;
  for (int p = r % 2; p < n; p += 2) same_parity.insert(same_parity.begin(), p);
  EXPECT_EQ(members(*parity), same_parity);
  EXPECT_EQ(parity->name(), "parity");
}

// The ranks that wait for the missing one fail: the first to time out closes its connections,
// so the others may fail on the closed connection before their own timeout. Either way the
// communicator then refuses further use, and at least one rank reports the timeout itself.
TEST_F(Gloo, TimedOutBarrierFailsTheWaitingRanksAndBreaksTheCommunicator) {
  const int n = comm().size();
  const int r = comm().rank();
  if (n < 2) GTEST_SKIP() << "needs two ranks or more";
  std::unique_ptr<Communicator> fast = comm().split(0, r, "fast", 0.5);
  const int last = n - 1;
  const std::string where =
      "on communicator 'fast' (rank " + std::to_string(r) + " of " + std::to_string(n) + ")";
  bool timed_out = false;
  if (r != last) {
    const std::string error = error_of([&] { fast->barrier(); });
    timed_out = error.find("timed out after 0.5 s in barrier " + where +
                           "; a peer rank may have died") != std::string::npos;
    const bool peer_closed =
        error.find("barrier " + where + " failed: a connection to a peer broke") !=
        std::string::npos;
    EXPECT_TRUE(timed_out || peer_closed) << "error message: '" << error << "'";
    at::Tensor x = at::ones({2}, at::kFloat);
    std::shared_ptr<Work> work = fast->all_reduce(x, ReduceOp::kSum);
    EXPECT_TRUE(work->is_completed());
    EXPECT_ERROR_CONTAINS(work->wait(), "all_reduce " + where +
                                            ": the communicator is unusable after an earlier "
                                            "error: ");
  }
  // Sync point: the last rank never joins `fast`; it waits here until the others failed.
  at::Tensor timeouts = at::full({1}, timed_out ? 1 : 0, at::kLong);
  comm().all_reduce(timeouts, ReduceOp::kSum)->wait();
  EXPECT_GE(timeouts.item<int64_t>(), 1);
  fast.reset();
  comm().barrier();
}

}  // namespace
}  // namespace mole::dist::test
