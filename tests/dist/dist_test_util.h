// Shared pieces of the multi-rank tests (mole_dist_tests): the process's MPI runtime and world
// communicator, a fixture giving each test its own communicator, and value helpers.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "dist/runtime.h"

namespace mole::dist::test {

// Generous: only the timeout test relies on a short one.
constexpr double kTestTimeout_s = 60.0;

MpiRuntime& runtime();
Communicator& world();

// Each test runs on a fresh communicator named "test" (split from the world), so a test that
// leaves a collective unfinished on some rank cannot mismatch the collectives of the next one.
class DistTest : public ::testing::Test {
 protected:
  void SetUp() override {
    comm_ = std::shared_ptr<Communicator>(world().split(0, world().rank(), "test", kTestTimeout_s));
  }
  Communicator& comm() { return *comm_; }
  std::shared_ptr<Communicator> comm_;
};

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

#define EXPECT_ERROR_CONTAINS(statement, text)                                                \
  do {                                                                                        \
    const std::string mole_error_ = ::mole::dist::test::error_of([&] { statement; });         \
    EXPECT_NE(mole_error_.find(text), std::string::npos)                                      \
        << "error message: '" << mole_error_ << "'\nexpected to contain: '" << (text) << "'"; \
  } while (0)

}  // namespace mole::dist::test
