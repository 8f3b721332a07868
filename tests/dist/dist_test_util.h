// Shared pieces of the multi-rank tests (mole_dist_tests): the process's MPI runtime and world
// communicators (one per backend built in), fixtures giving each test its own communicator, and
// value helpers.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "dist/runtime.h"
#include "tests/expect_error.h"

namespace mole::dist::test {

// Generous: only the timeout test relies on a short one.
constexpr double kTestTimeout_s = 60.0;

MpiRuntime& runtime();
Communicator& world();  // MPI's
// The backends the shared collective tests run on: "mpi", then "gloo" in builds with Gloo.
std::vector<std::string> backends();
// The world communicator of a backend from backends(); Gloo's is created over MPI's.
Communicator& world(const std::string& backend);

// Each test runs on a fresh communicator named "test" (split from a world), so a test that
// leaves a collective unfinished on some rank cannot mismatch the collectives of the next one.
inline std::shared_ptr<Communicator> test_comm(Communicator& world) {
  return std::shared_ptr<Communicator>(world.split(0, world.rank(), "test", kTestTimeout_s));
}

// Tests of the MPI backend, or of what does not depend on the backend.
class DistTest : public ::testing::Test {
 protected:
  void SetUp() override { comm_ = test_comm(world()); }
  Communicator& comm() { return *comm_; }
  std::shared_ptr<Communicator> comm_;
};

// Tests run once per backend (TEST_P, then MOLE_FOR_EACH_BACKEND(suite)): named
// "Backends/Suite.Test/mpi" and ".../gloo".
class BackendTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { comm_ = test_comm(world(GetParam())); }
  Communicator& comm() { return *comm_; }
  std::shared_ptr<Communicator> comm_;
};

#define MOLE_FOR_EACH_BACKEND(suite)                                        \
  INSTANTIATE_TEST_SUITE_P(                                                 \
      Backends, suite, ::testing::ValuesIn(::mole::dist::test::backends()), \
      [](const ::testing::TestParamInfo<std::string>& backend) { return backend.param; })

// Elements as doubles (exact for the integer-valued test data), for EXPECT_EQ with readable output.
inline std::vector<double> values(const at::Tensor& t) {
  at::Tensor flat = t.to(at::kDouble).contiguous().reshape({-1});
  return std::vector<double>(flat.data_ptr<double>(), flat.data_ptr<double>() + flat.numel());
}

// Builds a tensor of `shape` and `dtype` whose flat element k is value(k).
inline at::Tensor make_tensor(std::vector<int64_t> shape, at::ScalarType dtype,
                              const std::function<double(int64_t)>& value) {
  at::Tensor t = at::empty(shape, at::kDouble);
  double* data = t.data_ptr<double>();
  for (int64_t k = 0; k < t.numel(); ++k) data[k] = value(k);
  return t.to(dtype);
}

// The message of the mole::Error that fn throws, or "" (with a test failure) if it throws none.
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an exception";
  return "";
}


}  // namespace mole::dist::test
