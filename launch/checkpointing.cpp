// Saving and resuming training checkpoints (see checkpointing.h).
#include "launch/checkpointing.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <thread>

#include "checkpoint/atomic_file.h"
#include "checkpoint/checksum.h"
#include "checkpoint/safetensors_format.h"
#include "checkpoint/training_checkpoint.h"
#include "dist/collective_stream.h"
#include "dist/communicator.h"
#include "kernels/check.h"
#include "moe/random.h"
#include "parallel/process_grid.h"
#include "launch/trainer.h"

namespace mole::launch {
namespace {

namespace fs = std::filesystem;

const char* dtype_text(at::ScalarType t) {
  return t == at::kDouble ? "F64" : t == at::kBFloat16 ? "BF16" : t == at::kHalf ? "F16" : "F32";
}

// Every rank's `bytes` on every rank (lengths first, then the bytes packed into int64 words).
std::vector<std::string> all_gather_bytes(dist::Communicator& comm, const std::string& bytes) {
  const int n = comm.size();
  at::Tensor mine = at::tensor({static_cast<int64_t>(bytes.size())}, at::kLong).to(comm.tensor_device());
  at::Tensor sizes = at::empty({n}, mine.options());
  comm.all_gather(mine, sizes)->wait();
  sizes = sizes.cpu();
  int64_t longest = 0;
  for (int r = 0; r < n; ++r) longest = std::max(longest, sizes[r].item<int64_t>());
  const int64_t words = std::max<int64_t>(1, (longest + 7) / 8);
  at::Tensor packed = at::zeros({words}, at::kLong);
  std::memcpy(packed.data_ptr(), bytes.data(), bytes.size());
  packed = packed.to(comm.tensor_device());
  at::Tensor all = at::empty({n * words}, packed.options());
  comm.all_gather(packed, all)->wait();
  all = all.cpu().contiguous();
  std::vector<std::string> out;
  for (int r = 0; r < n; ++r) {
    const char* begin = reinterpret_cast<const char*>(all.data_ptr<int64_t>() + r * words);
    out.emplace_back(begin, static_cast<size_t>(sizes[r].item<int64_t>()));
  }
  return out;
}

// The largest value of `flag` over `comm` (null: one process): whether any rank failed.
bool any_rank(dist::Communicator* comm, bool flag) {
  if (!comm || comm->size() == 1) return flag;
  at::Tensor t = at::tensor({static_cast<int64_t>(flag)}, at::kLong).to(comm->tensor_device());
  comm->all_reduce(t, dist::ReduceOp::kMax)->wait();
  return t.cpu().item<int64_t>() != 0;
}

// This rank's share of the checkpoint: parameters it is the writer of, and its moments.
std::vector<ckpt::PieceData> rank_pieces(const parallel::ProcessGrid* grid,
                                         const parallel::ParameterRegistry& registry,
                                         const parallel::Optimizer& optimizer) {
  std::vector<ckpt::PieceData> out;
  for (const parallel::ParamSlot& s : registry.slots()) {
    const bool writer = !grid || (s.sharded() ? grid->edp_rank() == 0 : grid->rank() == 0);
    // A copy in host memory (straight from the device for a GPU tensor: no second device copy).
    if (writer) {
      out.push_back({s.name, "param", parallel::global_begin(s),
                     s.tensor.detach().reshape({-1}).to(at::kCPU, /*non_blocking=*/false, /*copy=*/true)});
    }
  }
  for (parallel::StatePiece& p : optimizer.state_pieces()) {
    out.push_back({p.name, p.kind, p.begin, std::move(p.values)});
  }
  return out;
}

// The run-level fields of a manifest.
void describe_run(const RunParts& run, const StepCounters& counters, ckpt::pb::Manifest& m) {
  const Config& c = run.config;
  m.set_dispatch(c.parallel.dispatch);
  m.set_config_digest(config_digest(c));
  m.set_config_yaml(to_yaml(c));
  m.set_base_fingerprint(base_fingerprint(run));
  m.set_base(c.model.base);
  m.set_method(c.adapter.method);
  m.set_adapter(c.adapter.method + ", " + std::to_string(run.registry->global_numel()) +
                " trainable parameters in " + std::to_string(run.registry->slots().size()) + " tensors");
  m.set_seed(c.train.seed);
  m.set_global_batch(c.train.global_batch);
  const LoaderCursor cursor = run.loader->cursor();
  m.set_loader_epoch(cursor.epoch);
  m.set_loader_position(cursor.position);
  m.set_skipped_steps(counters.skipped);
  m.set_consecutive_bad(counters.consecutive_bad);
}
// The test hooks of checkpointing.h.
bool crash_requested(int64_t step) {
  const char* value = std::getenv("MOLE_TEST_CRASH_BEFORE_MANIFEST");
  return value != nullptr && std::strtoll(value, nullptr, 10) == step;
}

// Kills this rank (SIGKILL) when `variable` is set to "RANK:STEP" naming it and `step`.
void die_if_requested(const char* variable, int rank, int64_t step, const char* when) {
  const char* value = std::getenv(variable);
  if (value == nullptr) return;
  char* end = nullptr;
  const long long r = std::strtoll(value, &end, 10);
  if (end == nullptr || *end != ':' || r != rank || std::strtoll(end + 1, nullptr, 10) != step) return;
  spdlog::warn("{}: rank {} dies {} step {}", variable, rank, when, step);
  std::raise(SIGKILL);
}

// The end of a save that failed on some rank: every rank throws, naming `error` (this rank's)
// or, where this rank had none, `elsewhere`.
[[noreturn]] void fail_save(int64_t step, const std::string& error, const char* elsewhere) {
  MOLE_FAIL("checkpoint of step ", step, " not saved: ", error.empty() ? elsewhere : error,
            "; the previous checkpoint is intact");
}

}  // namespace

std::string checkpoint_dir(const Config& config) {
  return config.checkpoint.dir.empty() ? config.log.dir + "/ckpt" : config.checkpoint.dir;
}

std::string checkpoint_to_resume(const Config& config) {
  return ckpt::find_checkpoint(checkpoint_dir(config), config.checkpoint.resume);
}

void check_checkpoint_dir(const Config& config, int rank) {
  const std::string dir = checkpoint_dir(config);
  std::error_code ec;
  fs::create_directories(dir, ec);
  MOLE_CHECK(!ec, "checkpoint.dir '", dir, "' cannot be created: ", ec.message());
  const std::string probe = dir + "/.write-test." + std::to_string(rank) + "." + std::to_string(::getpid());
  {
    std::ofstream out(probe);
    out << "x";
    out.flush();
    MOLE_CHECK(out.good(), "checkpoint.dir '", dir, "' is not writable (", std::strerror(errno),
               "); no training was started");
  }
  fs::remove(probe, ec);
}

uint64_t base_fingerprint(const moe::CausalLM& model, std::optional<uint64_t> synthetic_seed) {
  uint64_t hash = ckpt::fnv1a_field(model.config().model_type, ckpt::kFnvOffset);
  model.for_each_base_parameter([&](const std::string& name, const at::Tensor& t) {
    hash = ckpt::fnv1a_field(name, hash);
    hash = ckpt::fnv1a_field(st::shape_text(t.sizes().vec()), hash);
  });
  // A synthetic base is drawn from the seed: another seed is another model, and so is another way
  // of drawing (blocks of its own generator per tensor since the base could be drawn part by part).
  if (synthetic_seed) hash = ckpt::fnv1a_field("seed " + std::to_string(*synthetic_seed) + " draw blocks", hash);
  return hash;
}

uint64_t base_fingerprint(const RunParts& run) {
  return base_fingerprint(*run.model, run.synthetic_base() ? std::optional<uint64_t>(run.config.train.seed)
                                                           : std::nullopt);
}

CheckpointSnapshot take_snapshot(const parallel::ProcessGrid* grid, const parallel::ParameterRegistry& registry,
                                 const parallel::Optimizer& optimizer, const at::Tensor& forward_rng, int64_t step,
                                 const std::function<void(ckpt::pb::Manifest&)>& describe) {
  const auto start = std::chrono::steady_clock::now();
  CheckpointSnapshot snap;
  snap.step = step;
  snap.rank = grid ? grid->rank() : 0;
  snap.pieces = rank_pieces(grid, registry, optimizer);
  for (ckpt::PieceData& p : snap.pieces) p.values = p.values.to(at::kCPU);
  const at::Tensor rng = forward_rng.to(at::kCPU).contiguous();
  snap.forward_rng.assign(static_cast<const char*>(rng.data_ptr()), static_cast<size_t>(rng.numel() * rng.element_size()));
  if (snap.rank == 0) {
    ckpt::pb::Manifest& m = snap.manifest;
    m.set_format_version(ckpt::kCheckpointFormat);
    m.set_step(step);
    m.set_world(grid ? grid->dims().world() : 1);
    m.set_ep(grid ? grid->dims().ep() : 1);
    m.set_zero(grid ? grid->dims().zero() : 0);
    m.set_optimizer_steps(optimizer.steps_taken());
    for (const parallel::ParamSlot& s : registry.slots()) {
      ckpt::pb::TensorSpec* t = m.add_tensors();
      t->set_name(s.name);
      for (int64_t d : s.global_shape) t->add_shape(d);
      t->set_dtype(dtype_text(s.tensor.scalar_type()));
    }
    describe(m);
  }
  snap.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return snap;
}

SavedCheckpoint write_snapshot(dist::Communicator* comm, const CheckpointSnapshot& snap, const std::string& dir,
                               int64_t keep) {
  const auto start = std::chrono::steady_clock::now();
  const int64_t step = snap.step;
  const std::string name = ckpt::step_folder_name(step);
  const std::string tmp = dir + "/" + name + ".tmp";
  const int rank = snap.rank, world = comm ? comm->size() : 1;
  std::string error;
  if (rank == 0) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    fs::create_directories(tmp, ec);
    if (ec) error = "cannot create '" + tmp + "': " + ec.message();
  }
  if (any_rank(comm, !error.empty())) fail_save(step, error, "rank 0 could not create its folder");
  // Every rank's file, then every rank's pieces to rank 0 (which also tells it the files are
  // there). A rank that fails still takes part, so that nobody waits.
  die_if_requested("MOLE_TEST_KILL_DURING_SAVE", rank, step, "while saving");
  ckpt::pb::RankPieces mine;
  try {
    mine = ckpt::write_rank_file(tmp, rank, snap.pieces);
  } catch (const std::exception& e) {
    error = e.what();
  }
  mine.mutable_state()->set_rank(rank);
  mine.mutable_state()->set_forward_rng(snap.forward_rng);
  const bool failed = any_rank(comm, !error.empty());
  std::vector<ckpt::pb::RankPieces> ranks;
  if (!failed) {
    std::string bytes;
    mine.SerializeToString(&bytes);
    const std::vector<std::string> all = world > 1 ? all_gather_bytes(*comm, bytes) : std::vector<std::string>{bytes};
    for (const std::string& b : all) {
      ranks.emplace_back();
      MOLE_CHECK(ranks.back().ParseFromString(b), "checkpoint: a rank's piece list does not parse");
    }
  }
  if (failed) {
    if (rank == 0) {
      std::error_code ec;
      fs::remove_all(tmp, ec);
    }
    fail_save(step, error, "another rank could not write its file");
  }
  SavedCheckpoint saved;
  saved.folder = dir + "/" + name;
  for (const ckpt::pb::RankPieces& r : ranks) {
    uint64_t bytes = 0;
    for (const ckpt::pb::Piece& p : r.pieces()) bytes += p.nbytes();
    saved.total_bytes += bytes;
    saved.max_bytes = std::max(saved.max_bytes, bytes);
    if (r.state().rank() == rank) saved.bytes = bytes;
  }
  std::string commit_error;
  if (rank == 0) {
    if (crash_requested(step)) {
      spdlog::warn("MOLE_TEST_CRASH_BEFORE_MANIFEST: rank 0 dies before the manifest of step {}", step);
      std::raise(SIGKILL);
    }
    try {
      ckpt::pb::Manifest m = snap.manifest;
      for (const ckpt::pb::RankPieces& r : ranks) {
        *m.add_ranks() = r.state();
        if (!r.file().empty()) m.add_files(r.file());
        for (const ckpt::pb::Piece& p : r.pieces()) *m.add_pieces() = p;
      }
      ckpt::write_manifest(tmp, m);
      ckpt::commit_checkpoint(dir, name, keep);
    } catch (const std::exception& e) {
      commit_error = e.what();
      std::error_code ec;
      fs::remove_all(tmp, ec);
    }
  }
  if (any_rank(comm, !commit_error.empty())) fail_save(step, commit_error, "rank 0 could not commit it");
  die_if_requested("MOLE_TEST_KILL_AFTER_CHECKPOINT", rank, step, "after the checkpoint of");
  saved.seconds = snap.seconds + std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return saved;
}

namespace {

void log_saved(int rank, int world, const SavedCheckpoint& saved, const char* how) {
  if (rank != 0) return;
  constexpr double kMiB = 1024.0 * 1024.0;
  spdlog::info("checkpoint {} saved{} in {:.2f} s: {:.2f} MiB in {} file(s), at most {:.2f} MiB per rank",
               saved.folder, how, saved.seconds, saved.total_bytes / kMiB, world, saved.max_bytes / kMiB);
}

CheckpointSnapshot snapshot_run(const RunParts& run, const StepCounters& counters) {
  return take_snapshot(run.grid.get(), *run.registry, *run.optimizer, run.forward_gen.get_state(), counters.step,
                       [&](ckpt::pb::Manifest& m) { describe_run(run, counters, m); });
}

}  // namespace

std::string save_checkpoint(const RunParts& run, const StepCounters& counters) {
  const SavedCheckpoint saved =
      write_snapshot(run.world() > 1 ? &run.grid->world() : nullptr, snapshot_run(run, counters),
                     checkpoint_dir(run.config), run.config.checkpoint.keep);
  log_saved(run.rank(), run.world(), saved, "");
  return saved.folder;
}

AsyncCheckpointer::AsyncCheckpointer(const RunParts& run, dist::Communicator* comm) {
  std::unique_ptr<dist::Communicator> own;
  if (run.world() > 1) {
    MOLE_CHECK(comm != nullptr && comm->size() == run.world(), "checkpoint.async: no communicator over the run's ",
               run.world(), " ranks");
    MOLE_CHECK(comm->tensor_device().is_cpu(), "checkpoint.async needs a host communicator (MPI or Gloo) for its "
               "thread; this run has only the ", comm->backend(), " backend's");
    MOLE_CHECK(comm->concurrent_use(), "checkpoint.async writes checkpoints on a thread of its own, which the ",
               comm->backend(), " backend here does not allow (MPI must provide MPI_THREAD_MULTIPLE); "
               "set checkpoint.async=false");
    own = comm->split(0, comm->rank(), comm->name() + "-ckpt", comm->timeout_s());
  }
  stream_ = std::make_unique<dist::CollectiveStream>(std::move(own));
}

AsyncCheckpointer::~AsyncCheckpointer() {
  try {
    stream_->drain();
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
  }
}

void AsyncCheckpointer::save(const RunParts& run, const StepCounters& counters) {
  wait();
  auto snap = std::make_shared<const CheckpointSnapshot>(snapshot_run(run, counters));
  const int rank = run.rank(), world = run.world();
  if (rank == 0) {
    spdlog::info("checkpoint of step {}: state copied in {:.3f} s, written in the background", snap->step,
                 snap->seconds);
  }
  const char* delay = std::getenv("MOLE_TEST_ASYNC_SAVE_DELAY_MS");
  const int64_t delay_ms = delay ? std::strtoll(delay, nullptr, 10) : 0;
  stream_->submit([this, snap, rank, world, delay_ms, dir = checkpoint_dir(run.config),
                   keep = run.config.checkpoint.keep](dist::Communicator* comm) {
    if (delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    const SavedCheckpoint saved = write_snapshot(comm, *snap, dir, keep);
    log_saved(rank, world, saved, " in the background");
    folder_ = saved.folder;
  });
}

std::string AsyncCheckpointer::wait() {
  stream_->drain();
  return folder_;
}

uint64_t read_trainable_state(const ckpt::StoredCheckpoint& stored, const parallel::ParameterRegistry& registry,
                              parallel::Optimizer& optimizer) {
  uint64_t bytes = 0;
  {
    at::NoGradGuard no_grad;
    for (const parallel::ParamSlot& s : registry.slots()) {
      const at::Tensor values = stored.read(s.name, "param", parallel::global_begin(s), s.tensor.numel());
      s.tensor.detach().view({-1}).copy_(values);
      bytes += static_cast<uint64_t>(values.numel() * values.element_size());
    }
  }
  const at::ScalarType dtype = registry.slots().empty() ? at::kFloat : registry.slots().front().tensor.scalar_type();
  optimizer.load_state_pieces(
      [&](const std::string& name, const std::string& kind, int64_t begin, int64_t count) {
        at::Tensor values = stored.read(name, kind, begin, count);
        bytes += static_cast<uint64_t>(values.numel() * values.element_size());
        return values.to(dtype);
      },
      stored.manifest().optimizer_steps());
  return bytes;
}
StepCounters resume_from_checkpoint(RunParts& run, const std::string& folder) {
  const Config& c = run.config;
  ckpt::StoredCheckpoint stored(folder);
  const ckpt::pb::Manifest& m = stored.manifest();
  MOLE_CHECK(m.base_fingerprint() == base_fingerprint(run), "checkpoint '", folder,
             "' was made for another base model ('", m.base(), "'", m.base() == c.model.base ? ", whose tensors or seed differed" : "",
             "); this run trains on '", c.model.base, "'");
  MOLE_CHECK(m.method() == c.adapter.method, "checkpoint '", folder, "' was made with adapter.method ",
             m.method(), "; this run uses ", c.adapter.method);
  if (run.rank() == 0 && (m.seed() != c.train.seed || m.global_batch() != c.train.global_batch)) {
    spdlog::warn("checkpoint '{}' was made with train.seed {} and train.global_batch {}; this run has {} and {}: "
                 "the data order from here on differs from the saving run's", folder, m.seed(), m.global_batch(),
                 c.train.seed, c.train.global_batch);
  }
  // The same trainable tensors with the same whole shapes.
  std::map<std::string, std::vector<int64_t>> saved;
  for (const ckpt::pb::TensorSpec& t : m.tensors()) saved[t.name()] = {t.shape().begin(), t.shape().end()};
  std::set<std::string> mine;
  for (const parallel::ParamSlot& s : run.registry->slots()) {
    mine.insert(s.name);
    const auto it = saved.find(s.name);
    MOLE_CHECK(it != saved.end(), "checkpoint '", folder, "' has no '", s.name,
               "': it holds another adapter (", m.adapter(), ") than this run's");
    MOLE_CHECK(it->second == s.global_shape, "checkpoint '", folder, "' holds '", s.name, "' as ",
               st::shape_text(it->second), " but this run's adapter has ", st::shape_text(s.global_shape),
               " (the checkpoint's adapter: ", m.adapter(), ")");
  }
  for (const auto& [name, shape] : saved) {
    MOLE_CHECK(mine.count(name), "checkpoint '", folder, "' holds '", name,
               "', which this run's adapter does not have (the checkpoint's adapter: ", m.adapter(), ")");
  }
  const auto start = std::chrono::steady_clock::now();
  const uint64_t bytes = read_trainable_state(stored, *run.registry, *run.optimizer);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  run.loader->restore(LoaderCursor{m.loader_epoch(), m.loader_position()});
  // The forward generators: each rank's own state at the same world size; otherwise fresh
  // streams seeded by train.seed, the rank and the step (dropout and jitter then differ from an
  // uninterrupted run's draws, as any change of layout makes them).
  const int rank = run.rank();
  bool restored = false;
  if (m.world() == run.world()) {
    for (const ckpt::pb::RankState& r : m.ranks()) {
      if (r.rank() != rank) continue;
      const std::string& bytes = r.forward_rng();
      at::Tensor state = at::empty({static_cast<int64_t>(bytes.size())}, at::kByte);
      std::memcpy(state.data_ptr(), bytes.data(), bytes.size());
      try {
        run.forward_gen.set_state(state);
        restored = true;
      } catch (const std::exception&) {
        // Saved on another kind of device (a CUDA generator's state on a CPU run): re-seeded below.
      }
    }
  }
  if (!restored) {
    run.forward_gen = moe::make_generator(forward_seed(c.train.seed + static_cast<uint64_t>(m.step()), rank),
                                          run.forward_gen.device());
  }
  if (rank == 0) {
    spdlog::info("resumed from {} at step {} (saved by {} rank(s), ep {}, zero {}; now {}, ep {}, zero {}); "
                 "rank 0 read {:.2f} MiB in {:.2f} s",
                 folder, m.step(), m.world(), m.ep(), m.zero(), run.world(),
                 run.grid ? run.grid->dims().ep() : 1, run.grid ? run.grid->dims().zero() : 0,
                 bytes / (1024.0 * 1024.0), seconds);
  }
  StepCounters counters;
  counters.step = m.step();
  counters.skipped = m.skipped_steps();
  counters.consecutive_bad = m.consecutive_bad();
  return counters;
}

}  // namespace mole::launch
