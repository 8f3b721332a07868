// The MPI backend: MPI_Iallreduce, MPI_Ireduce_scatter_block, MPI_Iallgather, MPI_Ialltoallv and
// MPI_Ibcast on CPU tensors. MpiWork keeps every buffer (tensors and the count/displacement
// arrays of MPI_Ialltoallv) alive until MPI_Test reports completion.
#include "dist/mpi_communicator.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <exception>
#include <functional>
#include <utility>
#include <vector>

#include "dist/mpi_utils.h"
#include "dist/runtime.h"

namespace mole::dist {
namespace {


bool mpi_finalized() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  return finalized != 0;
}

// One collective in flight, waited on with poll_until (communicator.h).
class MpiWork final : public Work {
 public:
  MpiWork(const char* op, std::string context, double timeout_s)
      : op_(op), context_(std::move(context)), timeout_s_(timeout_s) {}

  ~MpiWork() override {
    if (done_ || request_ == MPI_REQUEST_NULL || mpi_finalized()) return;
    if (poll()) return;
    // MPI may still write into the buffers: they are leaked on purpose, never freed under it.
    std::fprintf(stderr, "mole: %s on %s dropped before completion; its buffers are leaked\n", op_,
                 context_.c_str());
    abandon();
  }

  MPI_Request* request() { return &request_; }
  void keep(const at::Tensor& tensor) { tensors_.push_back(tensor); }
  // The arrays must outlive the operation (MPI_Ialltoallv reads them until completion).
  const int* keep(std::vector<int> ints) {
    int_args_.push_back(std::move(ints));
    return int_args_.back().data();
  }
  // Runs on this rank once the operation completes, before wait() returns (bf16 staging copies).
  void on_complete(std::function<void()> fn) { on_complete_ = std::move(fn); }

  void wait() override {
    if (!poll_until([this] { return poll(); }, timeout_s_)) {
      MOLE_FAIL("timed out after ", timeout_s_, " s in ", op_, " on ", context_,
                "; a peer rank may have died");
    }
    if (error_) std::rethrow_exception(error_);
  }

  bool is_completed() override { return poll(); }

 private:
  // One MPI_Test; true once complete. Errors are kept for wait() to rethrow.
  bool poll() {
    if (done_) return true;
    int flag = 0;
    const int rc = MPI_Test(&request_, &flag, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) {
      done_ = true;
      error_ = std::make_exception_ptr(Error(::mole::detail::cat(
          op_, " on ", context_, " failed in MPI_Test: ", detail::mpi_error_string(rc))));
      abandon();  // the request's state is undefined after an error
      return true;
    }
    if (!flag) return false;
    done_ = true;
    try {
      if (on_complete_) on_complete_();
    } catch (...) {
      error_ = std::current_exception();
    }
    on_complete_ = nullptr;
    tensors_.clear();
    int_args_.clear();
    return true;
  }

  void abandon() {
    (void)new std::vector<at::Tensor>(std::move(tensors_));
    (void)new std::vector<std::vector<int>>(std::move(int_args_));
    on_complete_ = nullptr;
  }

  const char* op_;
  std::string context_;
  double timeout_s_;
  MPI_Request request_ = MPI_REQUEST_NULL;
  bool done_ = false;
  std::exception_ptr error_;
  std::vector<at::Tensor> tensors_;
  std::vector<std::vector<int>> int_args_;
  std::function<void()> on_complete_;
};

// How a dtype travels: bf16 as raw 16-bit words (MPI-3 has no bf16 type).
MPI_Datatype wire_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return MPI_FLOAT;
    case at::kDouble:
      return MPI_DOUBLE;
    case at::kLong:
      return MPI_INT64_T;
    case at::kInt:
      return MPI_INT32_T;
    case at::kBFloat16:
      return MPI_UINT16_T;
    default:
      MOLE_FAIL("MPI backend: no MPI type for dtype ", dtype);
  }
}

// bf16 is reduced in float32: MPI cannot add raw 16-bit words.
bool needs_staging(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return MPI_SUM;
    case ReduceOp::kMax:
      return MPI_MAX;
    case ReduceOp::kMin:
      return MPI_MIN;
  }
  MOLE_FAIL("MPI backend: unknown ReduceOp ", static_cast<int>(op));
}

int to_count(int64_t elements, const char* op, const Communicator& comm, const char* what) {
  MOLE_CHECK(elements <= INT_MAX, op, " on ", comm.describe(), ": ", what, " has ", elements,
             " elements, more than MPI's int count limit ", INT_MAX);
  return static_cast<int>(elements);
}

int64_t row_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

// Element counts and displacements for MPI_Ialltoallv from per-peer row counts.
struct VSplits {
  std::vector<int> counts;
  std::vector<int> displs;
};

VSplits to_vsplits(const std::vector<int64_t>& rows, int64_t row_elems, const char* op,
                   const Communicator& comm, const char* what) {
  VSplits splits;
  int64_t offset = 0;
  for (int64_t r : rows) {
    splits.displs.push_back(to_count(offset, op, comm, what));
    splits.counts.push_back(to_count(r * row_elems, op, comm, what));
    offset += r * row_elems;
  }
  to_count(offset, op, comm, what);
  return splits;
}

}  // namespace

struct MpiCommunicator::Handle {
  MPI_Comm comm = MPI_COMM_NULL;
  Handle() = default;
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() {
    if (comm != MPI_COMM_NULL && !mpi_finalized()) MPI_Comm_free(&comm);
  }
};

std::unique_ptr<MpiCommunicator> MpiCommunicator::create_world(const MpiRuntime& runtime,
                                                               double timeout_s,
                                                               const std::string& name) {
  MOLE_CHECK(timeout_s > 0, "MPI communicator '", name, "': timeout_s ", timeout_s,
             " must be positive");
  auto handle = std::make_unique<Handle>();
  MpiWork dup("MPI_Comm_idup",
              "MPI_COMM_WORLD (rank " + std::to_string(runtime.rank_info().rank) + " of " +
                  std::to_string(runtime.rank_info().world) + ")",
              timeout_s);
  MOLE_MPI_CHECK(MPI_Comm_idup(MPI_COMM_WORLD, &handle->comm, dup.request()));
  try {
    dup.wait();
  } catch (...) {
    handle.release();  // MPI may still write the new communicator into it
    throw;
  }
  return std::unique_ptr<MpiCommunicator>(new MpiCommunicator(std::move(handle), name, timeout_s));
}

MpiCommunicator::MpiCommunicator(std::unique_ptr<Handle> handle, std::string name, double timeout_s)
    : handle_(std::move(handle)), name_(std::move(name)), timeout_s_(timeout_s) {
  MOLE_MPI_CHECK(MPI_Comm_set_errhandler(handle_->comm, MPI_ERRORS_RETURN));
  MOLE_MPI_CHECK(MPI_Comm_rank(handle_->comm, &rank_));
  MOLE_MPI_CHECK(MPI_Comm_size(handle_->comm, &size_));
}

MpiCommunicator::~MpiCommunicator() = default;

bool MpiCommunicator::concurrent_use() const {
  int provided = MPI_THREAD_SINGLE;
  return MPI_Query_thread(&provided) == MPI_SUCCESS && provided == MPI_THREAD_MULTIPLE;
}

std::shared_ptr<Work> MpiCommunicator::all_reduce_impl(at::Tensor& inout, ReduceOp op) {
  const char* name = "all_reduce";
  auto work = std::make_shared<MpiWork>(name, describe(), timeout_s_);
  at::Tensor buffer = inout;
  if (needs_staging(inout)) {
    buffer = inout.to(at::kFloat);
    work->on_complete([inout, buffer]() mutable { inout.copy_(buffer); });
  }
  work->keep(inout);
  work->keep(buffer);
  MOLE_MPI_CHECK(MPI_Iallreduce(
      MPI_IN_PLACE, buffer.data_ptr(), to_count(buffer.numel(), name, *this, "inout"),
      wire_type(buffer.scalar_type()), mpi_op(op), handle_->comm, work->request()));
  return work;
}

std::shared_ptr<Work> MpiCommunicator::reduce_scatter_impl(const at::Tensor& input,
                                                           at::Tensor& output) {
  const char* name = "reduce_scatter";
  auto work = std::make_shared<MpiWork>(name, describe(), timeout_s_);
  at::Tensor send = input;
  at::Tensor recv = output;
  if (needs_staging(input)) {
    send = input.to(at::kFloat);
    recv = at::empty(output.sizes(), output.options().dtype(at::kFloat));
    work->on_complete([output, recv]() mutable { output.copy_(recv); });
  }
  work->keep(input);
  work->keep(output);
  work->keep(send);
  work->keep(recv);
  to_count(send.numel(), name, *this, "input");
  MOLE_MPI_CHECK(MPI_Ireduce_scatter_block(
      send.data_ptr(), recv.data_ptr(), to_count(recv.numel(), name, *this, "output"),
      wire_type(send.scalar_type()), MPI_SUM, handle_->comm, work->request()));
  return work;
}

std::shared_ptr<Work> MpiCommunicator::all_gather_impl(const at::Tensor& input,
                                                       at::Tensor& output) {
  const char* name = "all_gather";
  auto work = std::make_shared<MpiWork>(name, describe(), timeout_s_);
  work->keep(input);
  work->keep(output);
  const MPI_Datatype type = wire_type(input.scalar_type());
  const int count = to_count(input.numel(), name, *this, "input");
  to_count(output.numel(), name, *this, "output");
  MOLE_MPI_CHECK(MPI_Iallgather(input.data_ptr(), count, type, output.data_ptr(), count, type,
                                handle_->comm, work->request()));
  return work;
}

std::shared_ptr<Work> MpiCommunicator::all_to_all_impl(const at::Tensor& input, at::Tensor& output,
                                                       const std::vector<int64_t>& send_rows,
                                                       const std::vector<int64_t>& recv_rows) {
  const char* name = "all_to_all";
  auto work = std::make_shared<MpiWork>(name, describe(), timeout_s_);
  work->keep(input);
  work->keep(output);
  const int64_t row_elems = row_numel(input);
  VSplits send = to_vsplits(send_rows, row_elems, name, *this, "input");
  VSplits recv = to_vsplits(recv_rows, row_elems, name, *this, "output");
  const int* send_counts = work->keep(std::move(send.counts));
  const int* send_displs = work->keep(std::move(send.displs));
  const int* recv_counts = work->keep(std::move(recv.counts));
  const int* recv_displs = work->keep(std::move(recv.displs));
  const MPI_Datatype type = wire_type(input.scalar_type());
  MOLE_MPI_CHECK(MPI_Ialltoallv(input.data_ptr(), send_counts, send_displs, type, output.data_ptr(),
                                recv_counts, recv_displs, type, handle_->comm, work->request()));
  return work;
}

std::shared_ptr<Work> MpiCommunicator::broadcast_impl(at::Tensor& tensor, int root) {
  const char* name = "broadcast";
  auto work = std::make_shared<MpiWork>(name, describe(), timeout_s_);
  work->keep(tensor);
  MOLE_MPI_CHECK(MPI_Ibcast(tensor.data_ptr(), to_count(tensor.numel(), name, *this, "tensor"),
                            wire_type(tensor.scalar_type()), root, handle_->comm, work->request()));
  return work;
}

void MpiCommunicator::barrier_impl() {
  MpiWork work("barrier", describe(), timeout_s_);
  MOLE_MPI_CHECK(MPI_Ibarrier(handle_->comm, work.request()));
  work.wait();
}

std::unique_ptr<Communicator> MpiCommunicator::split_impl(int color, int key,
                                                          const std::string& name,
                                                          double timeout_s) {
  barrier();
  auto handle = std::make_unique<Handle>();
  MOLE_MPI_CHECK(MPI_Comm_split(handle_->comm, color, key, &handle->comm));
  return std::unique_ptr<Communicator>(new MpiCommunicator(std::move(handle), name, timeout_s));
}

}  // namespace mole::dist
