// Nothing silent, through the real binary: a run folder that holds another run is refused (and
// replaced only when asked), a run whose every step was skipped fails without writing an adapter,
// and wrong invocations (an unknown subcommand, a directory as the config, an empty config) say
// what is wrong.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <functional>
#include <fstream>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "launch/metrics_log.h"
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

// Under mpirun the ranks' log lines reach a file without terminal colour codes, and a run folder
// holding another run is refused on every rank.
TEST(RunSafety, NoColourCodesUnderMpirun) {
  test::TempDir dir;
  const std::string config = write_config(dir, "adapter: {method: lora}\n");
  const test::CommandResult run = test::run_command(
      std::string(MOLE_MPIRUN) + " -np 2 " + MOLE_BINARY + " " +
      train_args(config, dir.file("run"), "--set train.global_batch=4"));
  ASSERT_EQ(run.exit_code, 0) << run.output;
  EXPECT_NE(run.output.find("data parallel over 2 ranks"), std::string::npos) << run.output;
  EXPECT_EQ(run.output.find("\x1b["), std::string::npos) << run.output;
  // The same folder again under mpirun: every rank stops with the reason, none hangs, the first
  // run's files stay.
  const std::string metrics = test::read_bytes(dir.file("run/metrics.jsonl"));
  const test::CommandResult again = test::run_command(
      std::string(MOLE_MPIRUN) + " -np 2 " + MOLE_BINARY + " " +
      train_args(config, dir.file("run"), "--set train.global_batch=4"));
  EXPECT_NE(again.exit_code, 0) << again.output;
  EXPECT_NE(again.output.find("log.dir '" + dir.file("run") + "' holds another run"), std::string::npos)
      << again.output;
  EXPECT_EQ(test::read_bytes(dir.file("run/metrics.jsonl")), metrics);
}

// A finished run's base/ (which carries its tokenizer, so it trains with no other setting) and a
// copy of it whose LM head holds extreme but finite values: every step from it overflows.
class PoisonedRuns : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir;
    const std::string config = write_config(*dir_, "adapter: {method: lora}\n");
    const test::CommandResult first = run_mole(train_args(config, dir_->file("first")));
    ASSERT_EQ(first.exit_code, 0) << first.output;
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static std::string base() { return dir_->file("first/base"); }
  // A copy of base/ with `change` applied to every tensor named `name`.
  static std::string changed_base(const std::string& folder, const std::string& name,
                                  const std::function<at::Tensor(const at::Tensor&)>& change) {
    fs::create_directory(folder);
    for (const char* file : {"config.json", "tokenizer_config.json"}) {
      fs::copy_file(base() + "/" + file, folder + "/" + file);
    }
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    st::SafetensorsFile file(base() + "/model.safetensors");
    for (const std::string& n : file.names()) {
      tensors.emplace_back(n, n == name ? change(file.tensor(n)) : file.tensor(n));
    }
    st::save_file(folder + "/model.safetensors", tensors, {{"format", "pt"}});
    return folder;
  }
  static test::TempDir* dir_;
};
test::TempDir* PoisonedRuns::dir_ = nullptr;

TEST_F(PoisonedRuns, EveryStepSkippedFailsNamesTheBaseAndWritesNoAdapter) {
  // 3e38 is a finite float32, but a sum of a few such products is not.
  const std::string huge = changed_base(dir_->file("huge"), "lm_head.weight",
                                        [](const at::Tensor& t) { return t.sign() * 3e38; });
  test::TempDir dir;
  const std::string config = write_config(dir, "adapter: {method: lora}\n");
  const test::CommandResult run =
      run_mole(train_args(config, dir.file("run"), "--set model.base=" + huge + " --set train.steps=2"));
  EXPECT_NE(run.exit_code, 0) << run.output;
  EXPECT_NE(run.output.find("every one of the 2 steps had a non-finite loss or gradient"),
            std::string::npos)
      << run.output;
  EXPECT_NE(run.output.find("the base weight 'lm_head.weight' reaches |w| = 3e+38"),
            std::string::npos)
      << run.output;
  EXPECT_NE(run.output.find("check the base model"), std::string::npos) << run.output;
  EXPECT_FALSE(fs::exists(dir.file("run/adapter"))) << run.output;
}

// NaN in the base or in the adapter a run starts from: refused before training, naming the tensor.
TEST_F(PoisonedRuns, NonFiniteBaseOrStartingAdapterIsRefusedByName) {
  const std::string nan_base = changed_base(dir_->file("nan"), "model.layers.1.self_attn.o_proj.weight",
                                            [](const at::Tensor& t) {
                                              at::Tensor c = t.clone();
                                              c.view({-1})[2] = NAN;
                                              return c;
                                            });
  test::TempDir dir;
  const std::string config = write_config(dir, "adapter: {method: lora}\n");
  test::CommandResult run = run_mole(train_args(config, dir.file("run"), "--set model.base=" + nan_base));
  EXPECT_NE(run.exit_code, 0) << run.output;
  EXPECT_NE(run.output.find("tensor 'model.layers.1.self_attn.o_proj.weight' in '" + nan_base +
                            "' holds 1 non-finite value(s)"),
            std::string::npos)
      << run.output;
  EXPECT_FALSE(fs::exists(dir.file("run/metrics.jsonl"))) << run.output;

  const std::string adapter = dir.file("adapter");
  fs::create_directory(adapter);
  fs::copy_file(dir_->file("first/adapter/adapter_config.json"), adapter + "/adapter_config.json");
  std::vector<std::pair<std::string, at::Tensor>> poisoned;
  {
    st::SafetensorsFile file(dir_->file("first/adapter/adapter_model.safetensors"));
    for (const std::string& name : file.names()) poisoned.emplace_back(name, at::full_like(file.tensor(name), NAN));
  }
  st::save_file(adapter + "/adapter_model.safetensors", poisoned, {{"format", "pt"}});
  run = run_mole(train_args(config, dir.file("run2"), "--set adapter.init_from=" + adapter));
  EXPECT_NE(run.exit_code, 0) << run.output;
  EXPECT_NE(run.output.find("' in '" + adapter + "/adapter_model.safetensors' holds"), std::string::npos)
      << run.output;
}

// The demo's base/ carries its tokenizer: training on it and `mole forward --text` need nothing else.
TEST_F(PoisonedRuns, DemoBaseTrainsAndAnswersText) {
  test::TempDir dir;
  const std::string config = write_config(dir, "adapter: {method: lora}\n");
  const test::CommandResult run =
      run_mole(train_args(config, dir.file("run"), "--set model.base=" + base()));
  EXPECT_EQ(run.exit_code, 0) << run.output;
  const test::CommandResult text = run_mole("forward --model " + base() + " --adapter " +
                                            dir.file("run/adapter") + " --text 'hello there'");
  EXPECT_EQ(text.exit_code, 0) << text.output;
  EXPECT_NE(text.output.find("over 1 sequences of 12 tokens"), std::string::npos) << text.output;
  EXPECT_NE(text.output.find("likeliest next tokens: \""), std::string::npos) << text.output;
  // The same text as ids through --input: the same loss.
  const std::vector<int64_t> ids = {1, 'h' + 3, 'e' + 3, 'l' + 3, 'l' + 3, 'o' + 3, ' ' + 3,
                                    't' + 3, 'h' + 3, 'e' + 3, 'r' + 3, 'e' + 3};
  const at::Tensor t = at::tensor(ids, at::kLong).reshape({1, -1});
  st::save_file(dir.file("in.safetensors"), {{"input_ids", t}, {"labels", t}});
  const test::CommandResult input = run_mole(
      "forward --model " + base() + " --adapter " + dir.file("run/adapter") + " --input " +
      dir.file("in.safetensors") + " --output " + dir.file("out.safetensors"));
  ASSERT_EQ(input.exit_code, 0) << input.output;
  const size_t at_text = text.output.find("loss "), at_input = input.output.find("loss ");
  ASSERT_NE(at_text, std::string::npos);
  ASSERT_NE(at_input, std::string::npos);
  EXPECT_EQ(text.output.substr(at_text, 14), input.output.substr(at_input, 14));
  // Neither or both of --input / --text: said plainly.
  const test::CommandResult neither = run_mole("forward --model " + base());
  EXPECT_NE(neither.exit_code, 0);
  EXPECT_NE(neither.output.find("needs --input IN.safetensors or --text"), std::string::npos)
      << neither.output;
}

// The run for the disk tests: many logged steps of a small LoRA on the demo base, so that the
// logs grow past a few KiB while the adapter stays under one.
std::string logged_run(const test::TempDir& dir, const std::string& base, const std::string& log_dir) {
  const std::string config = write_config(
      dir, "adapter: {method: lora, r: 1, target_modules: [q_proj]}\n"
           "data: {seq_len: 16, synthetic_examples: 32}\n"
           "train: {steps: 150, micro_batch: 2, global_batch: 2, warmup: 0}\n"
           "log: {every: 1, tensorboard: true}\n");
  return std::string(MOLE_BINARY) + " train " + config + " --set model.base=" + base +
         " --set log.dir=" + log_dir;
}

void expect_whole_json_lines(const std::string& path) {
  std::ifstream in(path);
  int n = 0;
  for (std::string line; std::getline(in, line); ++n) {
    EXPECT_NO_THROW(nlohmann::json::parse(line)) << path << " line " << n + 1 << ": " << line;
  }
  EXPECT_GT(n, 0) << path;
  const std::string bytes = test::read_bytes(path);
  EXPECT_EQ(bytes.back(), '\n') << path << " ends in a cut line";
}

// Logs that cannot grow (the kernel's file-size limit, 8 KiB) while training goes on: the logs
// hold whole lines and records, the adapter and summary are written, and the run ends with an
// error that names the log and the reason.
TEST_F(PoisonedRuns, LogWriteFailureKeepsTheWeightsAndFails) {
  test::TempDir dir;
  const std::string run_dir = dir.file("run");
  const test::CommandResult run = test::run_command(
      "bash -c \"trap '' XFSZ; ulimit -f 8; exec " + logged_run(dir, base(), run_dir) + "\"");
  EXPECT_EQ(run.exit_code, 1) << run.output;
  EXPECT_NE(run.output.find("File too large"), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("training finished and the adapter was written to '" + run_dir +
                            "/adapter', but the run's logs are incomplete: cannot append to '" +
                            run_dir),
            std::string::npos)
      << run.output;
  expect_whole_json_lines(run_dir + "/metrics.jsonl");
  const nlohmann::json summary = nlohmann::json::parse(test::read_bytes(run_dir + "/summary.json"));
  EXPECT_EQ(summary["steps"], 150);
  std::string events;
  for (const auto& entry : fs::directory_iterator(run_dir)) {
    if (entry.path().filename().string().rfind("events.out.tfevents.", 0) == 0) events = entry.path();
  }
  ASSERT_FALSE(events.empty());
  EXPECT_NO_THROW(launch::read_tensorboard_scalars(events));
  const test::CommandResult use = run_mole("forward --model " + base() + " --adapter " + run_dir +
                                           "/adapter --text 'abc'");
  EXPECT_EQ(use.exit_code, 0) << use.output;
}

// A full disk (a 24 KiB tmpfs in a private mount namespace) under the run folder: the run fails
// naming the reason, and leaves whole files or none — whole log lines and records, no partial
// adapter folder, no 0-byte summary, no temporary files.
TEST_F(PoisonedRuns, FullDiskLeavesWholeFilesOrNone) {
  if (test::run_command("unshare --user --map-root-user --mount true").exit_code != 0) {
    GTEST_SKIP() << "this machine cannot make a private tmpfs (unshare --user --mount failed); "
                    "the file-size-limit tests cover the write paths";
  }
  test::TempDir dir;
  const std::string disk = dir.file("disk"), after = dir.file("after");
  fs::create_directory(disk);
  const std::string script = dir.file("full.sh");
  std::ofstream(script) << "mount -t tmpfs -o size=24k tmpfs " << disk << " || exit 99\n"
                        << logged_run(dir, base(), disk + "/run") << "\nrc=$?\ncp -a " << disk
                        << "/run " << after << "\nexit $rc\n";
  const test::CommandResult run =
      test::run_command("unshare --user --map-root-user --mount bash " + script);
  ASSERT_NE(run.exit_code, 99) << run.output;
  EXPECT_EQ(run.exit_code, 1) << run.output;
  EXPECT_NE(run.output.find("No space left on device"), std::string::npos) << run.output;
  expect_whole_json_lines(after + "/metrics.jsonl");
  EXPECT_FALSE(fs::exists(after + "/adapter")) << run.output;
  if (fs::exists(after + "/summary.json")) {
    EXPECT_NO_THROW(nlohmann::json::parse(test::read_bytes(after + "/summary.json")));
  }
  for (const auto& entry : fs::directory_iterator(after)) {
    const std::string name = entry.path().filename();
    EXPECT_EQ(name.find(".tmp."), std::string::npos) << "left behind: " << name;
    if (name.rfind("events.out.tfevents.", 0) == 0) {
      EXPECT_NO_THROW(launch::read_tensorboard_scalars(entry.path()));
    }
  }
}

TEST(RunSafety, WrongInvocationsSayWhatIsWrong) {
  test::TempDir dir;
  const test::CommandResult unknown = run_mole("tokenise run.yaml");
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_NE(unknown.output.find("unknown subcommand 'tokenise' (known: train, forward, export, inspect, plan, tokenize, bench)"),
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
