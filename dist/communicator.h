// The backend-neutral collective interface: Communicator (a group of ranks) and Work (one
// collective in flight). Backends (MPI here; Gloo and NCCL later) implement the *_impl hooks; the
// public methods check arguments identically for every backend before anything is sent.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace mole::dist {

enum class ReduceOp { kSum, kMax, kMin };

// For backends whose Work completes asynchronously: calls `poll` until it returns true, spinning
// briefly and then sleeping with a backoff up to 100 us (waiting ranks leave the cores to the
// others when ranks outnumber cores). Returns false if `timeout_s` passes first.
bool poll_until(const std::function<bool()>& poll, double timeout_s);
const char* to_string(ReduceOp op);

// One collective in flight, returned by the async Communicator operations.
class Work {
 public:
  virtual ~Work() = default;
  // Blocks the calling thread until the operation is complete on this rank, then returns; the
  // output tensor may be read and the input reused only after that. Throws mole::Error if the
  // backend reports an error, or if the operation is not complete within the communicator's
  // timeout, counted from this call. After a timeout the operation is still in flight (its
  // tensors stay alive) and wait() may be called again; the usual response is to abort the job.
  // Once complete, wait() returns at once (or rethrows the same error). One thread waits on a
  // Work at a time.
  virtual void wait() = 0;
  // True if complete (successfully or not); never blocks. Drives progress on some backends.
  virtual bool is_completed() = 0;
};

// A fixed group of ranks. Contract for every collective method, as with MPI and NCCL:
//  - every rank of the group calls the same collectives in the same order, with matching
//    arguments (same dtype; sizes as documented per method; the same root);
//  - the methods are asynchronous: they validate, start the operation and return a Work; the
//    caller keeps the output tensor untouched and waits on the Work before using it. The Work
//    keeps the tensors alive until completion, so dropping the caller's handle is safe.
//  - argument errors throw mole::Error before anything is started; since arguments match on all
//    ranks, all ranks throw alike.
// Tensors: on tensor_device() (CPU for MPI and Gloo, the rank's GPU for NCCL), contiguous, dtype float32, float64, int64, int32 or bfloat16, at least 1-D. A
// dtype without native support in a backend (bfloat16 in MPI) is moved as raw bytes and reduced
// through float32 staging: exact for max/min, sum rounds once, at the end.
// Threads: the caller serialises the calls on one communicator. Using communicators or Work
// objects from several threads at once needs a backend that allows it (MPI: thread_level() of
// MpiRuntime is kMultiple).
class Communicator {
 public:
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const std::string& name() const = 0;  // role of the group: "world", "ep", "edp", ...
  virtual const char* backend() const = 0;      // "mpi", ...
  virtual double timeout_s() const = 0;         // bound on every wait, set at construction
  // Whether this backend's communicators may be used from several threads at once (one thread
  // per communicator): MPI only when it provides MPI_THREAD_MULTIPLE.
  virtual bool concurrent_use() const { return true; }
  // Where this backend's tensors live; every collective checks its tensors against it.
  virtual at::Device tensor_device() const { return at::Device(at::kCPU); }
  // "communicator 'world' (rank 1 of 4)": for error messages.
  std::string describe() const;

  // inout: same shape on all ranks; becomes the element-wise reduction over the group.
  std::shared_ptr<Work> all_reduce(at::Tensor& inout, ReduceOp op);
  // Sum over the group, scattered: input [size * n, ...] is the same shape on all ranks; output
  // [n, ...] on rank r receives the sum of every rank's rows [r * n, (r + 1) * n).
  std::shared_ptr<Work> reduce_scatter(const at::Tensor& input, at::Tensor& output);
  // input [n, ...] on every rank; output [size * n, ...] holds rank r's input in rows
  // [r * n, (r + 1) * n).
  std::shared_ptr<Work> all_gather(const at::Tensor& input, at::Tensor& output);
  // Uneven exchange along dim 0. send_rows[p] rows of input go to rank p, in rank order;
  // recv_rows[p] rows of output come from rank p, in rank order. Zero counts are allowed. Both
  // vectors have one entry per rank and sum to input.size(0) / output.size(0); input and output
  // have the same dtype and row shape. recv_rows[p] on this rank must equal send_rows[this rank]
  // on rank p: exchange the counts first (an all_to_all of one int64 per peer) when they are not
  // known.
  std::shared_ptr<Work> all_to_all(const at::Tensor& input, at::Tensor& output,
                                   const std::vector<int64_t>& send_rows,
                                   const std::vector<int64_t>& recv_rows);
  // tensor: same shape on all ranks; every rank ends with root's values.
  std::shared_ptr<Work> broadcast(at::Tensor& tensor, int root);
  // Blocks until every rank of the group has called barrier(); throws after timeout_s.
  void barrier();

  // Collective over this group: ranks with the same color (>= 0) form a new group, ordered by
  // key, then by rank here. The new group has its own name and timeout. Blocking; every rank
  // creates its groups in the same order.
  std::unique_ptr<Communicator> split(int color, int key, const std::string& name,
                                      double timeout_s);

 protected:
  Communicator() = default;

  virtual std::shared_ptr<Work> all_reduce_impl(at::Tensor& inout, ReduceOp op) = 0;
  virtual std::shared_ptr<Work> reduce_scatter_impl(const at::Tensor& input,
                                                    at::Tensor& output) = 0;
  virtual std::shared_ptr<Work> all_gather_impl(const at::Tensor& input, at::Tensor& output) = 0;
  virtual std::shared_ptr<Work> all_to_all_impl(const at::Tensor& input, at::Tensor& output,
                                                const std::vector<int64_t>& send_rows,
                                                const std::vector<int64_t>& recv_rows) = 0;
  virtual std::shared_ptr<Work> broadcast_impl(at::Tensor& tensor, int root) = 0;
  virtual void barrier_impl() = 0;
  virtual std::unique_ptr<Communicator> split_impl(int color, int key, const std::string& name,
                                                   double timeout_s) = 0;
};

}  // namespace mole::dist
