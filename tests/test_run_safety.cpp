// Nothing silent, through the real binary: a run folder that holds another run is refused (and
// replaced only when asked), a run whose every step was skipped fails without writing an adapter,
// and wrong invocations (an unknown subcommand, a directory as the config, an empty config) say
// what is wrong.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "tests/test_util.h"

namespace mole {
namespace {

namespace fs = std::filesystem;

test::CommandResult run_mole(const std::string& args) {
  return test::run_command(std::string(MOLE_BINARY) + " " + args);
}

// A one-step MixLoRA run on the built-in base into `log_dir`, plus `extra` options.
std::string train_args(const std::string& config, const std::string& log_dir,
                       const std::string& extra = "") {
  return "train " + config + " --set log.dir=" + log_dir +
         " --set train.steps=1 --set train.micro_batch=2 --set train.global_batch=2"
         " --set data.seq_len=32 --set data.synthetic_examples=16 --set log.tensorboard=false " +
         extra;
}

std::string write_config(const test::TempDir& dir, const std::string& text) {
  const std::string path = dir.file("run.yaml");
  std::ofstream(path) << text;
  return path;
}

int count_lines(const std::string& path) {
  std::ifstream in(path);
  int n = 0;
  for (std::string line; std::getline(in, line);) n += !line.empty();
  return n;
}

TEST(RunSafety, AnotherRunInLogDirIsRefusedUnlessOverwriteIsAsked) {
  test::TempDir dir;
  const std::string config = write_config(dir, "adapter: {method: mixlora, experts: 2}\n");
  const std::string run_dir = dir.file("run");
  const test::CommandResult first = run_mole(train_args(config, run_dir));
  ASSERT_EQ(first.exit_code, 0) << first.output;
  ASSERT_EQ(count_lines(run_dir + "/metrics.jsonl"), 1);
  const std::string adapter = test::read_bytes(run_dir + "/adapter/adapter_model.safetensors");

  // Again into the same folder: refused, naming what is there and both ways on; nothing touched.
  const test::CommandResult again = run_mole(train_args(config, run_dir, "--set train.seed=7"));
  EXPECT_EQ(again.exit_code, 1) << again.output;
  EXPECT_NE(again.output.find("log.dir '" + run_dir + "' holds another run (adapter, base, "
                              "config.yaml, metrics.jsonl, summary.json)"),
            std::string::npos)
      << again.output;
  EXPECT_NE(again.output.find("--set log.overwrite=true"), std::string::npos);
  EXPECT_EQ(count_lines(run_dir + "/metrics.jsonl"), 1);
  EXPECT_EQ(test::read_bytes(run_dir + "/adapter/adapter_model.safetensors"), adapter);

  // Asked to overwrite: the old run's files are replaced, not appended to.
  std::ofstream(run_dir + "/notes.txt") << "mine";
  const test::CommandResult over =
      run_mole(train_args(config, run_dir, "--set train.seed=7 --set log.overwrite=true"));
  ASSERT_EQ(over.exit_code, 0) << over.output;
  EXPECT_EQ(count_lines(run_dir + "/metrics.jsonl"), 1);
  EXPECT_NE(test::read_bytes(run_dir + "/adapter/adapter_model.safetensors"), adapter);
  EXPECT_EQ(test::read_bytes(run_dir + "/notes.txt"), "mine");  // not a run file: kept
}

TEST(RunSafety, ExportDoesNotWriteOverAnAdapter) {
  test::TempDir dir;
  const std::string config = write_config(dir, "adapter: {method: lora}\n");
  const std::string run_dir = dir.file("run");
  ASSERT_EQ(run_mole(train_args(config, run_dir)).exit_code, 0);
  const std::string adapter = test::read_bytes(run_dir + "/adapter/adapter_model.safetensors");
  const test::CommandResult onto_itself = run_mole("export " + run_dir + " --out " + run_dir + "/adapter");
  EXPECT_EQ(onto_itself.exit_code, 1);
  EXPECT_NE(onto_itself.output.find("--out '" + run_dir + "/adapter' already holds an adapter"),
            std::string::npos)
      << onto_itself.output;
  EXPECT_EQ(test::read_bytes(run_dir + "/adapter/adapter_model.safetensors"), adapter);
  const std::string out = dir.file("exported");
  ASSERT_EQ(run_mole("export " + run_dir + " --out " + out).exit_code, 0);
  EXPECT_EQ(run_mole("export " + run_dir + " --out " + out).exit_code, 1);
  const test::CommandResult replaced = run_mole("export " + run_dir + " --out " + out + " --overwrite");
  EXPECT_EQ(replaced.exit_code, 0) << replaced.output;
}

// Under mpirun the ranks' log lines reach a file without terminal colour codes.
TEST(RunSafety, NoColourCodesUnderMpirun) {
  test::TempDir dir;
  const std::string config = write_config(dir, "adapter: {method: lora}\n");
  const test::CommandResult run = test::run_command(
      std::string(MOLE_MPIRUN) + " -np 2 " + MOLE_BINARY + " " +
      train_args(config, dir.file("run"), "--set train.global_batch=4"));
  ASSERT_EQ(run.exit_code, 0) << run.output;
  EXPECT_NE(run.output.find("data parallel over 2 ranks"), std::string::npos) << run.output;
  EXPECT_EQ(run.output.find("\x1b["), std::string::npos) << run.output;
}

TEST(RunSafety, EveryStepSkippedFailsAndWritesNoAdapter) {
  test::TempDir dir;
  const std::string config = write_config(dir, "adapter: {method: lora}\n");
  // A trained adapter whose weights are then made non-finite: every step from it is non-finite.
  const std::string first_dir = dir.file("first");
  const test::CommandResult first = run_mole(train_args(config, first_dir));
  ASSERT_EQ(first.exit_code, 0) << first.output;
  const std::string weights = first_dir + "/adapter/adapter_model.safetensors";
  std::vector<std::pair<std::string, at::Tensor>> poisoned;
  {
    st::SafetensorsFile file(weights);
    for (const std::string& name : file.names()) {
      poisoned.emplace_back(name, at::full_like(file.tensor(name), NAN));
    }
  }
  st::save_file(weights, poisoned, {{"format", "pt"}});

  const std::string second_dir = dir.file("second");
  const test::CommandResult second = run_mole(
      train_args(config, second_dir,
                 "--set adapter.init_from=" + first_dir + "/adapter --set train.steps=2"));
  EXPECT_NE(second.exit_code, 0) << second.output;
  EXPECT_NE(second.output.find("every one of the 2 steps had a non-finite loss or gradient"),
            std::string::npos)
      << second.output;
  EXPECT_FALSE(fs::exists(second_dir + "/adapter")) << second.output;
}

TEST(RunSafety, WrongInvocationsSayWhatIsWrong) {
  test::TempDir dir;
  const test::CommandResult unknown = run_mole("plan run.yaml");
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_NE(unknown.output.find("unknown subcommand 'plan' (known: train, forward, export, bench)"),
            std::string::npos)
      << unknown.output;

  const test::CommandResult directory = run_mole("train " + dir.path());
  EXPECT_EQ(directory.exit_code, 1);
  EXPECT_NE(directory.output.find("config '" + dir.path() + "' is a directory"), std::string::npos)
      << directory.output;

  // An empty config trains the defaults, and says so.
  const std::string empty = write_config(dir, "");
  const test::CommandResult defaults = run_mole(train_args(empty, dir.file("run")));
  EXPECT_EQ(defaults.exit_code, 0) << defaults.output;
  EXPECT_NE(defaults.output.find(empty + " is empty: every key not given by --set takes its "
                                         "default (model.base synthetic:tiny, adapter.method lora"),
            std::string::npos)
      << defaults.output;
}

}  // namespace
}  // namespace mole
