// The Communicator contract checks, shared by every backend: each public collective validates
// its arguments (printing the actual values) and then hands over to the backend's *_impl.
#include "dist/communicator.h"

#include <ATen/ATen.h>

#include <chrono>
#include <cmath>
#include <numeric>
#include <sstream>
#include <thread>

#include "kernels/check.h"

namespace mole::dist {
namespace {

std::string list(const std::vector<int64_t>& values) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < values.size(); ++i) out << (i ? ", " : "") << values[i];
  out << "]";
  return out.str();
}

// Prefix of every argument error: "all_gather on communicator 'ep' (rank 1 of 2): ".
std::string where(const char* op, const Communicator& comm) {
  return std::string(op) + " on " + comm.describe() + ": ";
}

bool supported(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kLong || dtype == at::kInt ||
         dtype == at::kBFloat16;
}

void check_tensor(const char* op, const Communicator& comm, const char* arg, const at::Tensor& t) {
  MOLE_CHECK(t.defined(), where(op, comm), arg, " is an undefined tensor");
  MOLE_CHECK(t.device() == comm.tensor_device(), where(op, comm), arg, " is on ", t.device(),
             "; the ", comm.backend(), " backend takes tensors on ", comm.tensor_device());
  MOLE_CHECK(supported(t.scalar_type()), where(op, comm), arg, " has dtype ", t.scalar_type(),
             "; supported: Float, Double, Long, Int, BFloat16");
  MOLE_CHECK(t.dim() >= 1, where(op, comm), arg, " is a 0-dim tensor; use shape [1]");
  MOLE_CHECK(t.is_contiguous(), where(op, comm), arg, " with shape ", t.sizes(), " and strides ",
             t.strides(), " is not contiguous; call .contiguous() first");
}

void check_same_dtype(const char* op, const Communicator& comm, const at::Tensor& input,
                      const at::Tensor& output) {
  MOLE_CHECK(input.scalar_type() == output.scalar_type(), where(op, comm), "input has dtype ",
             input.scalar_type(), " but output has dtype ", output.scalar_type());
}

// Out-of-place collectives read input while writing output.
void check_no_overlap(const char* op, const Communicator& comm, const at::Tensor& input,
                      const at::Tensor& output) {
  const auto* in_begin = static_cast<const char*>(input.data_ptr());
  const auto* out_begin = static_cast<const char*>(output.data_ptr());
  const int64_t in_bytes = input.numel() * static_cast<int64_t>(input.element_size());
  const int64_t out_bytes = output.numel() * static_cast<int64_t>(output.element_size());
  const bool overlap = in_bytes > 0 && out_bytes > 0 && in_begin < out_begin + out_bytes &&
                       out_begin < in_begin + in_bytes;
  MOLE_CHECK(!overlap, where(op, comm), "input and output share memory; use separate tensors");
}

void check_rows(const char* op, const Communicator& comm, const char* name,
                const std::vector<int64_t>& rows, const char* tensor_name, int64_t tensor_rows) {
  MOLE_CHECK(static_cast<int64_t>(rows.size()) == comm.size(), where(op, comm), name, " has ",
             rows.size(), " entries ", list(rows), "; expected one per rank (", comm.size(), ")");
  for (int64_t count : rows) {
    MOLE_CHECK(count >= 0, where(op, comm), name, " ", list(rows), " has a negative count");
  }
  const int64_t total = std::accumulate(rows.begin(), rows.end(), int64_t{0});
  MOLE_CHECK(total == tensor_rows, where(op, comm), name, " ", list(rows), " sums to ", total,
             " but ", tensor_name, " has ", tensor_rows, " rows");
}

}  // namespace

const char* to_string(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kMax:
      return "max";
    case ReduceOp::kMin:
      return "min";
  }
  return "unknown reduce op";
}

std::string Communicator::describe() const {
  std::ostringstream out;
  out << "communicator '" << name() << "' (rank " << rank() << " of " << size() << ")";
  return out.str();
}

std::shared_ptr<Work> Communicator::all_reduce(at::Tensor& inout, ReduceOp op) {
  check_tensor("all_reduce", *this, "inout", inout);
  return all_reduce_impl(inout, op);
}

std::shared_ptr<Work> Communicator::reduce_scatter(const at::Tensor& input, at::Tensor& output) {
  const char* op = "reduce_scatter";
  check_tensor(op, *this, "input", input);
  check_tensor(op, *this, "output", output);
  check_same_dtype(op, *this, input, output);
  check_no_overlap(op, *this, input, output);
  std::vector<int64_t> expected = output.sizes().vec();
  expected[0] *= size();
  MOLE_CHECK(input.sizes().vec() == expected, where(op, *this), "input has shape ", input.sizes(),
             "; expected ", list(expected), " (", size(), " ranks x output shape ", output.sizes(),
             ")");
  return reduce_scatter_impl(input, output);
}

std::shared_ptr<Work> Communicator::all_gather(const at::Tensor& input, at::Tensor& output) {
  const char* op = "all_gather";
  check_tensor(op, *this, "input", input);
  check_tensor(op, *this, "output", output);
  check_same_dtype(op, *this, input, output);
  check_no_overlap(op, *this, input, output);
  std::vector<int64_t> expected = input.sizes().vec();
  expected[0] *= size();
  MOLE_CHECK(output.sizes().vec() == expected, where(op, *this), "output has shape ",
             output.sizes(), "; expected ", list(expected), " (", size(), " ranks x input shape ",
             input.sizes(), ")");
  return all_gather_impl(input, output);
}

std::shared_ptr<Work> Communicator::all_to_all(const at::Tensor& input, at::Tensor& output,
                                               const std::vector<int64_t>& send_rows,
                                               const std::vector<int64_t>& recv_rows) {
  const char* op = "all_to_all";
  check_tensor(op, *this, "input", input);
  check_tensor(op, *this, "output", output);
  check_same_dtype(op, *this, input, output);
  check_no_overlap(op, *this, input, output);
  MOLE_CHECK(input.sizes().slice(1) == output.sizes().slice(1), where(op, *this), "input shape ",
             input.sizes(), " and output shape ", output.sizes(),
             " differ in their row shape (all dims after the first)");
  check_rows(op, *this, "send_rows", send_rows, "input", input.size(0));
  check_rows(op, *this, "recv_rows", recv_rows, "output", output.size(0));
  return all_to_all_impl(input, output, send_rows, recv_rows);
}

std::shared_ptr<Work> Communicator::broadcast(at::Tensor& tensor, int root) {
  check_tensor("broadcast", *this, "tensor", tensor);
  MOLE_CHECK(root >= 0 && root < size(), where("broadcast", *this), "root ", root,
             " is not a rank of the group (0..", size() - 1, ")");
  return broadcast_impl(tensor, root);
}

void Communicator::barrier() { barrier_impl(); }

std::unique_ptr<Communicator> Communicator::split(int color, int key, const std::string& name,
                                                  double timeout_s) {
  MOLE_CHECK(color >= 0, where("split", *this), "color ", color, " for group '", name,
             "' is negative; every rank must join some group");
  MOLE_CHECK(timeout_s > 0 && !std::isnan(timeout_s), where("split", *this), "timeout_s ",
             timeout_s, " for group '", name, "' must be positive");
  return split_impl(color, key, name, timeout_s);
}

bool poll_until(const std::function<bool()>& poll, double timeout_s) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point now = Clock::now();
  const std::chrono::duration<double> budget(timeout_s);
  const Clock::time_point deadline =
      budget >= Clock::time_point::max() - now
          ? Clock::time_point::max()
          : now + std::chrono::duration_cast<Clock::duration>(budget);
  int spins = 0;
  auto pause = std::chrono::microseconds(1);
  while (!poll()) {
    if (Clock::now() >= deadline) return false;
    if (spins < 64) {
      ++spins;
      continue;
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(100));
  }
  return true;
}

}  // namespace mole::dist
