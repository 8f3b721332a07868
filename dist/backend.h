// Chooses and builds the world communicator of a run from `parallel.backend`: MPI (CPU tensors,
// always present under mpirun), Gloo (CPU tensors), NCCL (CUDA tensors). `auto` picks NCCL when
// the model runs on CUDA and NCCL was compiled in, MPI otherwise. Gloo and NCCL bootstrap through
// MPI, whose communicator the returned object keeps alive.
#pragma once

#include <memory>
#include <string>

#include "dist/communicator.h"

namespace mole::dist {

class MpiRuntime;

struct WorldCommunicator {
  std::shared_ptr<Communicator> bootstrap;  // MPI world (also `comm` for the MPI backend)
  std::shared_ptr<Communicator> comm;       // the collectives of training
};

// Collective over every rank. `cuda`: the model's device type; `local_rank` picks the GPU.
// Throws mole::Error naming the backend when it was not compiled in or does not fit the device.
WorldCommunicator make_world_communicator(const std::string& backend, const MpiRuntime& runtime,
                                          bool cuda, int local_rank, double timeout_s);

// Which backends this build has, e.g. "mpi, gloo, nccl".
std::string available_backends();

}  // namespace mole::dist
