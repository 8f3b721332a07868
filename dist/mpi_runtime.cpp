// MpiRuntime: MPI_Init_thread / MPI_Finalize / MPI_Abort for the process (see runtime.h).
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <thread>

#include "dist/mpi_utils.h"
#include "dist/runtime.h"

namespace mole::dist {
namespace {

ThreadLevel from_mpi_level(int level) {
  if (level == MPI_THREAD_MULTIPLE) return ThreadLevel::kMultiple;
  if (level == MPI_THREAD_SERIALIZED) return ThreadLevel::kSerialized;
  if (level == MPI_THREAD_FUNNELED) return ThreadLevel::kFunneled;
  return ThreadLevel::kSingle;
}

}  // namespace

MpiRuntime::MpiRuntime() { init(nullptr, nullptr); }

MpiRuntime::MpiRuntime(int* argc, char*** argv) { init(argc, argv); }

void MpiRuntime::init(int* argc, char*** argv) {
  uncaught_at_start_ = std::uncaught_exceptions();
  int finalized = 0;
  MOLE_MPI_CHECK(MPI_Finalized(&finalized));
  MOLE_CHECK(!finalized,
             "MpiRuntime: MPI was already finalised in this process and cannot be "
             "initialised again");
  int initialized = 0;
  MOLE_MPI_CHECK(MPI_Initialized(&initialized));
  int provided = MPI_THREAD_SINGLE;
  if (initialized) {
    MOLE_MPI_CHECK(MPI_Query_thread(&provided));
  } else {
    MOLE_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided));
    owns_ = true;
  }
  provided_ = from_mpi_level(provided);

  // MPI_COMM_WORLD keeps its fatal error handler: a failure in the calls below ends the job with
  // MPI's own message.
  MOLE_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &info_.rank));
  MOLE_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &info_.world));
  struct NodeComm {
    MPI_Comm comm = MPI_COMM_NULL;
    ~NodeComm() {
      if (comm != MPI_COMM_NULL) MPI_Comm_free(&comm);
    }
  } node;
  MOLE_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, info_.rank,
                                     MPI_INFO_NULL, &node.comm));
  MOLE_MPI_CHECK(MPI_Comm_rank(node.comm, &info_.local_rank));
  MOLE_MPI_CHECK(MPI_Comm_size(node.comm, &info_.local_world));
}

MpiRuntime::~MpiRuntime() {
  if (!owns_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (std::uncaught_exceptions() > uncaught_at_start_) {
    std::fprintf(stderr,
                 "mole: rank %d of %d: MPI runtime left by an exception; aborting all ranks\n",
                 info_.rank, info_.world);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
}

void MpiRuntime::abort(int code) const {
  // MPI_Abort asks the launcher to end the job; with the network to it gone (a cut link, a dead
  // node) that request can wait forever, and so can a flush into a full pipe. This rank ends
  // within 10 s regardless.
  std::thread([code] {
    std::this_thread::sleep_for(std::chrono::seconds(10));
    std::_Exit(code);
  }).detach();
  std::fflush(stdout);
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, code);
  std::abort();  // MPI_Abort does not return; this keeps [[noreturn]] honest if it ever did.
}

}  // namespace mole::dist
