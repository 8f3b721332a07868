// all_reduce, reduce_scatter, all_gather, broadcast and barrier on every supported dtype, with
// expected values from closed forms over the ranks, and the argument checks of the interface;
// each test runs once per backend.
// Data: element k of rank r is r * 1000 + k (bf16: r * 8 + k, so every value stays exact).
#include "tests/dist/dist_test_util.h"

namespace mole::dist::test {
namespace {

class Collectives : public BackendTest {};

const at::ScalarType kExactDtypes[] = {at::kFloat, at::kDouble, at::kLong, at::kInt};

// Per-rank scale of the test data: bf16 holds integers exactly only up to 256.
double rank_step(at::ScalarType dtype) { return dtype == at::kBFloat16 ? 8.0 : 1000.0; }

TEST_P(Collectives, AllReduceSumMaxMin) {
  const int n = comm().size();
  const int r = comm().rank();
  std::vector<at::ScalarType> dtypes(std::begin(kExactDtypes), std::end(kExactDtypes));
  dtypes.push_back(at::kBFloat16);
  for (at::ScalarType dtype : dtypes) {
    SCOPED_TRACE(c10::toString(dtype));
    const double step = rank_step(dtype);
    const double rank_sum = step * n * (n - 1) / 2;
    struct Case {
      ReduceOp op;
      std::function<double(int64_t)> expected;
    };
    const Case cases[] = {
        {ReduceOp::kSum, [&](int64_t k) { return rank_sum + n * k; }},
        {ReduceOp::kMax, [&](int64_t k) { return step * (n - 1) + k; }},
        {ReduceOp::kMin, [&](int64_t k) { return double(k); }},
    };
    for (const Case& c : cases) {
      SCOPED_TRACE(to_string(c.op));
      at::Tensor x = make_tensor({2, 3}, dtype, [&](int64_t k) { return r * step + k; });
      comm().all_reduce(x, c.op)->wait();
      EXPECT_EQ(x.scalar_type(), dtype);
      EXPECT_EQ(x.sizes().vec(), (std::vector<int64_t>{2, 3}));
      EXPECT_EQ(values(x), values(make_tensor({2, 3}, dtype, c.expected)));
    }
  }
}

TEST_P(Collectives, ManyInFlightWaitedInReverseOrder) {
  const int n = comm().size();
  const int r = comm().rank();
  std::vector<at::Tensor> xs;
  std::vector<std::shared_ptr<Work>> works;
  for (int i = 0; i < 4; ++i) {
    xs.push_back(make_tensor({5}, at::kFloat, [&](int64_t k) { return r * 1000 + i * 10 + k; }));
    works.push_back(comm().all_reduce(xs.back(), ReduceOp::kSum));
  }
  for (int i = 3; i >= 0; --i) {
    works[i]->wait();
    EXPECT_TRUE(works[i]->is_completed());
    works[i]->wait();  // a second wait returns at once
    EXPECT_EQ(values(xs[i]), values(make_tensor({5}, at::kFloat, [&](int64_t k) {
                return 1000.0 * n * (n - 1) / 2 + n * (i * 10 + k);
              })));
  }
}

TEST_P(Collectives, ReduceScatterSumsEachRanksBlock) {
  const int n = comm().size();
  const int r = comm().rank();
  const int64_t m = 3;  // rows per rank; each row has 2 elements
  for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kLong, at::kInt, at::kBFloat16}) {
    SCOPED_TRACE(c10::toString(dtype));
    const double step = rank_step(dtype);
    at::Tensor input = make_tensor({n * m, 2}, dtype, [&](int64_t k) { return r * step + k; });
    at::Tensor output = at::full({m, 2}, -1, dtype);
    comm().reduce_scatter(input, output)->wait();
    // Output element k of rank r is input element r * m * 2 + k summed over the ranks.
    at::Tensor expected = make_tensor({m, 2}, dtype, [&](int64_t k) {
      return step * n * (n - 1) / 2 + n * double(r * m * 2 + k);
    });
    EXPECT_EQ(values(output), values(expected));
  }
}

TEST_P(Collectives, AllGatherStacksRanksInOrder) {
  const int n = comm().size();
  const int r = comm().rank();
  const int64_t m = 2;
  for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kLong, at::kInt, at::kBFloat16}) {
    SCOPED_TRACE(c10::toString(dtype));
    const double step = rank_step(dtype);
    at::Tensor input = make_tensor({m, 3}, dtype, [&](int64_t k) { return r * step + k; });
    at::Tensor output = at::full({n * m, 3}, -1, dtype);
    comm().all_gather(input, output)->wait();
    // Block s (m * 3 elements) comes from rank s.
    at::Tensor expected = make_tensor(
        {n * m, 3}, dtype, [&](int64_t k) { return (k / (m * 3)) * step + k % (m * 3); });
    EXPECT_EQ(values(output), values(expected));
  }
}

TEST_P(Collectives, BroadcastFromTheLastRank) {
  const int n = comm().size();
  const int r = comm().rank();
  const int root = n - 1;  // non-zero whenever there are two ranks or more
  for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kLong, at::kInt, at::kBFloat16}) {
    SCOPED_TRACE(c10::toString(dtype));
    const double step = rank_step(dtype);
    at::Tensor x = r == root ? make_tensor({4, 2}, dtype, [&](int64_t k) { return r * step + k; })
                             : at::full({4, 2}, -1, dtype);
    comm().broadcast(x, root)->wait();
    EXPECT_EQ(values(x),
              values(make_tensor({4, 2}, dtype, [&](int64_t k) { return root * step + k; })));
  }
}

TEST_P(Collectives, EmptyTensors) {
  const int n = comm().size();
  at::Tensor x = at::empty({0, 4}, at::kFloat);
  comm().all_reduce(x, ReduceOp::kSum)->wait();
  at::Tensor gathered = at::empty({0, 4}, at::kFloat);
  comm().all_gather(x, gathered)->wait();
  at::Tensor scattered = at::empty({0, 4}, at::kFloat);
  comm().reduce_scatter(at::empty({0, 4}, at::kFloat), scattered)->wait();
  comm().broadcast(x, n - 1)->wait();
  EXPECT_EQ(gathered.numel(), 0);
}

TEST_P(Collectives, BarrierKeepsCollectivesMatched) {
  const int n = comm().size();
  for (int i = 0; i < 3; ++i) comm().barrier();
  at::Tensor x = at::ones({1}, at::kLong);
  comm().all_reduce(x, ReduceOp::kSum)->wait();
  comm().barrier();
  EXPECT_EQ(x.item<int64_t>(), n);
}

// Every rank passes the same bad arguments, so every rank throws before anything is started.
TEST_P(Collectives, ArgumentErrorsPrintTheValues) {
  const int n = comm().size();
  const std::string where = "on communicator 'test' (rank " + std::to_string(comm().rank()) +
                            " of " + std::to_string(n) + "): ";
  at::Tensor strided = at::zeros({3, 2}).t();
  EXPECT_ERROR_CONTAINS(comm().all_reduce(strided, ReduceOp::kSum),
                        "all_reduce " + where +
                            "inout with shape [2, 3] and strides [1, 2] is "
                            "not contiguous");
  at::Tensor bytes = at::zeros({4}, at::kByte);
  EXPECT_ERROR_CONTAINS(comm().all_reduce(bytes, ReduceOp::kMax), "inout has dtype Byte");
  at::Tensor scalar = at::zeros({}, at::kFloat);
  EXPECT_ERROR_CONTAINS(comm().broadcast(scalar, 0), "tensor is a 0-dim tensor");
  at::Tensor x = at::zeros({2}, at::kFloat);
  EXPECT_ERROR_CONTAINS(comm().broadcast(x, n),
                        "broadcast " + where + "root " + std::to_string(n) + " is not a rank");

  at::Tensor out2 = at::zeros({2, 2}, at::kFloat);
  at::Tensor in_wrong = at::zeros({2 * n + 1, 2}, at::kFloat);
  EXPECT_ERROR_CONTAINS(comm().reduce_scatter(in_wrong, out2),
                        "input has shape [" + std::to_string(2 * n + 1) + ", 2]; expected [" +
                            std::to_string(2 * n) + ", 2]");
  at::Tensor gathered_wrong = at::zeros({2 * n, 3}, at::kFloat);
  EXPECT_ERROR_CONTAINS(comm().all_gather(out2, gathered_wrong),
                        "output has shape [" + std::to_string(2 * n) + ", 3]; expected [" +
                            std::to_string(2 * n) + ", 2]");
  at::Tensor gathered_long = at::zeros({2 * n, 2}, at::kLong);
  EXPECT_ERROR_CONTAINS(comm().all_gather(out2, gathered_long),
                        "input has dtype Float but output has dtype Long");
  at::Tensor buffer = at::zeros({2 * n}, at::kFloat);
  at::Tensor head = buffer.narrow(0, 0, 2);
  EXPECT_ERROR_CONTAINS(comm().all_gather(head, buffer), "input and output share memory");
  EXPECT_ERROR_CONTAINS(comm().split(-1, 0, "bad", 1.0), "color -1 for group 'bad'");
  EXPECT_ERROR_CONTAINS(comm().split(0, 0, "bad", 0.0), "timeout_s 0 for group 'bad'");
  // Nothing was started: the communicator still works.
  comm().barrier();
}

MOLE_FOR_EACH_BACKEND(Collectives);

}  // namespace
}  // namespace mole::dist::test
