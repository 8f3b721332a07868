// all_to_all with uneven splits along dim 0: hand-written split patterns (zero counts, a rank
// that sends nothing, a rank that receives nothing, nothing at all), the counts-then-rows
// exchange of expert dispatch, and the argument checks; each test runs once per backend.
// Data: element c of the i-th row that rank s sends to rank d is s * 1000 + d * 100 + i * 10 + c
// (bf16, one element per row: s * 64 + d * 16 + i), so every received value names its source.
#include "tests/dist/dist_test_util.h"

namespace mole::dist::test {
namespace {

class AllToAll : public BackendTest {};

// Rows that rank `src` sends to rank `dst`, as a closed form known to every rank.
using RowsFn = std::function<int64_t(int src, int dst)>;

double element(at::ScalarType dtype, int src, int dst, int64_t row, int64_t col) {
  if (dtype == at::kBFloat16) return src * 64 + dst * 16 + row;
  return src * 1000 + dst * 100 + row * 10 + col;
}

// Concatenates, over `peers`, the rows of the (src, dst) pair that each peer gives.
at::Tensor build_rows(at::ScalarType dtype, const std::vector<int64_t>& row_shape, int n,
                      const std::function<std::pair<int, int>(int peer)>& pair,
                      const RowsFn& rows) {
  int64_t row_elems = 1;
  for (int64_t d : row_shape) row_elems *= d;
  std::vector<double> data;
  int64_t total_rows = 0;
  for (int peer = 0; peer < n; ++peer) {
    const auto [src, dst] = pair(peer);
    for (int64_t i = 0; i < rows(src, dst); ++i, ++total_rows) {
      for (int64_t c = 0; c < row_elems; ++c) data.push_back(element(dtype, src, dst, i, c));
    }
  }
  std::vector<int64_t> shape{total_rows};
  shape.insert(shape.end(), row_shape.begin(), row_shape.end());
  return at::tensor(data, at::kDouble).reshape(shape).to(dtype);
}

void check_exchange(Communicator& comm, const RowsFn& rows, at::ScalarType dtype,
                    const std::vector<int64_t>& row_shape) {
  const int n = comm.size();
  const int r = comm.rank();
  std::vector<int64_t> send_rows, recv_rows;
  for (int p = 0; p < n; ++p) {
    send_rows.push_back(rows(r, p));
    recv_rows.push_back(rows(p, r));
  }
  at::Tensor input = build_rows(
      dtype, row_shape, n, [&](int p) { return std::pair(r, p); }, rows);
  at::Tensor expected = build_rows(
      dtype, row_shape, n, [&](int p) { return std::pair(p, r); }, rows);
  at::Tensor output = at::full(expected.sizes(), -1, dtype);
  comm.all_to_all(input, output, send_rows, recv_rows)->wait();
  EXPECT_EQ(output.sizes(), expected.sizes());
  EXPECT_EQ(values(output), values(expected));
}

TEST_P(AllToAll, UnevenSplitsEveryDtype) {
  auto rows = [](int src, int dst) -> int64_t { return src + dst + 1; };
  for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kLong, at::kInt}) {
    SCOPED_TRACE(c10::toString(dtype));
    check_exchange(comm(), rows, dtype, {3});
  }
  check_exchange(comm(), rows, at::kBFloat16, {1});
  check_exchange(comm(), rows, at::kFloat, {2, 2});  // rows that are matrices
  check_exchange(comm(), rows, at::kFloat, {});      // 1-D: one element per row
}

TEST_P(AllToAll, ZeroSplits) {
  // Pairs with (src + 2 * dst) % 3 == 0 exchange nothing, rank 0 with itself among them.
  check_exchange(comm(), [](int src, int dst) -> int64_t { return (src + 2 * dst) % 3; },
                 at::kFloat, {3});
}

TEST_P(AllToAll, RankZeroSendsNothing) {
  check_exchange(comm(), [](int src, int dst) -> int64_t { return src == 0 ? 0 : dst + 1; },
                 at::kFloat, {3});
}

TEST_P(AllToAll, LastRankReceivesNothing) {
  const int last = comm().size() - 1;
  check_exchange(comm(), [last](int src, int dst) -> int64_t { return dst == last ? 0 : src + 1; },
                 at::kLong, {3});
}

TEST_P(AllToAll, NothingAtAll) {
  check_exchange(comm(), [](int, int) -> int64_t { return 0; }, at::kFloat, {3});
}

// Expert dispatch's pattern: each rank knows only what it sends; one all_to_all of the counts
// (one int64 per peer) tells it what it receives, then the rows follow.
TEST_P(AllToAll, CountsThenRows) {
  const int n = comm().size();
  const int r = comm().rank();
  auto rows = [](int src, int dst) -> int64_t { return (src * 3 + dst) % 4; };
  at::Tensor send_counts = at::empty({n}, at::kLong);
  for (int p = 0; p < n; ++p) send_counts[p] = rows(r, p);
  at::Tensor recv_counts = at::full({n}, -1, at::kLong);
  const std::vector<int64_t> ones(static_cast<size_t>(n), 1);
  comm().all_to_all(send_counts, recv_counts, ones, ones)->wait();
  std::vector<int64_t> recv_rows;
  for (int p = 0; p < n; ++p) {
    recv_rows.push_back(recv_counts[p].item<int64_t>());
    EXPECT_EQ(recv_rows.back(), rows(p, r)) << "count from rank " << p;
  }
  check_exchange(comm(), rows, at::kDouble, {3});
}

TEST_P(AllToAll, ArgumentErrorsPrintTheValues) {
  const int n = comm().size();
  const std::vector<int64_t> one_each(static_cast<size_t>(n), 1);
  at::Tensor input = at::zeros({n, 3}, at::kFloat);
  at::Tensor output = at::zeros({n, 3}, at::kFloat);

  std::vector<int64_t> too_many(static_cast<size_t>(n + 1), 0);
  too_many[0] = n;
  EXPECT_ERROR_CONTAINS(
      comm().all_to_all(input, output, too_many, one_each),
      "send_rows has " + std::to_string(n + 1) + " entries [" + std::to_string(n));
  std::vector<int64_t> negative = one_each;
  negative[0] = -1;
  EXPECT_ERROR_CONTAINS(comm().all_to_all(input, output, one_each, negative),
                        "has a negative count");
  std::vector<int64_t> short_sum = one_each;
  short_sum[0] = 0;
  EXPECT_ERROR_CONTAINS(
      comm().all_to_all(input, output, short_sum, one_each),
      "sums to " + std::to_string(n - 1) + " but input has " + std::to_string(n) + " rows");
  at::Tensor wide = at::zeros({n, 4}, at::kFloat);
  EXPECT_ERROR_CONTAINS(comm().all_to_all(input, wide, one_each, one_each),
                        "input shape [" + std::to_string(n) + ", 3] and output shape [" +
                            std::to_string(n) + ", 4] differ in their row shape");
  comm().barrier();
}

MOLE_FOR_EACH_BACKEND(AllToAll);

}  // namespace
}  // namespace mole::dist::test
