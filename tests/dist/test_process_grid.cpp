// ParallelDims validation and the EP / EDP groups of ProcessGrid (DESIGN.md §4): membership is
// checked by all-gathering world ranks over each group. The grid tests run once per backend.
#include "parallel/process_grid.h"
#include "tests/dist/dist_test_util.h"

namespace mole::dist::test {
namespace {

using parallel::ParallelDims;
using parallel::ParallelSizes;
using parallel::ProcessGrid;

class Grid : public BackendTest {};

std::vector<double> members(Communicator& group, int world_rank) {
  at::Tensor mine = at::full({1}, world_rank, at::kLong);
  at::Tensor all = at::empty({group.size()}, at::kLong);
  group.all_gather(mine, all)->wait();
  return values(all);
}

TEST(ParallelDims, SizesAndRanks) {
  const ParallelDims dims(8, 4);
  EXPECT_EQ(dims.dp(), 8);
  EXPECT_EQ(dims.edp(), 2);
  EXPECT_EQ(dims.ep_rank(6), 2);
  EXPECT_EQ(dims.edp_rank(6), 1);
  EXPECT_NO_THROW(dims.check_experts(8));
  EXPECT_NO_THROW(dims.check_experts(16));
  EXPECT_NO_THROW(dims.check_experts(2));  // fewer experts than ep: replicated, not split
}

TEST(ParallelDims, InvalidLayoutsNameTheNumbers) {
  // Validated on construction.
  EXPECT_ERROR_CONTAINS((ParallelDims(6, 4)), "world size 6 is not divisible by parallel.ep = 4");
  EXPECT_ERROR_CONTAINS((ParallelDims(6, 3).check_experts(4)),
                        "4 experts cannot be split over parallel.ep = 3");
  EXPECT_ERROR_CONTAINS((ParallelDims(4, 0)), "parallel.ep = 0 must be at least 1");
  EXPECT_ERROR_CONTAINS((ParallelDims(0, 1)), "world size 0 must be at least 1");
}

// Every ep that divides the world, ep = 1 and ep = world included.
TEST_P(Grid, GroupsForEveryValidEp) {
  const int n = comm().size();
  const int r = comm().rank();
  for (int ep = 1; ep <= n; ++ep) {
    if (n % ep != 0) continue;
    SCOPED_TRACE("ep = " + std::to_string(ep));
    ProcessGrid grid(ParallelSizes{n, ep}, comm_);
    EXPECT_EQ(grid.ep_rank(), r % ep);
    EXPECT_EQ(grid.edp_rank(), r / ep);
    EXPECT_EQ(grid.ep().name(), "ep");
    EXPECT_EQ(grid.edp().name(), "edp");
    EXPECT_EQ(grid.ep().rank(), r % ep);
    EXPECT_EQ(grid.edp().rank(), r / ep);
    std::vector<double> ep_group, edp_group;
    for (int i = 0; i < ep; ++i) ep_group.push_back((r / ep) * ep + i);
    for (int j = 0; j < n / ep; ++j) edp_group.push_back(r % ep + j * ep);
    EXPECT_EQ(members(grid.ep(), r), ep_group);
    EXPECT_EQ(members(grid.edp(), r), edp_group);
    EXPECT_EQ(members(grid.world(), r).size(), static_cast<size_t>(n));
  }
}

TEST_P(Grid, WorldFourWithEpTwo) {
  if (comm().size() != 4) GTEST_SKIP() << "needs exactly four ranks";
  const int r = comm().rank();
  ProcessGrid grid(ParallelSizes{4, 2}, comm_);
  const std::vector<double> ep_group =
      r < 2 ? std::vector<double>{0, 1} : std::vector<double>{2, 3};
  const std::vector<double> edp_group =
      r % 2 == 0 ? std::vector<double>{0, 2} : std::vector<double>{1, 3};
  EXPECT_EQ(members(grid.ep(), r), ep_group);
  EXPECT_EQ(members(grid.edp(), r), edp_group);
}

TEST_P(Grid, InvalidLayoutFailsOnEveryRank) {
  const int n = comm().size();
  EXPECT_ERROR_CONTAINS(ProcessGrid(ParallelSizes{n, n + 1}, comm_),
                        "world size " + std::to_string(n) +
                            " is not divisible by parallel.ep = " + std::to_string(n + 1));
  EXPECT_ERROR_CONTAINS(
      ProcessGrid(ParallelSizes{2 * n, 1}, comm_),
      "ParallelDims.world = " + std::to_string(2 * n) + " but communicator 'test'");
  // The other keys, validated at the same sync point.
  EXPECT_ERROR_CONTAINS(ProcessGrid(ParallelSizes{n, 1, 3}, comm_),
                        "parallel.zero = 3: allowed values are 0");
  EXPECT_ERROR_CONTAINS(ProcessGrid(ParallelSizes{n, 1, 0, n + 1}, comm_),
                        "world size " + std::to_string(n) +
                            " is not divisible by parallel.base_shard = " + std::to_string(n + 1));
  comm().barrier();
}

TEST_P(Grid, LayoutThatDiffersBetweenRanksFailsOnEveryRank) {
  const int n = comm().size();
  if (n < 2) GTEST_SKIP() << "needs two ranks or more";
  // Rank 0 asks for ep = 1, the others for ep = n: valid everywhere, but not the same layout.
  const int ep = comm().rank() == 0 ? 1 : n;
  EXPECT_ERROR_CONTAINS(ProcessGrid(ParallelSizes{n, ep}, comm_),
                        "parallel.ep differs between ranks (from 1 to " + std::to_string(n) + ")");
  // Only rank 0 asks for a layout that is invalid: the others learn of it from the sync point.
  const int bad_ep = comm().rank() == 0 ? n + 1 : 1;
  const std::string expected = comm().rank() == 0
                                   ? "is not divisible by parallel.ep"
                                   : "the parallel layout is invalid on another rank";
  EXPECT_ERROR_CONTAINS(ProcessGrid(ParallelSizes{n, bad_ep}, comm_), expected);
  comm().barrier();
}

MOLE_FOR_EACH_BACKEND(Grid);

}  // namespace
}  // namespace mole::dist::test
