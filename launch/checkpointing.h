// Saving and resuming training checkpoints (DESIGN.md §5; the format is
// checkpoint/training_checkpoint.h). Each rank writes only what it owns: a trainable tensor every
// rank holds is written by world rank 0, an expert shard by the first rank of its EDP group, and
// the AdamW moments by whoever keeps them (their ZeRO slice owners, or the same single holder
// without ZeRO), all as element ranges of the whole tensors. Resuming reads, on every rank, the
// ranges its own layout needs, so the world size, EP size, ZeRO stage and dispatch mode may
// differ from the saving run's.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <memory>
#include <string>
#include <vector>

#include "checkpoint/training_checkpoint.h"
#include "launch/run_parts.h"
#include "launch/train_step.h"

namespace mole::dist {
class CollectiveStream;
class Communicator;
}

namespace mole::launch {

// checkpoint.dir, or `<log.dir>/ckpt`.
std::string checkpoint_dir(const Config& config);

// The checkpoint this run resumes from ("" for none; see ckpt::find_checkpoint). The same on every
// rank (they read the same files).
std::string checkpoint_to_resume(const Config& config);

// Creates checkpoint_dir and checks that this rank can write there; throws naming the folder
// and the system's reason. Every rank, before training.
void check_checkpoint_dir(const Config& config, int rank);

// Collective over the world: writes the checkpoint of `counters.step` and commits it (rank 0
// writes the manifest last, renames the folder, updates `latest`, prunes to checkpoint.keep).
// Returns the committed folder. A failure on any rank is an error on every rank, and the previous
// checkpoint stays as it was. Test hook: the environment variable MOLE_TEST_CRASH_BEFORE_MANIFEST
// set to a step number kills rank 0 (SIGKILL) at that step's save, after every rank file is
// written and before the manifest; MOLE_TEST_KILL_AFTER_CHECKPOINT=RANK:STEP kills that rank
// right after that step's checkpoint is committed; MOLE_TEST_KILL_DURING_SAVE=RANK:STEP kills it
// as that step's save starts writing its rank file (the other ranks are writing theirs).
std::string save_checkpoint(const RunParts& run, const StepCounters& counters);

// Saves checkpoints in the background (checkpoint.async): save() copies this rank's share of the
// state into host memory at the step and returns; a thread of its own writes and commits it on a
// communicator of its own (split from the world at construction, so its collectives never
// interleave with training's). One save at a time: save() and wait() first finish the previous
// one and rethrow its error, which every rank then has (the save's collectives agree on it).
// `comm` spans the run's ranks (null: one process); it must run its collectives on the host (not
// NCCL: a save's few control words need no GPU, and NCCL collectives issued from two threads in
// different orders can deadlock) and allow concurrent use (MPI_THREAD_MULTIPLE). Construction is
// collective over it. Test hook: MOLE_TEST_ASYNC_SAVE_DELAY_MS delays every background write.
class AsyncCheckpointer {
 public:
  AsyncCheckpointer(const RunParts& run, dist::Communicator* comm);
  ~AsyncCheckpointer();  // finishes a save in flight (its error logged)
  AsyncCheckpointer(const AsyncCheckpointer&) = delete;
  AsyncCheckpointer& operator=(const AsyncCheckpointer&) = delete;
  void save(const RunParts& run, const StepCounters& counters);
  // Finishes the save in flight; the folder of the last committed save ("" for none).
  std::string wait();

 private:
  std::unique_ptr<dist::CollectiveStream> stream_;
  std::string folder_;  // written by the stream's job, read after drain()
};

// Loads the checkpoint in `folder` into this rank's parts (trainable tensors, optimizer moments
// and step, data position, forward generator) and returns its counters. Checks first that it was
// made for this base model and this adapter (names both when not). Rank-local: no collectives.
StepCounters resume_from_checkpoint(RunParts& run, const std::string& folder);

// What a save wrote: the committed folder and the bytes of this rank and of all.
struct SavedCheckpoint {
  std::string folder;
  uint64_t bytes = 0;      // written by this rank
  uint64_t max_bytes = 0;  // the most any rank wrote
  uint64_t total_bytes = 0;
  double seconds = 0.0;
};
// A save in two halves, for anything with a registry and an optimizer (the checkpoint benchmark
// uses them without a model; save_checkpoint runs both, AsyncCheckpointer the second on its
// thread). take_snapshot: what this rank saves of step `step`, copied to host memory, and on rank
// 0 the manifest's tensor list and run-level fields (`describe` fills the latter). write_snapshot:
// writing and committing it, collective over `comm` (null: one process).
struct CheckpointSnapshot {
  int64_t step = 0;
  int rank = 0;
  std::vector<ckpt::PieceData> pieces;
  std::string forward_rng;
  ckpt::pb::Manifest manifest;  // rank 0
  double seconds = 0.0;         // taking it
};
CheckpointSnapshot take_snapshot(const parallel::ProcessGrid* grid, const parallel::ParameterRegistry& registry,
                                 const parallel::Optimizer& optimizer, const at::Tensor& forward_rng, int64_t step,
                                 const std::function<void(ckpt::pb::Manifest&)>& describe);
SavedCheckpoint write_snapshot(dist::Communicator* comm, const CheckpointSnapshot& snap, const std::string& dir,
                               int64_t keep);
// Reads this rank's trainable tensors and optimizer moments (any saving layout) from a stored
// checkpoint; returns the bytes of the pieces read.
uint64_t read_trainable_state(const ckpt::StoredCheckpoint& stored, const parallel::ParameterRegistry& registry,
                              parallel::Optimizer& optimizer);

// A digest of the base model: its model type and frozen tensor names and shapes (dtypes are left
// out: a run may continue in another precision), and for a synthetic base the seed its weights
// come from. Two checkpoints of one architecture (a base and its instruct variant) share it.
uint64_t base_fingerprint(const RunParts& run);
// The same for `model`, drawn from `synthetic_seed` when it is a synthetic base.
uint64_t base_fingerprint(const moe::CausalLM& model, std::optional<uint64_t> synthetic_seed);

}  // namespace mole::launch
