// The Gloo backend of Communicator: Gloo's collectives over its TCP transport, on CPU tensors.
// Gloo's operations block, so each one runs to completion inside the call that starts it (on the
// calling thread) and the returned Work is already complete: wait() returns at once, or throws the
// operation's error. Gloo's own timeout bounds each operation, so the "timed out" error comes
// from wait() like any other; a rank that times out closes its connections of that communicator,
// so its peers fail at once ("a connection to a peer broke") rather than at their own timeouts.
// A timed-out operation cannot complete later, as MPI's can: the communicator is then broken.
// The header does not include Gloo's headers.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "dist/communicator.h"

namespace mole::dist {

class GlooCommunicator final : public Communicator {
 public:
  // Collective over `bootstrap` (an MPI world, say): every rank of it calls create at the same
  // point. Each rank opens a Gloo TCP device on the address its host name resolves to, or on the
  // network interface named by GLOO_SOCKET_IFNAME when that is set (as in PyTorch; needed on
  // nodes whose host name resolves to a loopback address). The ranks then swap their pair
  // addresses through all_gathers over `bootstrap` (no file system or key-value server needed)
  // and connect every rank to every other within timeout_s. The result has bootstrap's ranks and
  // size; bootstrap is not used again once create returns.
  static std::unique_ptr<GlooCommunicator> create(Communicator& bootstrap, double timeout_s,
                                                  const std::string& name = "world");
  // Closes the connections. Peers that still wait on this communicator get an error.
  ~GlooCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  const char* backend() const override { return "gloo"; }
  double timeout_s() const override { return timeout_s_; }

 private:
  struct State;  // the Gloo device and context, the next tag, the first error

  GlooCommunicator(std::unique_ptr<State> state, std::string name, double timeout_s);

  // Runs one blocking Gloo operation and returns its completed Work. A failure (a peer gone, the
  // timeout) is kept in the Work for wait() to throw, and leaves this communicator broken: Gloo's
  // connections are in an unknown state after it, so every later operation fails at once.
  std::shared_ptr<Work> run(const char* op, const std::function<void(uint32_t tag)>& body);

  std::shared_ptr<Work> all_reduce_impl(at::Tensor& inout, ReduceOp op) override;
  // An all-reduce of a copy of input, then this rank's block: Gloo 0.5 has no reduce-scatter in
  // its options API.
  std::shared_ptr<Work> reduce_scatter_impl(const at::Tensor& input, at::Tensor& output) override;
  std::shared_ptr<Work> all_gather_impl(const at::Tensor& input, at::Tensor& output) override;
  std::shared_ptr<Work> all_to_all_impl(const at::Tensor& input, at::Tensor& output,
                                        const std::vector<int64_t>& send_rows,
                                        const std::vector<int64_t>& recv_rows) override;
  std::shared_ptr<Work> broadcast_impl(at::Tensor& tensor, int root) override;
  void barrier_impl() override;
  // Collective over this communicator: an all_gather of (color, key), then each group connects
  // its own Gloo context on this process's TCP device, swapping addresses over this communicator.
  std::unique_ptr<Communicator> split_impl(int color, int key, const std::string& name,
                                           double timeout_s) override;

  std::unique_ptr<State> state_;
  std::string name_;
  double timeout_s_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace mole::dist
