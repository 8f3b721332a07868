// Process identity and MPI lifetime: which rank this process is, read from the launcher's
// environment or from MPI, and MpiRuntime, the RAII owner of MPI_Init_thread / MPI_Finalize.
#pragma once

#include <string>

namespace mole::dist {

struct RankInfo {
  int rank = 0;
  int world = 1;
  int local_rank = 0;   // rank among the processes on this node
  int local_world = 1;  // processes on this node
};

// Reads the launcher's environment; needs no MPI, so it can run before MPI_Init (to pick a GPU).
// First launcher found wins, in this order (mpirun inside a SLURM job inherits SLURM_PROCID):
//   Open MPI: OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE
//   PMI (MPICH, Intel MPI): PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS
//   SLURM: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID and
//          SLURM_STEP_TASKS_PER_NODE or SLURM_TASKS_PER_NODE ("2(x3),1")
// None set: rank 0 of 1. Missing node-local variables: the whole world is taken to be one node.
// Throws mole::Error naming the variable for a value that is not an integer, is out of range,
// or lacks its partner (a rank without a size).
RankInfo detect_rank_info();

// This host's name (gethostname), or "?" if it cannot be read: for start-up lines and messages.
std::string host_name();

enum class ThreadLevel { kSingle, kFunneled, kSerialized, kMultiple };
const char* to_string(ThreadLevel level);

// Owns MPI for the life of the process. Construct it once, first thing in main, on every rank
// (collective over MPI_COMM_WORLD); destroy every communicator before it.
// MPI_THREAD_MULTIPLE is requested; thread_level() says what MPI provided. Below kMultiple,
// communicators must be used from one thread at a time (kSerialized) or only from the thread
// that made the runtime (kFunneled, kSingle).
// Available only in builds with MPI (MOLE_HAVE_MPI).
class MpiRuntime {
 public:
  MpiRuntime();
  // Passes argc/argv to MPI_Init_thread. If MPI is already initialised (by someone else), it is
  // adopted and left for its owner to finalise.
  MpiRuntime(int* argc, char*** argv);
  // MPI_Finalize if this object initialised MPI. If the destructor runs during exception unwinding,
  // it calls MPI_Abort instead: peers may be blocked in a collective this rank will never join,
  // and MPI_Finalize would then hang. Catch and report errors inside the runtime's scope.
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  // From MPI: world rank/size, and node-local rank/size via MPI_Comm_split_type(SHARED).
  const RankInfo& rank_info() const { return info_; }
  ThreadLevel thread_level() const { return provided_; }
  bool owns_mpi() const { return owns_; }

  // Ends the whole job (all ranks) with `code`: MPI_Abort on MPI_COMM_WORLD.
  [[noreturn]] void abort(int code) const;

 private:
  void init(int* argc, char*** argv);

  RankInfo info_;
  ThreadLevel provided_ = ThreadLevel::kSingle;
  bool owns_ = false;
  int uncaught_at_start_ = 0;
};

}  // namespace mole::dist
