// The NCCL backend of Communicator: collectives on CUDA tensors of one device, run on a stream the
// communicator owns and waited on by polling a CUDA event against the communicator's timeout. The
// header includes neither <nccl.h> nor CUDA headers.
#pragma once

#include <memory>
#include <string>

#include "dist/communicator.h"

namespace mole::dist {

namespace detail {
struct NcclState;  // the ncclComm_t, its stream and events; shared with the Work objects
}  // namespace detail

// Tensors: CUDA tensors on this communicator's device (device()), contiguous, with the dtypes of
// the interface; bfloat16 is reduced natively (ncclBfloat16), no staging.
// Streams: each collective first makes the communicator's stream wait for the work already queued
// on the device's legacy default stream (stream 0, where LibTorch computes unless told otherwise),
// then runs on the communicator's own stream. Inputs written by kernels on any other stream must be
// synchronised by the caller before the call. Work::wait() blocks the calling thread until the
// collective has finished on the device, so the outputs may then be used from any stream.
// Errors: every CUDA and NCCL return code becomes mole::Error (call, error string, file:line). A
// wait() that times out, or an asynchronous NCCL error, aborts the communicator (ncclCommAbort):
// unlike the MPI backend, the collective does not stay in flight, and every later call on this
// communicator throws. The usual response is to end the job.
// Threads: the caller serialises every call on a communicator and on its Work objects.
// Lifetime: a Work keeps the NCCL communicator alive, so the communicator may be destroyed before
// its Work objects; the NCCL communicator is destroyed (ncclCommDestroy, or ncclCommAbort after an
// error, a timeout, or a collective dropped unfinished) once both are gone.
class NcclCommunicator final : public Communicator {
 public:
  // Collective over `bootstrap` (a CPU backend: MPI or Gloo): rank 0 makes an NCCL unique id and
  // broadcasts it over `bootstrap`, then every rank joins an NCCL communicator of the same ranks in
  // the same order on CUDA device `device`. A timed barrier on `bootstrap` precedes the blocking
  // ncclCommInitRank, so a missing peer gives an error instead of a hang. `bootstrap` must outlive
  // the returned communicator (split() uses it); groups made by split() own their bootstrap.
  static std::unique_ptr<NcclCommunicator> create(Communicator& bootstrap, int device,
                                                  double timeout_s,
                                                  const std::string& name = "world");
  ~NcclCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  const char* backend() const override { return "nccl"; }
  double timeout_s() const override { return timeout_s_; }
  int device() const { return device_; }
  at::Device tensor_device() const override {
    return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_));
  }

 private:
  NcclCommunicator(std::shared_ptr<detail::NcclState> state, Communicator* bootstrap,
                   std::unique_ptr<Communicator> owned_bootstrap, std::string name,
                   double timeout_s);

  std::shared_ptr<Work> all_reduce_impl(at::Tensor& inout, ReduceOp op) override;
  std::shared_ptr<Work> reduce_scatter_impl(const at::Tensor& input, at::Tensor& output) override;
  std::shared_ptr<Work> all_gather_impl(const at::Tensor& input, at::Tensor& output) override;
  // ncclSend/ncclRecv per peer with a nonzero row count, in one NCCL group.
  std::shared_ptr<Work> all_to_all_impl(const at::Tensor& input, at::Tensor& output,
                                        const std::vector<int64_t>& send_rows,
                                        const std::vector<int64_t>& recv_rows) override;
  std::shared_ptr<Work> broadcast_impl(at::Tensor& tensor, int root) override;
  // An all_reduce of one int32 on the device, waited on.
  void barrier_impl() override;
  // Splits the bootstrap first (same color and key: the same groups, ranks in the same order; its
  // timed barrier guards the blocking NCCL call), then ncclCommSplit where NCCL >= 2.18 has it,
  // otherwise a fresh NCCL communicator bootstrapped over the new bootstrap group.
  std::unique_ptr<Communicator> split_impl(int color, int key, const std::string& name,
                                           double timeout_s) override;

  std::shared_ptr<detail::NcclState> state_;
  Communicator* bootstrap_;                        // not owned unless owned_bootstrap_ is set
  std::unique_ptr<Communicator> owned_bootstrap_;  // the bootstrap of a group made by split()
  std::string name_;
  double timeout_s_;
  int rank_ = 0;
  int size_ = 1;
  int device_ = 0;
};

}  // namespace mole::dist
