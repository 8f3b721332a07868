// The NCCL backend on CUDA tensors, one NCCL communicator of world size 1 per rank (each rank's
// own bootstrap group), against closed forms written for any group size n. Skipped without a CUDA
// device and a CUDA LibTorch; built only where the backend is (MOLE_DIST_NCCL).
// Data: element k of rank r is r * 1000 + k (bf16: r * 8 + k, so every value stays exact).
#include <ATen/ATen.h>

#include "dist/nccl_communicator.h"
#include "tests/dist/dist_test_util.h"

namespace mole::dist::test {
namespace {

class Nccl : public DistTest {
 protected:
  void SetUp() override {
    if (!at::hasCUDA()) {
      GTEST_SKIP() << "no CUDA device, or LibTorch built without CUDA: the NCCL backend only "
                      "compiles here";
    }
    DistTest::SetUp();
    const int num_devices = static_cast<int>(at::getNumGPUs());
    device_ = runtime().rank_info().local_rank % num_devices;
    bootstrap_ = comm().split(comm().rank(), 0, "nccl-bootstrap", kTestTimeout_s);
    nccl_ = NcclCommunicator::create(*bootstrap_, device_, kTestTimeout_s, "nccl");
  }

  at::Tensor on_device(const at::Tensor& t) const { return t.to(at::Device(at::kCUDA, device_)); }
  static std::vector<double> host_values(const at::Tensor& t) { return values(t.cpu()); }

  int device_ = 0;
  std::unique_ptr<Communicator> bootstrap_;  // outlives nccl_
  std::unique_ptr<NcclCommunicator> nccl_;
};

double rank_step(at::ScalarType dtype) { return dtype == at::kBFloat16 ? 8.0 : 1000.0; }

TEST_F(Nccl, Identity) {
  EXPECT_STREQ(nccl_->backend(), "nccl");
  EXPECT_EQ(nccl_->size(), 1);
  EXPECT_EQ(nccl_->rank(), 0);
  EXPECT_EQ(nccl_->device(), device_);
}

TEST_F(Nccl, AllReduceSumMaxMin) {
  const int n = nccl_->size();
  const int r = nccl_->rank();
  for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kLong, at::kInt, at::kBFloat16}) {
    SCOPED_TRACE(c10::toString(dtype));
    const double step = rank_step(dtype);
    struct Case {
      ReduceOp op;
      std::function<double(int64_t)> expected;
    };
    const Case cases[] = {
        {ReduceOp::kSum, [&](int64_t k) { return step * n * (n - 1) / 2 + n * k; }},
        {ReduceOp::kMax, [&](int64_t k) { return step * (n - 1) + k; }},
        {ReduceOp::kMin, [&](int64_t k) { return double(k); }},
    };
    for (const Case& c : cases) {
      SCOPED_TRACE(to_string(c.op));
      at::Tensor x = on_device(make_tensor({2, 3}, dtype, [&](int64_t k) { return r * step + k; }));
      nccl_->all_reduce(x, c.op)->wait();
      EXPECT_EQ(x.scalar_type(), dtype);
      EXPECT_EQ(host_values(x), values(make_tensor({2, 3}, dtype, c.expected)));
    }
  }
}

TEST_F(Nccl, ReduceScatterAndAllGather) {
  const int n = nccl_->size();
  const int r = nccl_->rank();
  const int64_t m = 3;  // rows per rank, 2 elements each
  at::Tensor input =
      on_device(make_tensor({n * m, 2}, at::kFloat, [&](int64_t k) { return r * 1000.0 + k; }));
  at::Tensor scattered = on_device(at::full({m, 2}, -1.0, at::kFloat));
  nccl_->reduce_scatter(input, scattered)->wait();
  EXPECT_EQ(host_values(scattered), values(make_tensor({m, 2}, at::kFloat, [&](int64_t k) {
              return 1000.0 * n * (n - 1) / 2 + n * double(r * m * 2 + k);
            })));

  at::Tensor mine =
      on_device(make_tensor({m, 2}, at::kLong, [&](int64_t k) { return r * 1000.0 + k; }));
  at::Tensor gathered = on_device(at::full({n * m, 2}, -1, at::kLong));
  nccl_->all_gather(mine, gathered)->wait();
  EXPECT_EQ(host_values(gathered), values(make_tensor({n * m, 2}, at::kLong, [&](int64_t k) {
              return 1000.0 * (k / (m * 2)) + k % (m * 2);
            })));
}

// Rank s sends s + d + 1 rows to rank d (so recv_rows[p] = p + r + 1 matches); row j of that block
// holds s * 1000 + d * 100 + j in both of its 2 columns. An all-zero exchange follows.
TEST_F(Nccl, AllToAllUnevenAndEmpty) {
  const int n = nccl_->size();
  const int r = nccl_->rank();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    SCOPED_TRACE(c10::toString(dtype));
    std::vector<int64_t> send_rows;
    std::vector<int64_t> recv_rows;
    std::vector<double> send_data;
    std::vector<double> expected;
    for (int p = 0; p < n; ++p) {
      send_rows.push_back(r + p + 1);
      recv_rows.push_back(p + r + 1);
      for (int64_t j = 0; j < r + p + 1; ++j) {
        const double value = dtype == at::kBFloat16 ? r * 16 + p * 4 + j : r * 1000 + p * 100 + j;
        send_data.insert(send_data.end(), {value, value});
        const double back = dtype == at::kBFloat16 ? p * 16 + r * 4 + j : p * 1000 + r * 100 + j;
        expected.insert(expected.end(), {back, back});
      }
    }
    const int64_t send_total = static_cast<int64_t>(send_data.size()) / 2;
    const int64_t recv_total = static_cast<int64_t>(expected.size()) / 2;
    at::Tensor input =
        on_device(make_tensor({send_total, 2}, dtype, [&](int64_t k) { return send_data[k]; }));
    at::Tensor output = on_device(at::full({recv_total, 2}, -1, dtype));
    nccl_->all_to_all(input, output, send_rows, recv_rows)->wait();
    EXPECT_EQ(host_values(output), expected);
  }
  const std::vector<int64_t> zeros(n, 0);
  at::Tensor empty_in = on_device(at::empty({0, 4}, at::kFloat));
  at::Tensor empty_out = on_device(at::empty({0, 4}, at::kFloat));
  nccl_->all_to_all(empty_in, empty_out, zeros, zeros)->wait();
}

TEST_F(Nccl, BroadcastFromRoot) {
  const int r = nccl_->rank();
  at::Tensor x =
      on_device(make_tensor({4}, at::kDouble, [&](int64_t k) { return r * 1000.0 + k; }));
  nccl_->broadcast(x, 0)->wait();
  EXPECT_EQ(host_values(x),
            values(make_tensor({4}, at::kDouble, [](int64_t k) { return double(k); })));
}

TEST_F(Nccl, BarrierSplitAndDeviceCheck) {
  nccl_->barrier();
  std::unique_ptr<Communicator> half = nccl_->split(0, 0, "nccl-half", kTestTimeout_s);
  EXPECT_STREQ(half->backend(), "nccl");
  EXPECT_EQ(half->size(), 1);
  at::Tensor x = on_device(at::full({3}, 7, at::kInt));
  half->all_reduce(x, ReduceOp::kSum)->wait();
  EXPECT_EQ(host_values(x), (std::vector<double>{7, 7, 7}));

  at::Tensor on_cpu = at::zeros({3}, at::kFloat);
  EXPECT_ERROR_CONTAINS(nccl_->all_reduce(on_cpu, ReduceOp::kSum), "cpu");
}

}  // namespace
}  // namespace mole::dist::test
