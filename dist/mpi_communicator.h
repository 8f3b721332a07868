// The MPI backend of Communicator: nonblocking MPI-3 collectives on CPU tensors, each waited on
// by polling MPI_Test against the communicator's timeout. The header does not include <mpi.h>.
#pragma once

#include <memory>
#include <string>

#include "dist/communicator.h"

namespace mole::dist {

class MpiRuntime;

class MpiCommunicator final : public Communicator {
 public:
  // A private duplicate of MPI_COMM_WORLD (MPI_Comm_idup, waited on with timeout_s), with
  // MPI_ERRORS_RETURN so MPI errors become mole::Error. Collective over MPI_COMM_WORLD.
  static std::unique_ptr<MpiCommunicator> create_world(const MpiRuntime& runtime, double timeout_s,
                                                       const std::string& name = "world");
  // MPI_Comm_free. Destroy every communicator before the MpiRuntime.
  ~MpiCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  const char* backend() const override { return "mpi"; }
  double timeout_s() const override { return timeout_s_; }
  bool concurrent_use() const override;  // MPI_Query_thread gives MPI_THREAD_MULTIPLE

 private:
  struct Handle;  // owns the MPI_Comm

  MpiCommunicator(std::unique_ptr<Handle> handle, std::string name, double timeout_s);

  std::shared_ptr<Work> all_reduce_impl(at::Tensor& inout, ReduceOp op) override;
  std::shared_ptr<Work> reduce_scatter_impl(const at::Tensor& input, at::Tensor& output) override;
  std::shared_ptr<Work> all_gather_impl(const at::Tensor& input, at::Tensor& output) override;
  std::shared_ptr<Work> all_to_all_impl(const at::Tensor& input, at::Tensor& output,
                                        const std::vector<int64_t>& send_rows,
                                        const std::vector<int64_t>& recv_rows) override;
  std::shared_ptr<Work> broadcast_impl(at::Tensor& tensor, int root) override;
  void barrier_impl() override;
  // A timed barrier first, so a missing peer gives an error rather than a hang in the blocking
  // MPI_Comm_split.
  std::unique_ptr<Communicator> split_impl(int color, int key, const std::string& name,
                                           double timeout_s) override;

  std::unique_ptr<Handle> handle_;
  std::string name_;
  double timeout_s_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace mole::dist
