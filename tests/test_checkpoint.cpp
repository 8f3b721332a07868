// Training checkpoints (DESIGN.md §5) with real processes: the format's pieces (CRC-32C, the
// framed manifest, ranges assembled from pieces), a rank killed right after the step-6 checkpoint
// and the job resumed with the same command (bit-identical to the uninterrupted run in float32),
// a save at DP 2 x EP 2 with ZeRO 2 resumed at EP 2 with ZeRO 1 on 2 ranks and on one process
// (float64: losses and trained weights to 1e-12 of the uninterrupted run), a crash between the
// rank files and the manifest, a stop by signal, and every bad input refused with a message that
// names it.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/checksum.h"
#include "checkpoint/training_checkpoint.h"
#include "checkpoint/safetensors.h"
#include "kernels/check.h"
#include "launch/metrics_log.h"
#include "tests/expect_error.h"
#include "tests/test_util.h"
#include "tests/train_run_util.h"

namespace mole {
namespace {

namespace fs = std::filesystem;


TEST(CheckpointFormat, Crc32cKnownValues) {
  // The check value of CRC-32C (RFC 3720 B.4), and 32 zero bytes (iSCSI test vector).
  EXPECT_EQ(ckpt::crc32c("123456789", 9), 0xE3069283u);
  const std::string zeros(32, '\0');
  EXPECT_EQ(ckpt::crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);
  // Continuing a checksum equals checksumming the whole.
  EXPECT_EQ(ckpt::crc32c("6789", 4, ckpt::crc32c("12345", 5)), 0xE3069283u);
}

TEST(CheckpointFormat, PiecesAssembleAndDamageIsNamed) {
  test::TempDir dir;
  const std::string folder = dir.file("step-000002");
  fs::create_directories(folder);
  const at::Tensor whole = at::arange(10, at::kFloat);
  // Two ranks' pieces of one tensor: [0, 4) and [4, 10).
  ckpt::pb::Manifest m;
  m.set_format_version(ckpt::kCheckpointFormat);
  for (int rank : {0, 1}) {
    const int64_t begin = rank == 0 ? 0 : 4, n = rank == 0 ? 4 : 6;
    const ckpt::pb::RankPieces written =
        ckpt::write_rank_file(folder, rank, {{"w", "param", begin, whole.narrow(0, begin, n)}});
    m.add_files(written.file());
    for (const auto& p : written.pieces()) *m.add_pieces() = p;
  }
  ckpt::write_manifest(folder, m);
  {
    ckpt::StoredCheckpoint stored(folder);
    EXPECT_TRUE(stored.read("w", "param", 2, 5).equal(whole.narrow(0, 2, 5)));
    EXPECT_EQ(stored.verify_all(), 40u);
    EXPECT_ERROR_CONTAINS(stored.read("w", "param", 8, 4), "lacks elements [10, 12) of param of 'w'");
    EXPECT_ERROR_CONTAINS(stored.read("w", "exp_avg", 0, 1), "holds no exp_avg of 'w'");
  }
  // A flipped byte in rank 1's data.
  const std::string file = folder + "/" + ckpt::rank_file_name(1);
  std::string bytes = test::read_bytes(file);
  bytes[bytes.size() - 3] ^= 0x10;
  test::write_bytes(file, bytes);
  {
    ckpt::StoredCheckpoint stored(folder);
    EXPECT_TRUE(stored.read("w", "param", 0, 4).equal(whole.narrow(0, 0, 4)));  // rank 0's is fine
    EXPECT_ERROR_CONTAINS(stored.read("w", "param", 0, 10),
                          "checksum mismatch in checkpoint file '" + file + "', tensor 'param/w@4'");
  }
  // A truncated manifest, a missing one.
  const std::string manifest = folder + "/manifest.pb";
  const std::string full = test::read_bytes(manifest);
  test::write_bytes(manifest, full.substr(0, full.size() / 2));
  EXPECT_ERROR_CONTAINS(ckpt::StoredCheckpoint{folder}, "manifest.pb' is damaged");
  fs::remove(manifest);
  EXPECT_ERROR_CONTAINS(ckpt::StoredCheckpoint{folder}, "is not a committed checkpoint: it has no manifest.pb");
}

class CheckpointRuns : public test::MpiJobTest {
 protected:
  // `mole train` of the demo for 12 steps on `np` ranks (one process for 1) with micro-batch
  // 8 / np and the extra options; returns its exit code, the log in `<dir>.log`.
  int train(int np, const std::string& dir, const std::string& extra, const std::string& env = "") {
    const std::string launcher = np == 1 ? "" : test::mpirun(np);
    const std::string cmd = env + " OMP_NUM_THREADS=1 " + launcher + test::demo_train_args(dir, 8 / np) +
                            " --set train.steps=12 " + extra;
    return test::run(cmd, dir + ".log");
  }
  std::string log_of(const std::string& dir) { return test::read_bytes(dir + ".log"); }

  static std::string latest(const std::string& run) {
    std::string name = test::read_bytes(run + "/ckpt/latest");
    while (!name.empty() && name.back() == '\n') name.pop_back();
    return name;
  }
};

// Every step of `got` equal to the same step of `ref` (exactly when tol is 0), for the steps
// `got` logged.
void expect_steps_of(const std::string& ref_dir, const std::string& got_dir, int64_t first_step,
                     int64_t last_step, double tol) {
  const std::vector<nlohmann::json> ref = test::metrics(ref_dir), got = test::metrics(got_dir);
  ASSERT_EQ(got.size(), static_cast<size_t>(last_step - first_step + 1)) << got_dir;
  for (const nlohmann::json& g : got) {
    const int64_t step = g.at("step");
    ASSERT_GE(step, first_step);
    const nlohmann::json& r = ref.at(static_cast<size_t>(step - 1));
    ASSERT_EQ(r.at("step").get<int64_t>(), step);
    for (const char* key : {"loss", "aux_loss", "grad_norm", "lr"}) {
      const double a = r.at(key).get<double>(), b = g.at(key).get<double>();
      if (tol == 0.0) {
        EXPECT_EQ(b, a) << key << " at step " << step << " of " << got_dir;
      } else {
        EXPECT_NEAR(b, a, tol * std::abs(a)) << key << " at step " << step << " of " << got_dir;
      }
    }
  }
}

// Every tensor of the safetensors file `got` equal, bit for bit, to the same tensor of `ref`.
void expect_same_tensors(const std::string& ref, const std::string& got) {
  st::SafetensorsFile a(ref), b(got);
  ASSERT_EQ(b.names(), a.names()) << got;
  for (const std::string& name : a.names()) {
    const at::Tensor x = a.tensor(name), y = b.tensor(name);
    EXPECT_TRUE(x.scalar_type() == y.scalar_type() && x.sizes() == y.sizes() && at::equal(x, y))
        << name << " of " << got;
  }
}

// `mole export` of checkpoint `source` into `out` gave the adapter a run wrote at the same step
// (`run`/adapter): the same tensors bit for bit, the same adapter_config.json but for
// base_model_name_or_path, which names the synthetic base the export wrote to `out`/base (the
// same weights as the run's base/).
void expect_exported_adapter(const std::string& run, const std::string& out) {
  expect_same_tensors(run + "/adapter/adapter_model.safetensors", out + "/adapter_model.safetensors");
  nlohmann::json a = nlohmann::json::parse(test::read_bytes(run + "/adapter/adapter_config.json"));
  nlohmann::json b = nlohmann::json::parse(test::read_bytes(out + "/adapter_config.json"));
  EXPECT_EQ(b.at("base_model_name_or_path"), out + "/base");
  a.erase("base_model_name_or_path");
  b.erase("base_model_name_or_path");
  EXPECT_EQ(b, a);
  expect_same_tensors(run + "/base/model.safetensors", out + "/base/model.safetensors");
}

const std::string kLayout4 = " --set parallel.ep=2 --set parallel.zero=2 --set parallel.dispatch=tokens";

// Rank 1 dies (SIGKILL) right after the step-6 checkpoint is committed; the same command then
// continues from it: per-step losses and the adapter equal the uninterrupted run's bit for bit
// (float32, same layout: DP 2 x EP 2 with ZeRO 2 on 4 ranks).
TEST_F(CheckpointRuns, KilledRankResumesBitIdentical) {
  const std::string ref = dir_.file("ref"), run = dir_.file("run");
  ASSERT_EQ(train(4, ref, kLayout4), 0) << log_of(ref);
  const std::string ckpt = kLayout4 + " --set checkpoint.every=6";
  EXPECT_NE(train(4, run, ckpt, "MOLE_TEST_KILL_AFTER_CHECKPOINT=1:6"), 0) << log_of(run);
  EXPECT_EQ(latest(run), "step-000006");
  EXPECT_FALSE(fs::exists(run + "/adapter")) << "the killed run did not finish";
  // The stopped run's adapter, straight from its latest checkpoint (the run folder has no adapter/).
  const test::CommandResult exported =
      test::run_command(std::string(MOLE_BINARY) + " export " + run + " --out " + dir_.file("at-6"));
  ASSERT_EQ(exported.exit_code, 0) << exported.output;
  EXPECT_NE(exported.output.find("exported the adapter of " + run + "/ckpt/step-000006 (step 6"), std::string::npos)
      << exported.output;
  ASSERT_EQ(train(4, run, ckpt), 0) << log_of(run);
  EXPECT_NE(log_of(run).find("resumed from " + run + "/ckpt/step-000006 at step 6"), std::string::npos)
      << log_of(run);
  expect_steps_of(ref, run, 1, 12, 0.0);
  EXPECT_EQ(test::worst_weight_error(ref, run), 0.0);
  // TensorBoard: the continued run's event file starts over at step 7 (a restart event, so that
  // steps the killed run logged after its checkpoint are not shown twice); the first has none.
  std::vector<std::vector<int64_t>> restarts;
  for (const auto& e : fs::directory_iterator(run)) {
    if (e.path().filename().string().rfind("events.out.tfevents.", 0) == 0) {
      restarts.push_back(launch::read_tensorboard_events(e.path().string()).restarts);
    }
  }
  std::sort(restarts.begin(), restarts.end());
  EXPECT_EQ(restarts, (std::vector<std::vector<int64_t>>{{}, {7}}));
}

// checkpoint.async on 2 ranks (DP 2, ZeRO 1): the step-6 checkpoint, written on the background
// thread while training went on (its write held back by a test hook), holds exactly what the
// synchronous save of the same run holds; rank 1 dies right after it is committed (training is
// then some steps further), and the same command continues from it bit-identical to the
// uninterrupted synchronous run.
TEST_F(CheckpointRuns, AsyncSaveEqualsSyncSaveAndResumes) {
  const std::string ref = dir_.file("ref"), run = dir_.file("run");
  const std::string layout = " --set parallel.zero=1 --set checkpoint.every=3";
  ASSERT_EQ(train(2, ref, layout), 0) << log_of(ref);
  const std::string async = layout + " --set checkpoint.async=true";
  // Each background write waits 1.5 s first, so training has gone on (a step takes about 0.2 s)
  // by the time the state is written: what it writes is the copy taken at the step.
  EXPECT_NE(train(2, run, async, "MOLE_TEST_ASYNC_SAVE_DELAY_MS=1500 MOLE_TEST_KILL_AFTER_CHECKPOINT=1:6"), 0)
      << log_of(run);
  EXPECT_NE(log_of(run).find("written in the background"), std::string::npos) << log_of(run);
  EXPECT_EQ(latest(run), "step-000006");
  EXPECT_GT(test::metrics_lines(run), 7u) << "training went on while the step-6 checkpoint was written";
  for (int rank : {0, 1}) {
    const std::string file = "/ckpt/step-000006/" + ckpt::rank_file_name(rank);
    expect_same_tensors(ref + file, run + file);
  }
  const ckpt::pb::Manifest a = ckpt::read_manifest(ref + "/ckpt/step-000006");
  const ckpt::pb::Manifest b = ckpt::read_manifest(run + "/ckpt/step-000006");
  EXPECT_EQ(b.loader_position(), a.loader_position());
  EXPECT_EQ(b.optimizer_steps(), a.optimizer_steps());
  ASSERT_EQ(b.ranks_size(), a.ranks_size());
  for (int r = 0; r < a.ranks_size(); ++r) EXPECT_EQ(b.ranks(r).forward_rng(), a.ranks(r).forward_rng());
  ASSERT_EQ(train(2, run, async), 0) << log_of(run);
  EXPECT_NE(log_of(run).find("at step 6"), std::string::npos) << log_of(run);
  expect_steps_of(ref, run, 1, 12, 0.0);
  EXPECT_EQ(test::worst_weight_error(ref, run), 0.0);
  EXPECT_EQ(latest(run), "step-000009");
}

// Saved by 4 ranks (DP 2 x EP 2, ZeRO 2, token dispatch), continued by 2 ranks (EP 2, ZeRO 1,
// weight gather) and by one process: float64 losses and trained weights to 1e-12 of the
// uninterrupted run. Then the same checkpoint, damaged or mismatched, refused by name.
TEST_F(CheckpointRuns, ResumesAtOtherLayoutsAndRefusesBadCheckpoints) {
  const std::string fp64 = " --set model.dtype=fp64";
  const std::string ref = dir_.file("ref");
  ASSERT_EQ(train(4, ref, kLayout4 + fp64 + " --set checkpoint.every=6"), 0) << log_of(ref);
  const std::string saved = ref + "/ckpt/step-000006";
  ASSERT_TRUE(fs::exists(saved + "/manifest.pb"));
  EXPECT_EQ(latest(ref), "step-000006");
  const std::string from = " --set checkpoint.resume=" + saved;
  const std::string two = dir_.file("two"), one = dir_.file("one");
  ASSERT_EQ(train(2, two, from + fp64 + " --set parallel.ep=2 --set parallel.zero=1 --set parallel.dispatch=weights"), 0)
      << log_of(two);
  ASSERT_EQ(train(1, one, from + fp64), 0) << log_of(one);
  for (const std::string& got : {two, one}) {
    expect_steps_of(ref, got, 7, 12, 1e-12);
    const double worst = test::worst_weight_error(ref, got);
    RecordProperty(fs::path(got).filename().string() + "_fp64_weight_error", test::sci(worst));
    EXPECT_LT(worst, 1e-12) << got;
  }

  // `mole export` gathers the 4 ranks' shards into the adapter that a run resumed from the same
  // checkpoint at its last step writes (one process, nothing left to train).
  const std::string at6 = dir_.file("at-6"), exported = dir_.file("exported");
  ASSERT_EQ(train(1, at6, from + fp64 + " --set train.steps=6"), 0) << log_of(at6);
  const test::CommandResult exp = test::run_command(std::string(MOLE_BINARY) + " export " + saved + " --out " + exported);
  ASSERT_EQ(exp.exit_code, 0) << exp.output;
  expect_exported_adapter(at6, exported);
  const test::CommandResult again = test::run_command(std::string(MOLE_BINARY) + " export " + saved + " --out " + exported);
  EXPECT_NE(again.exit_code, 0);
  EXPECT_NE(again.output.find("already holds an adapter"), std::string::npos) << again.output;
  const test::CommandResult wrong = test::run_command(std::string(MOLE_BINARY) + " export " + saved +
                                                      " --format peft --out " + dir_.file("wrong"));
  EXPECT_NE(wrong.exit_code, 0);
  EXPECT_NE(wrong.output.find("--format peft cannot hold a mixlora adapter"), std::string::npos) << wrong.output;
  EXPECT_FALSE(fs::exists(dir_.file("wrong")));

  // Bad checkpoints: each refused before training, naming the problem; the run folder gets no
  // metrics and the checkpoint is not changed.
  const auto refused = [&](const std::string& name, const std::string& folder, const std::string& extra,
                           const std::string& expected) {
    const std::string out = dir_.file(name);
    EXPECT_NE(train(1, out, " --set checkpoint.resume=" + folder + fp64 + extra), 0) << name;
    EXPECT_NE(log_of(out).find(expected), std::string::npos) << name << ":\n" << log_of(out);
    EXPECT_FALSE(fs::exists(out + "/metrics.jsonl")) << name;
  };
  const auto copy = [&](const std::string& name) {
    const std::string to = dir_.file(name);
    fs::copy(saved, to, fs::copy_options::recursive);
    return to;
  };
  const std::string flipped = copy("flipped");
  const std::string shard = flipped + "/" + ckpt::rank_file_name(1);
  std::string bytes = test::read_bytes(shard);
  bytes[bytes.size() - 5] ^= 0x01;
  test::write_bytes(shard, bytes);
  refused("bad-flipped", flipped, "", "checksum mismatch in checkpoint file '" + shard + "', tensor '");
  EXPECT_EQ(test::read_bytes(shard), bytes) << "the damaged checkpoint was changed";
  // Export reads only the parameters: a flipped byte in a parameter piece of rank 1's file.
  const std::string flipped_param = copy("flipped-param");
  const std::string param_shard = flipped_param + "/" + ckpt::rank_file_name(1);
  std::string param_bytes = test::read_bytes(param_shard);
  const ckpt::pb::Manifest flipped_manifest = ckpt::read_manifest(flipped_param);
  for (const ckpt::pb::Piece& p : flipped_manifest.pieces()) {
    if (p.file() == ckpt::rank_file_name(1) && p.kind() == "param") {
      param_bytes[p.data_offset() + p.nbytes() / 2] ^= 0x10;
      break;
    }
  }
  test::write_bytes(param_shard, param_bytes);
  const test::CommandResult damaged =
      test::run_command(std::string(MOLE_BINARY) + " export " + flipped_param + " --out " + dir_.file("from-flipped"));
  EXPECT_NE(damaged.exit_code, 0);
  EXPECT_NE(damaged.output.find("checksum mismatch in checkpoint file '" + param_shard + "', tensor '"),
            std::string::npos)
      << damaged.output;
  EXPECT_FALSE(fs::exists(dir_.file("from-flipped") + "/adapter_config.json"));

  const std::string missing = copy("missing");
  fs::remove(missing + "/" + ckpt::rank_file_name(2));
  refused("bad-missing", missing, "", "lacks its file 'rank-00002.safetensors'");

  const std::string truncated = copy("truncated");
  const std::string manifest = test::read_bytes(truncated + "/manifest.pb");
  test::write_bytes(truncated + "/manifest.pb", manifest.substr(0, manifest.size() - 7));
  refused("bad-truncated", truncated, "", "manifest.pb' is damaged");

  refused("bad-base", saved, " --set train.seed=7", "was made for another base model ('synthetic:tiny', whose tensors or seed differed)");
  refused("bad-method", saved, " --set adapter.method=mola --set adapter.experts=4",
          "was made with adapter.method mixlora; this run uses mola");
  refused("bad-adapter", saved, " --set adapter.r=8", "but this run's adapter has");
  refused("bad-path", dir_.file("nowhere"), "", "is not a committed checkpoint folder (no manifest.pb there)");
}

// Rank 0 dies after every rank file of the step-6 save is written and before the manifest: the
// step-3 checkpoint stays `latest`, the half-written folder is never loaded, and the same command
// continues from step 3. Then rank 1 dies as the step-9 save starts: step 6 stays `latest`. The
// same command continues from step 6, bit-identical to the uninterrupted run (leftover folders
// are removed by the next commit).
TEST_F(CheckpointRuns, CrashBeforeManifestKeepsThePreviousCheckpoint) {
  const std::string ref = dir_.file("ref"), run = dir_.file("run");
  const std::string layout = " --set parallel.ep=2 --set parallel.dispatch=weights";
  ASSERT_EQ(train(2, ref, layout), 0) << log_of(ref);
  const std::string ckpt = layout + " --set checkpoint.every=3 --set checkpoint.keep=2";
  EXPECT_NE(train(2, run, ckpt, "MOLE_TEST_CRASH_BEFORE_MANIFEST=6"), 0) << log_of(run);
  EXPECT_EQ(latest(run), "step-000003");
  EXPECT_TRUE(fs::exists(run + "/ckpt/step-000006.tmp/" + ckpt::rank_file_name(1)));
  EXPECT_FALSE(fs::exists(run + "/ckpt/step-000006.tmp/manifest.pb"));
  // Continued from step 3; now rank 1 dies as the step-9 save begins (rank 0 is writing its
  // file): the job ends (no rank waits for the dead one), step 6 stays `latest`.
  const auto start = std::chrono::steady_clock::now();
  EXPECT_NE(train(2, run, ckpt, "MOLE_TEST_KILL_DURING_SAVE=1:9"), 0) << log_of(run);
  RecordProperty("dead_rank_job_end_seconds",
                 test::sci(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()));
  EXPECT_NE(log_of(run).find("at step 3"), std::string::npos) << log_of(run);
  EXPECT_EQ(latest(run), "step-000006");
  EXPECT_FALSE(fs::exists(run + "/ckpt/step-000009"));
  EXPECT_FALSE(fs::exists(run + "/ckpt/step-000009.tmp/manifest.pb"));
  EXPECT_GT(ckpt::StoredCheckpoint(run + "/ckpt/step-000006").verify_all(), 0u);
  ASSERT_EQ(train(2, run, ckpt), 0) << log_of(run);
  EXPECT_NE(log_of(run).find("at step 6"), std::string::npos) << log_of(run);
  expect_steps_of(ref, run, 1, 12, 0.0);
  EXPECT_EQ(test::worst_weight_error(ref, run), 0.0);
  // keep = 2: the newest two of steps 3, 6, 9; no interrupted save left.
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(run + "/ckpt")) left.push_back(e.path().filename());
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"latest", "step-000006", "step-000009"}));
}

// The processes whose parent is `parent` (field 4 of /proc/PID/stat, after the parenthesised
// command name): mpirun's ranks on one machine.
std::vector<pid_t> children_of(pid_t parent) {
  std::vector<pid_t> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    const std::string pid = e.path().filename().string();
    if (pid.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::string stat = test::read_bytes(e.path().string() + "/stat");
    const size_t name_end = stat.rfind(')');
    if (name_end == std::string::npos) continue;
    std::istringstream fields(stat.substr(name_end + 1));
    std::string state;
    pid_t ppid = 0;
    if (fields >> state >> ppid && ppid == parent) out.push_back(std::stoi(pid));
  }
  return out;
}

// Starts `mole train` of the demo on 2 ranks for (practically) ever, waits for 3 logged steps,
// calls `stop` with mpirun's pid and returns the job's exit status (-1: it did not exit normally
// within two minutes). Whatever happens, the job does not outlive the call: its ranks (each in a
// process group of its own) and mpirun are killed if still there.
int run_until_stopped(const std::string& run, const std::function<void(pid_t)>& stop,
                      const std::string& env = "", const std::string& extra = "") {
  const std::string cmd = env + " OMP_NUM_THREADS=1 exec " + test::mpirun(2) + test::demo_train_args(run, 4) +
                          " --set train.steps=100000" + extra + " > " + run + ".log 2>&1";
  const pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  struct Reaper {
    pid_t pid;
    bool reaped = false;
    ~Reaper() {
      if (reaped) return;
      for (pid_t rank : children_of(pid)) kill(rank, SIGKILL);
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  } reaper{pid};
  for (int i = 0; i < 600 && test::metrics_lines(run) < 3; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_GE(test::metrics_lines(run), 3u) << test::read_bytes(run + ".log");
  stop(pid);
  int status = 0;
  for (int i = 0; i < 1200 && !reaper.reaped; ++i) {
    if (waitpid(pid, &status, WNOHANG) == pid) reaper.reaped = true;
    else std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return reaper.reaped && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// SIGUSR1 to mpirun (which forwards it to every rank, as a scheduler's signal reaches every
// task): the ranks finish the step they are in, save a checkpoint of it and exit with 75; the
// same command then continues from it.
TEST_F(CheckpointRuns, SignalSavesACheckpointAndExits) {
  const std::string run = dir_.file("run");
  EXPECT_EQ(run_until_stopped(run, [](pid_t mpirun) { kill(mpirun, SIGUSR1); }), 75) << log_of(run);
  EXPECT_NE(log_of(run).find("stopped by a signal after step"), std::string::npos) << log_of(run);
  const std::string name = latest(run);
  ASSERT_FALSE(name.empty());
  const int64_t step = std::stoll(name.substr(5));
  EXPECT_EQ(static_cast<int64_t>(test::metrics_lines(run)), step) << "every finished step is logged";
  // Continue for two more steps (a shorter schedule; the step count is what is checked).
  ASSERT_EQ(test::run("OMP_NUM_THREADS=1 " + test::mpirun(2) + test::demo_train_args(run, 4) +
                          " --set train.steps=" + std::to_string(step + 2),
                      run + ".2.log"),
            0)
      << test::read_bytes(run + ".2.log");
  EXPECT_EQ(static_cast<int64_t>(test::metrics_lines(run)), step + 2);
}

// SIGTERM straight to every rank (what SLURM sends each task before preemption; mpirun is not
// involved), while a background save is in flight: the ranks agree on the step to stop after,
// finish that save, checkpoint the step and exit with 75.
TEST_F(CheckpointRuns, SigtermToEveryRankSavesACheckpointAndExits) {
  const std::string run = dir_.file("run");
  std::vector<pid_t> ranks;
  // Background saves every 2 steps, each written 1 s late: the signal comes while one is in flight.
  const int status = run_until_stopped(
      run,
      [&](pid_t mpirun) {
        ranks = children_of(mpirun);  // the ranks, on one machine
        for (pid_t rank : ranks) kill(rank, SIGTERM);
      },
      "MOLE_TEST_ASYNC_SAVE_DELAY_MS=1000", " --set checkpoint.every=2 --set checkpoint.async=true");
  EXPECT_EQ(ranks.size(), 2u);
  EXPECT_EQ(status, 75) << log_of(run);
  EXPECT_NE(log_of(run).find("written in the background"), std::string::npos) << log_of(run);
  EXPECT_NE(log_of(run).find("stopped by a signal after step"), std::string::npos) << log_of(run);
  const std::string name = latest(run);
  ASSERT_FALSE(name.empty()) << log_of(run);
  EXPECT_EQ(static_cast<int64_t>(test::metrics_lines(run)), std::stoll(name.substr(5)));
  EXPECT_GT(ckpt::StoredCheckpoint(run + "/ckpt/" + name).verify_all(), 0u);
}

// checkpoint.dir that cannot be written is refused before training; a disk that fills during a
// save (an 8 MiB tmpfs in a private mount namespace), synchronous or in the background, ends the
// run with an error that says so and leaves the previous checkpoint whole and loadable.
TEST_F(CheckpointRuns, UnwritableFolderAndFullDisk) {
  const std::string file = dir_.file("a-file");
  test::write_bytes(file, "x");
  const std::string out = dir_.file("unwritable");
  EXPECT_NE(train(1, out, " --set checkpoint.every=3 --set checkpoint.dir=" + file + "/ckpt"), 0);
  EXPECT_NE(log_of(out).find("checkpoint.dir '" + file + "/ckpt' cannot be created"), std::string::npos)
      << log_of(out);
  EXPECT_FALSE(fs::exists(out + "/metrics.jsonl"));

  if (test::run_command("unshare --user --map-root-user --mount true").exit_code != 0) {
    GTEST_SKIP() << "this machine cannot make a private tmpfs (unshare --user --mount failed)";
  }
  // Synchronous and background saves alike.
  for (const std::string mode : {"sync", "async"}) {
    SCOPED_TRACE(mode);
    const std::string disk = dir_.file("disk-" + mode), after = dir_.file("after-" + mode),
                      run = dir_.file("full-" + mode);
    fs::create_directory(disk);
    const std::string script = dir_.file("full-" + mode + ".sh");
    std::ofstream(script) << "mount -t tmpfs -o size=8m tmpfs " << disk << " || exit 99\n"
                          << "OMP_NUM_THREADS=1 " << test::demo_train_args(run, 8)
                          << " --set train.steps=12 --set checkpoint.every=3 --set checkpoint.keep=1"
                          << " --set checkpoint.async=" << (mode == "async" ? "true" : "false")
                          << " --set checkpoint.dir=" << disk << "/ckpt > " << run << ".log 2>&1"
                          << "\nrc=$?\ncp -a " << disk << "/ckpt " << after << "\nexit $rc\n";
    const test::CommandResult result = test::run_command("unshare --user --map-root-user --mount bash " + script);
    ASSERT_NE(result.exit_code, 99) << result.output;
    EXPECT_EQ(result.exit_code, 1) << log_of(run);
    EXPECT_NE(log_of(run).find("not saved"), std::string::npos) << log_of(run);
    EXPECT_NE(log_of(run).find("No space left on device"), std::string::npos) << log_of(run);
    EXPECT_NE(log_of(run).find("the previous checkpoint is intact"), std::string::npos) << log_of(run);
    EXPECT_FALSE(fs::exists(run + "/adapter")) << "a run whose save failed does not finish";
    std::string name = test::read_bytes(after + "/latest");
    ASSERT_FALSE(name.empty()) << log_of(run);
    name.pop_back();
    ckpt::StoredCheckpoint stored(after + "/" + name);
    EXPECT_GT(stored.verify_all(), 0u);
    EXPECT_GE(stored.manifest().step(), 3);
  }
}

// `mole inspect` on a checkpoint.dir (its latest), a checkpoint with --verify, the adapter and a
// safetensors file; a flipped byte makes --verify fail naming the file and tensor.
TEST_F(CheckpointRuns, InspectShowsAndVerifies) {
  const std::string run = dir_.file("run");
  ASSERT_EQ(train(1, run, " --set train.steps=4 --set checkpoint.every=2"), 0) << log_of(run);
  const std::string mole = MOLE_BINARY;
  const test::CommandResult latest_ckpt = test::run_command(mole + " inspect " + run + "/ckpt");
  ASSERT_EQ(latest_ckpt.exit_code, 0) << latest_ckpt.output;
  EXPECT_NE(latest_ckpt.output.find("training checkpoint (format 1) at step 2"), std::string::npos) << latest_ckpt.output;
  EXPECT_NE(latest_ckpt.output.find("layout: 1 rank(s), ep 1, zero 0"), std::string::npos) << latest_ckpt.output;
  const size_t experts = latest_ckpt.output.find("model.layers.0.mlp.gate_proj.experts.lora_A ");
  ASSERT_NE(experts, std::string::npos) << latest_ckpt.output;
  const std::string line = latest_ckpt.output.substr(experts, latest_ckpt.output.find('\n', experts) - experts);
  EXPECT_NE(line.find("F32   [4, 16, 128]"), std::string::npos) << line;
  const std::string folder = run + "/ckpt/step-000002";
  const test::CommandResult verified = test::run_command(mole + " inspect --verify " + folder);
  ASSERT_EQ(verified.exit_code, 0) << verified.output;
  EXPECT_NE(verified.output.find("every CRC-32C matches"), std::string::npos) << verified.output;
  const test::CommandResult adapter = test::run_command(mole + " inspect --verify " + run + "/adapter");
  ASSERT_EQ(adapter.exit_code, 0) << adapter.output;
  EXPECT_NE(adapter.output.find("adapter_config.json"), std::string::npos) << adapter.output;
  EXPECT_NE(adapter.output.find("all values finite"), std::string::npos) << adapter.output;

  // Continued from its own last step: nothing left to train, the adapter is written.
  const std::string at_end = dir_.file("at-end");
  ASSERT_EQ(train(1, at_end, " --set train.steps=2 --set checkpoint.resume=" + folder), 0) << log_of(at_end);
  EXPECT_TRUE(fs::exists(at_end + "/adapter/adapter_model.safetensors")) << log_of(at_end);

  const std::string shard = folder + "/" + ckpt::rank_file_name(0);
  std::string bytes = test::read_bytes(shard);
  bytes[bytes.size() - 1] ^= 0x40;
  test::write_bytes(shard, bytes);
  const test::CommandResult damaged = test::run_command(mole + " inspect --verify " + folder);
  EXPECT_EQ(damaged.exit_code, 1) << damaged.output;
  EXPECT_NE(damaged.output.find("checksum mismatch in checkpoint file '" + shard + "', tensor '"), std::string::npos)
      << damaged.output;
  const test::CommandResult nothing = test::run_command(mole + " inspect " + dir_.path());
  EXPECT_EQ(nothing.exit_code, 1);
  EXPECT_NE(nothing.output.find("is neither a safetensors file"), std::string::npos) << nothing.output;
}

}  // namespace
}  // namespace mole
