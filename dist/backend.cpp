// Backend selection and registration (see backend.h). The only place outside a backend's own
// file that knows which optional backends were compiled in.
#include "dist/backend.h"

#include "dist/mpi_communicator.h"
#include "dist/runtime.h"
#include "kernels/check.h"
#ifdef MOLE_HAVE_GLOO
#include "dist/gloo_communicator.h"
#endif
#ifdef MOLE_HAVE_NCCL
#include "dist/nccl_communicator.h"
#endif

namespace mole::dist {

std::string available_backends() {
  std::string out = "mpi";
#ifdef MOLE_HAVE_GLOO
  out += ", gloo";
#endif
#ifdef MOLE_HAVE_NCCL
  out += ", nccl";
#endif
  return out;
}

WorldCommunicator make_world_communicator(const std::string& backend, const MpiRuntime& runtime,
                                          bool cuda, int local_rank, double timeout_s) {
  WorldCommunicator world;
  world.bootstrap = MpiCommunicator::create_world(runtime, timeout_s);
  std::string kind = backend;
  if (kind == "auto") {
#ifdef MOLE_HAVE_NCCL
    kind = cuda ? "nccl" : "mpi";
#else
    kind = "mpi";
#endif
  }
  if (kind == "mpi") {
    MOLE_CHECK(!cuda, "parallel.backend mpi moves CPU tensors; with model.device cuda use nccl");
    world.comm = world.bootstrap;
    return world;
  }
  if (kind == "gloo") {
    MOLE_CHECK(!cuda, "parallel.backend gloo moves CPU tensors; with model.device cuda use nccl");
#ifdef MOLE_HAVE_GLOO
    world.comm = GlooCommunicator::create(*world.bootstrap, timeout_s);
    return world;
#endif
  }
  if (kind == "nccl") {
    MOLE_CHECK(cuda, "parallel.backend nccl needs model.device cuda");
#ifdef MOLE_HAVE_NCCL
    world.comm = NcclCommunicator::create(*world.bootstrap, local_rank, timeout_s);
    return world;
#endif
  }
  MOLE_FAIL("parallel.backend '", backend, "' is not available in this build (available: ",
            available_backends(), ")");
}

}  // namespace mole::dist
