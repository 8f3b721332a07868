// The NCCL backend: ncclAllReduce, ncclReduceScatter, ncclAllGather, grouped ncclSend/ncclRecv and
// ncclBroadcast on CUDA tensors, queued on the communicator's own stream after the device's legacy
// default stream. Each collective records a CUDA event; NcclWork polls it (and NCCL's asynchronous
// error) against the timeout and aborts the NCCL communicator on a timeout or an error.
// Uses only the CUDA runtime C API and NCCL, no c10/cuda headers, so that it compiles against a
// CPU LibTorch as well.
#include "dist/nccl_communicator.h"

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/check.h"
#include "kernels/cuda/cuda_check.h"

#if NCCL_VERSION_CODE < NCCL_VERSION(2, 10, 0)
#error "the NCCL backend needs NCCL 2.10 or newer (ncclBfloat16)"
#endif

namespace mole::dist {
namespace {

[[noreturn]] void throw_nccl_error(const char* call, ncclResult_t rc, const std::string& context,
                                   const char* file, int line) {
  std::string text = ncclGetErrorString(rc);
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
  const char* last = ncclGetLastError(nullptr);  // thread's last error; the argument is unused
  if (last != nullptr && *last != '\0') text += std::string(": ") + last;
#endif
  MOLE_FAIL(context, ": ", ::mole::detail::call_name(call), " failed: ", text, " (",
            ::mole::detail::short_path(file), ":", line, ")");
}

}  // namespace
}  // namespace mole::dist

#define MOLE_NCCL_CHECK(call, context)                                                     \
  do {                                                                                     \
    const ncclResult_t mole_nccl_rc_ = (call);                                             \
    if (mole_nccl_rc_ != ncclSuccess) {                                                    \
      ::mole::dist::throw_nccl_error(#call, mole_nccl_rc_, (context), __FILE__, __LINE__); \
    }                                                                                      \
  } while (0)

namespace mole::dist {
namespace {

// Makes `device` current for a scope and restores the caller's device.
class DeviceGuard {
 public:
  DeviceGuard(int device, const std::string& context) {
    int current = 0;
    MOLE_CUDA_CHECK(cudaGetDevice(&current), context);
    if (current != device) {
      MOLE_CUDA_CHECK(cudaSetDevice(device), context);
      previous_ = current;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

struct EventDeleter {
  void operator()(cudaEvent_t event) const { cudaEventDestroy(event); }
};
using Event = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDeleter>;

Event make_event(const std::string& context) {
  cudaEvent_t event = nullptr;
  MOLE_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), context);
  return Event(event);
}

// What a collective in flight holds: the event recorded after it and the tensors it uses.
struct Pending {
  Event done;
  std::vector<at::Tensor> tensors;
};

// Memory the device may still write into is never freed: the tensors are leaked on purpose.
void leak(Pending pending) { (void)new std::vector<at::Tensor>(std::move(pending.tensors)); }

void warn_on_error(cudaError_t rc, const char* call) {
  if (rc != cudaSuccess && rc != cudaErrorCudartUnloading) {
    std::fprintf(stderr, "mole: %s failed: %s\n", call, cudaGetErrorString(rc));
  }
}

}  // namespace

namespace detail {

// The NCCL communicator and its CUDA resources, shared by NcclCommunicator and its NcclWork
// objects so that a Work may outlive the communicator. Destroyed once the last of them is gone.
struct NcclState {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;   // every collective runs here
  Event ready;                     // recorded on the legacy default stream before each collective
  void* barrier_buffer = nullptr;  // one int32 on the device, for barrier()
  int device = 0;
  double timeout_s = 0;
  std::string context;   // describe() of the communicator
  bool aborted = false;  // ncclCommAbort was called; comm is gone
  std::string abort_reason;
  bool failed = false;           // an NCCL call failed: abort rather than destroy
  std::vector<Pending> orphans;  // collectives whose Work finished (or was dropped) too early

  NcclState() = default;
  NcclState(const NcclState&) = delete;
  NcclState& operator=(const NcclState&) = delete;

  ~NcclState() {
    int previous = -1;
    if (cudaGetDevice(&previous) == cudaSuccess && previous != device) cudaSetDevice(device);
    reap_orphans();
    if (comm != nullptr) {
      // ncclCommDestroy only after every collective completed; otherwise abort the kernels.
      const bool abort_comm = failed || !orphans.empty();
      const ncclResult_t rc = abort_comm ? ncclCommAbort(comm) : ncclCommDestroy(comm);
      if (rc != ncclSuccess) {
        std::fprintf(stderr, "mole: %s on %s failed: %s\n",
                     abort_comm ? "ncclCommAbort" : "ncclCommDestroy", context.c_str(),
                     ncclGetErrorString(rc));
      }
      comm = nullptr;
      reap_orphans();  // an abort ends the kernels: some events may have completed since
    }
    if (!orphans.empty()) {
      std::fprintf(stderr,
                   "mole: %zu collective(s) on %s unfinished at destruction; their "
                   "tensors are leaked\n",
                   orphans.size(), context.c_str());
      for (Pending& pending : orphans) leak(std::move(pending));
    }
    if (barrier_buffer != nullptr) warn_on_error(cudaFree(barrier_buffer), "cudaFree");
    ready.reset();
    if (stream != nullptr) warn_on_error(cudaStreamDestroy(stream), "cudaStreamDestroy");
    if (previous >= 0 && previous != device) cudaSetDevice(previous);
  }

  // Aborts the NCCL communicator once: its kernels stop, its handle is freed.
  void abort(const std::string& reason) {
    if (aborted) return;
    aborted = true;
    abort_reason = reason;
    if (comm == nullptr) return;
    int previous = -1;
    if (cudaGetDevice(&previous) == cudaSuccess && previous != device) cudaSetDevice(device);
    const ncclResult_t rc = ncclCommAbort(comm);
    if (rc != ncclSuccess) {
      std::fprintf(stderr, "mole: ncclCommAbort on %s failed: %s\n", context.c_str(),
                   ncclGetErrorString(rc));
    }
    comm = nullptr;
    if (previous >= 0 && previous != device) cudaSetDevice(previous);
  }

  void check_usable(const char* op) const {
    MOLE_CHECK(!aborted, op, " on ", context, ": the NCCL communicator was aborted earlier (",
               abort_reason, "); create a new one or end the job");
  }

  // Releases the tensors of orphaned collectives that have completed.
  void reap_orphans() {
    orphans.erase(std::remove_if(
                      orphans.begin(), orphans.end(),
                      [](const Pending& p) { return cudaEventQuery(p.done.get()) == cudaSuccess; }),
                  orphans.end());
  }
};

}  // namespace detail

namespace {

using detail::NcclState;

// The stream, events and barrier buffer of a new communicator on `device`; comm is set later.
std::shared_ptr<NcclState> make_state(int device, const std::string& context, double timeout_s) {
  auto state = std::make_shared<NcclState>();
  state->device = device;
  state->timeout_s = timeout_s;
  state->context = context;
  DeviceGuard guard(device, context);
  MOLE_CUDA_CHECK(cudaStreamCreateWithFlags(&state->stream, cudaStreamNonBlocking), context);
  state->ready = make_event(context);
  MOLE_CUDA_CHECK(cudaMalloc(&state->barrier_buffer, sizeof(int32_t)), context);
  MOLE_CUDA_CHECK(cudaMemset(state->barrier_buffer, 0, sizeof(int32_t)), context);
  return state;
}

// One collective in flight. Polling as in the MPI backend: a short spin, then sleeps growing to
// 100 us.
class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<NcclState> state, const char* op, Pending pending)
      : state_(std::move(state)), op_(op), pending_(std::move(pending)) {}

  // Dropped before completion: the state keeps the tensors until the device is done with them.
  ~NcclWork() override {
    if (!poll()) state_->orphans.push_back(std::move(pending_));
  }

  void wait() override {
    if (!poll_until([this] { return poll(); }, state_->timeout_s)) {
      const std::string reason =
          ::mole::detail::cat("timed out after ", state_->timeout_s, " s in ", op_);
      state_->abort(reason);
      finish(std::make_exception_ptr(Error(::mole::detail::cat(
          reason, " on ", state_->context,
          "; the NCCL communicator was aborted (a peer rank may have died or skipped the "
          "collective)"))));
    }
    if (error_) std::rethrow_exception(error_);
  }

  bool is_completed() override { return poll(); }

 private:
  // One cudaEventQuery and one ncclCommGetAsyncError; true once finished (complete or failed).
  // Errors are kept for wait() to rethrow.
  bool poll() {
    if (done_) return true;
    const std::string where = std::string(op_) + " on " + state_->context;
    try {
      if (state_->aborted) {
        MOLE_FAIL(where, ": the NCCL communicator was aborted (", state_->abort_reason, ")");
      }
      const cudaError_t rc = cudaEventQuery(pending_.done.get());
      if (rc == cudaSuccess) {
        finish(nullptr);
        return true;
      }
      if (rc != cudaErrorNotReady) {
        state_->failed = true;
        ::mole::detail::throw_cuda_error("cudaEventQuery", rc, where, __FILE__, __LINE__);
      }
      ncclResult_t async_rc = ncclSuccess;
      MOLE_NCCL_CHECK(ncclCommGetAsyncError(state_->comm, &async_rc), where);
      if (async_rc != ncclSuccess && async_rc != ncclInProgress) {
        const std::string reason =
            std::string("asynchronous NCCL error in ") + op_ + ": " + ncclGetErrorString(async_rc);
        state_->abort(reason);
        MOLE_FAIL(where, ": ", reason, "; the NCCL communicator was aborted");
      }
      return false;
    } catch (...) {
      finish(std::current_exception());
      return true;
    }
  }

  // Ends the Work. A failed collective may still be running: its tensors go to the state, which
  // releases them once the event completes (or leaks them at destruction).
  void finish(std::exception_ptr error) {
    done_ = true;
    error_ = std::move(error);
    if (error_) {
      state_->orphans.push_back(std::move(pending_));
    } else {
      pending_ = Pending{};
    }
  }

  std::shared_ptr<NcclState> state_;
  const char* op_;
  Pending pending_;
  bool done_ = false;
  std::exception_ptr error_;
};

ncclDataType_t nccl_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return ncclFloat32;
    case at::kDouble:
      return ncclFloat64;
    case at::kLong:
      return ncclInt64;
    case at::kInt:
      return ncclInt32;
    case at::kBFloat16:
      return ncclBfloat16;
    default:
      MOLE_FAIL("NCCL backend: no NCCL type for dtype ", dtype);
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  MOLE_FAIL("NCCL backend: unknown ReduceOp ", static_cast<int>(op));
}

int64_t row_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

void check_device(const NcclState& state, const char* op, const char* arg, const at::Tensor& t) {
  MOLE_CHECK(t.is_cuda() && t.get_device() == state.device, op, " on ", state.context, ": ", arg,
             " is on ", t.device(), "; the nccl backend takes CUDA tensors on cuda:", state.device);
}

// Queues one collective: enqueue(comm, stream, where) makes the NCCL calls. The communicator's
// stream first waits for the work queued so far on the device's legacy default stream (a
// device-side dependency; the host does not block).
template <typename Enqueue>
std::shared_ptr<Work> launch(const std::shared_ptr<NcclState>& state, const char* op,
                             std::vector<at::Tensor> tensors, Enqueue&& enqueue) {
  state->check_usable(op);
  const std::string where = std::string(op) + " on " + state->context;
  DeviceGuard guard(state->device, where);
  state->reap_orphans();
  Pending pending{make_event(where), std::move(tensors)};
  MOLE_CUDA_CHECK(cudaEventRecord(state->ready.get(), cudaStreamLegacy), where);
  MOLE_CUDA_CHECK(cudaStreamWaitEvent(state->stream, state->ready.get(), 0), where);
  try {
    enqueue(state->comm, state->stream, where);
  } catch (...) {
    state->failed = true;  // the communicator may hold part of the operation
    leak(std::move(pending));
    throw;
  }
  const cudaError_t rc = cudaEventRecord(pending.done.get(), state->stream);
  if (rc != cudaSuccess) {
    state->failed = true;
    leak(std::move(pending));  // queued, but nothing can tell when it is done
    ::mole::detail::throw_cuda_error("cudaEventRecord", rc, where, __FILE__, __LINE__);
  }
  return std::make_shared<NcclWork>(state, op, std::move(pending));
}

// Calls ncclGroupEnd on every path out of a group.
class NcclGroup {
 public:
  explicit NcclGroup(const std::string& where) : where_(where) {
    MOLE_NCCL_CHECK(ncclGroupStart(), where_);
  }
  void end() {
    ended_ = true;
    MOLE_NCCL_CHECK(ncclGroupEnd(), where_);
  }
  ~NcclGroup() {
    if (!ended_) ncclGroupEnd();
  }
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;

 private:
  const std::string& where_;
  bool ended_ = false;
};

std::string describe_as(const std::string& name, int rank, int size) {
  return ::mole::detail::cat("communicator '", name, "' (rank ", rank, " of ", size, ")");
}

}  // namespace

std::unique_ptr<NcclCommunicator> NcclCommunicator::create(Communicator& bootstrap, int device,
                                                           double timeout_s,
                                                           const std::string& name) {
  const std::string context = describe_as(name, bootstrap.rank(), bootstrap.size());
  MOLE_CHECK(timeout_s > 0 && !std::isnan(timeout_s), "NCCL ", context, ": timeout_s ", timeout_s,
             " must be positive");
  int num_devices = 0;
  MOLE_CUDA_CHECK(cudaGetDeviceCount(&num_devices), "NCCL " + context);
  MOLE_CHECK(device >= 0 && device < num_devices, "NCCL ", context, ": CUDA device ", device,
             " does not exist; this process sees ", num_devices, " device(s)");
  DeviceGuard guard(device, "NCCL " + context);

  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (bootstrap.rank() == 0) MOLE_NCCL_CHECK(ncclGetUniqueId(&id), "NCCL " + context);
  // The interface moves no uint8: the 128-byte id travels as int64 words.
  static_assert(sizeof(id) % sizeof(int64_t) == 0, "ncclUniqueId is not a whole number of words");
  at::Tensor id_words = at::empty({static_cast<int64_t>(sizeof(id) / sizeof(int64_t))}, at::kLong);
  std::memcpy(id_words.data_ptr(), &id, sizeof(id));
  bootstrap.broadcast(id_words, 0)->wait();
  std::memcpy(&id, id_words.data_ptr(), sizeof(id));
  // Timed: every rank has the id, so the blocking ncclCommInitRank below is not left waiting for
  // a rank that never came (it still blocks if a peer dies in between).
  bootstrap.barrier();

  std::shared_ptr<NcclState> state = make_state(device, "NCCL " + context, timeout_s);
  ncclComm_t comm = nullptr;
  MOLE_NCCL_CHECK(ncclCommInitRank(&comm, bootstrap.size(), id, bootstrap.rank()),
                  "NCCL " + context);
  state->comm = comm;
  return std::unique_ptr<NcclCommunicator>(
      new NcclCommunicator(std::move(state), &bootstrap, nullptr, name, timeout_s));
}

NcclCommunicator::NcclCommunicator(std::shared_ptr<detail::NcclState> state,
                                   Communicator* bootstrap,
                                   std::unique_ptr<Communicator> owned_bootstrap, std::string name,
                                   double timeout_s)
    : state_(std::move(state)),
      bootstrap_(bootstrap),
      owned_bootstrap_(std::move(owned_bootstrap)),
      name_(std::move(name)),
      timeout_s_(timeout_s),
      device_(state_->device) {
  MOLE_NCCL_CHECK(ncclCommUserRank(state_->comm, &rank_), state_->context);
  MOLE_NCCL_CHECK(ncclCommCount(state_->comm, &size_), state_->context);
  MOLE_CHECK(rank_ == bootstrap_->rank() && size_ == bootstrap_->size(),
             "internal error: ", describe(), " has bootstrap ", bootstrap_->describe(),
             " of another layout");
  state_->context = describe();
}

NcclCommunicator::~NcclCommunicator() = default;

std::shared_ptr<Work> NcclCommunicator::all_reduce_impl(at::Tensor& inout, ReduceOp op) {
  const char* name = "all_reduce";
  check_device(*state_, name, "inout", inout);
  const ncclDataType_t type = nccl_type(inout.scalar_type());
  const ncclRedOp_t red = nccl_op(op);
  void* data = inout.data_ptr();
  const auto count = static_cast<size_t>(inout.numel());
  return launch(state_, name, {inout},
                [&](ncclComm_t comm, cudaStream_t stream, const std::string& where) {
                  MOLE_NCCL_CHECK(ncclAllReduce(data, data, count, type, red, comm, stream), where);
                });
}

std::shared_ptr<Work> NcclCommunicator::reduce_scatter_impl(const at::Tensor& input,
                                                            at::Tensor& output) {
  const char* name = "reduce_scatter";
  check_device(*state_, name, "input", input);
  check_device(*state_, name, "output", output);
  const ncclDataType_t type = nccl_type(input.scalar_type());
  const void* send = input.data_ptr();
  void* recv = output.data_ptr();
  const auto count = static_cast<size_t>(output.numel());
  return launch(state_, name, {input, output},
                [&](ncclComm_t comm, cudaStream_t stream, const std::string& where) {
                  MOLE_NCCL_CHECK(ncclReduceScatter(send, recv, count, type, ncclSum, comm, stream),
                                  where);
                });
}

std::shared_ptr<Work> NcclCommunicator::all_gather_impl(const at::Tensor& input,
                                                        at::Tensor& output) {
  const char* name = "all_gather";
  check_device(*state_, name, "input", input);
  check_device(*state_, name, "output", output);
  const ncclDataType_t type = nccl_type(input.scalar_type());
  const void* send = input.data_ptr();
  void* recv = output.data_ptr();
  const auto count = static_cast<size_t>(input.numel());
  return launch(state_, name, {input, output},
                [&](ncclComm_t comm, cudaStream_t stream, const std::string& where) {
                  MOLE_NCCL_CHECK(ncclAllGather(send, recv, count, type, comm, stream), where);
                });
}

std::shared_ptr<Work> NcclCommunicator::all_to_all_impl(const at::Tensor& input, at::Tensor& output,
                                                        const std::vector<int64_t>& send_rows,
                                                        const std::vector<int64_t>& recv_rows) {
  const char* name = "all_to_all";
  check_device(*state_, name, "input", input);
  check_device(*state_, name, "output", output);
  const ncclDataType_t type = nccl_type(input.scalar_type());
  const int64_t row_elems = row_numel(input);
  const int64_t elem_bytes = static_cast<int64_t>(input.element_size());
  const char* send = static_cast<const char*>(input.data_ptr());
  char* recv = static_cast<char*>(output.data_ptr());
  return launch(
      state_, name, {input, output},
      [&](ncclComm_t comm, cudaStream_t stream, const std::string& where) {
        // Peers with zero rows are skipped on both sides: recv_rows here equals send_rows there.
        NcclGroup group(where);
        int64_t send_offset = 0;
        int64_t recv_offset = 0;
        for (int peer = 0; peer < size_; ++peer) {
          const int64_t send_elems = send_rows[peer] * row_elems;
          const int64_t recv_elems = recv_rows[peer] * row_elems;
          if (send_elems > 0) {
            MOLE_NCCL_CHECK(ncclSend(send + send_offset * elem_bytes,
                                     static_cast<size_t>(send_elems), type, peer, comm, stream),
                            where);
          }
          if (recv_elems > 0) {
            MOLE_NCCL_CHECK(ncclRecv(recv + recv_offset * elem_bytes,
                                     static_cast<size_t>(recv_elems), type, peer, comm, stream),
                            where);
          }
          send_offset += send_elems;
          recv_offset += recv_elems;
        }
        group.end();
      });
}

std::shared_ptr<Work> NcclCommunicator::broadcast_impl(at::Tensor& tensor, int root) {
  const char* name = "broadcast";
  check_device(*state_, name, "tensor", tensor);
  const ncclDataType_t type = nccl_type(tensor.scalar_type());
  void* data = tensor.data_ptr();
  const auto count = static_cast<size_t>(tensor.numel());
  return launch(
      state_, name, {tensor}, [&](ncclComm_t comm, cudaStream_t stream, const std::string& where) {
        MOLE_NCCL_CHECK(ncclBroadcast(data, data, count, type, root, comm, stream), where);
      });
}

void NcclCommunicator::barrier_impl() {
  void* flag = state_->barrier_buffer;
  launch(state_, "barrier", {},
         [&](ncclComm_t comm, cudaStream_t stream, const std::string& where) {
           MOLE_NCCL_CHECK(ncclAllReduce(flag, flag, 1, ncclInt32, ncclSum, comm, stream), where);
         })
      ->wait();
}

std::unique_ptr<Communicator> NcclCommunicator::split_impl(int color, int key,
                                                           const std::string& name,
                                                           double timeout_s) {
  const char* op = "split";
  state_->check_usable(op);
  std::unique_ptr<Communicator> child_bootstrap =
      bootstrap_->split(color, key, name + ".bootstrap", timeout_s);
  Communicator* child_bootstrap_ptr = child_bootstrap.get();
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0)
  {
    const std::string where = std::string(op) + " on " + describe();
    std::shared_ptr<NcclState> state = make_state(
        device_, "NCCL " + describe_as(name, child_bootstrap->rank(), child_bootstrap->size()),
        timeout_s);
    DeviceGuard guard(device_, where);
    ncclComm_t comm = nullptr;
    const ncclResult_t rc = ncclCommSplit(state_->comm, color, key, &comm, nullptr);
    if (rc != ncclSuccess) {
      state_->failed = true;
      throw_nccl_error("ncclCommSplit", rc, where, __FILE__, __LINE__);
    }
    state->comm = comm;
    return std::unique_ptr<Communicator>(new NcclCommunicator(
        std::move(state), child_bootstrap_ptr, std::move(child_bootstrap), name, timeout_s));
  }
#endif
  // NCCL before 2.18: a fresh communicator with its own unique id, over the new bootstrap group.
  std::unique_ptr<NcclCommunicator> child = create(*child_bootstrap_ptr, device_, timeout_s, name);
  child->owned_bootstrap_ = std::move(child_bootstrap);
  return child;
}

}  // namespace mole::dist
