// The trainer end to end on the synthetic model: gradient-accumulation equivalence for the LM
// loss, non-finite step detection, well-formed metrics.jsonl and TensorBoard files, export ->
// reload parity through `mole forward`, and the demo config's loss falling.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "checkpoint/hf_config.h"
#include "checkpoint/safetensors.h"
#include "kernels/check.h"
#include "launch/metrics_log.h"
#include "launch/trainer.h"
#include "tests/test_util.h"

namespace mole {
namespace {

namespace fs = std::filesystem;

// A small, fast run of the synthetic model writing into `dir`.
launch::Config small_config(const std::string& dir, const std::string& extra = "") {
  return launch::parse_config(
      "name: t\n"
      "adapter: {method: lora, r: 4, alpha: 8, dropout: 0.0, experts: 4}\n"
      "data: {seq_len: 40, synthetic_examples: 64}\n"
      "train: {steps: 3, micro_batch: 4, global_batch: 4, lr: 1.0e-2, seed: 7}\n"
      "log: {every: 1, dir: " + dir + "}\n" + extra,
      "test.yaml");
}

launch::Config with(launch::Config c, const std::vector<std::string>& sets) {
  return launch::parse_config(launch::to_yaml(c), "test.yaml", sets);
}

// model.base synthetic:<preset> with model.layers: the preset's real shapes (TinyLlama-1.1B's
// here) cut to the first layer, drawn from the seed; a step trains, and the base written beside
// the adapter is that model.
TEST(Trainer, SyntheticPresetWithFewerLayers) {
  test::TempDir dir;
  launch::Trainer t(with(small_config(dir.file("run")),
                         {"model.base=synthetic:tinyllama", "model.layers=1", "train.steps=1", "data.seq_len=16",
                          "train.micro_batch=1", "train.global_batch=1"}));
  EXPECT_EQ(t.model().num_layers(), 1);
  EXPECT_EQ(t.model().config().hidden_size, 2048);
  EXPECT_EQ(t.model().config().vocab_size, 32000);
  const launch::TrainSummary s = t.run();
  EXPECT_TRUE(std::isfinite(s.last_loss));
  const moe::ModelConfig written = ckpt::load_hf_config(dir.file("run") + "/base/config.json");
  EXPECT_EQ(written.num_layers, 1);
  EXPECT_EQ(written.hidden_size, 2048);
  EXPECT_EQ(written.num_kv_heads, 4);
  // summary.json's measured memory: the base's bytes are those of the written base's tensors,
  // and the process held at least that much.
  int64_t file_bytes = 0;
  st::SafetensorsFile base(dir.file("run") + "/base/model.safetensors");
  for (const st::TensorInfo& info : base.header().tensors) file_bytes += static_cast<int64_t>(info.end - info.begin);
  const nlohmann::json memory = nlohmann::json::parse(test::read_bytes(dir.file("run/summary.json"))).at("memory");
  EXPECT_EQ(memory.at("base_bytes").get<int64_t>(), file_bytes);
  EXPECT_GE(memory.at("peak_host_bytes").get<int64_t>(), file_bytes);
  EXPECT_FALSE(memory.contains("peak_device_bytes"));
}

TEST(Trainer, AccumulationMatchesOneLargeMicroBatch) {
  test::TempDir dir;
  // Prompt masking is on (prompt tokens are -100); the LM loss is normalised by the global
  // target-token count, so 2 x 2 accumulation must reproduce one micro-batch of 4.
  launch::Trainer big(small_config(dir.file("big")));
  launch::Trainer split(with(small_config(dir.file("split")), {"train.micro_batch=2"}));
  for (int s = 0; s < 3; ++s) {
    launch::StepResult a = big.accumulate_gradients(), b = split.accumulate_gradients();
    EXPECT_NEAR(a.loss, b.loss, 1e-6 * std::abs(a.loss)) << "step " << s;
    EXPECT_EQ(a.target_tokens, b.target_tokens);
    if (s == 0) {
      // Same weights, same global batch: the same gradient of every trainable tensor.
      auto pa = big.model().trainable_parameters(), pb = split.model().trainable_parameters();
      ASSERT_EQ(pa.size(), pb.size());
      for (size_t i = 0; i < pa.size(); ++i) {
        EXPECT_LT(test::rel_error(pb[i].second.grad(), pa[i].second.grad()), 1e-5) << pa[i].first;
      }
    }
    big.apply_update(a);
    split.apply_update(b);
    EXPECT_NEAR(a.grad_norm, b.grad_norm, 1e-5 * a.grad_norm) << "step " << s;
  }
}

// In float64 the accumulated run also trains the same weights (in float32, rounding differences
// are amplified by AdamW on near-zero gradient elements; see DpTrain).
TEST(Trainer, AccumulationTrainsTheSameWeightsInFloat64) {
  test::TempDir dir;
  launch::Trainer big(with(small_config(dir.file("big")), {"model.dtype=fp64"}));
  launch::Trainer split(with(small_config(dir.file("split")), {"model.dtype=fp64", "train.micro_batch=2"}));
  for (int s = 0; s < 3; ++s) {
    big.step();
    split.step();
  }
  auto pa = big.model().trainable_parameters(), pb = split.model().trainable_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_EQ(pa[i].second.scalar_type(), at::kDouble);
    EXPECT_LT(test::rel_error(pb[i].second, pa[i].second), 1e-10) << pa[i].first;
  }
}

TEST(Trainer, NonFiniteStepsAreSkippedThenStop) {
  test::TempDir dir;
  launch::Trainer t(with(small_config(dir.path()), {"train.max_bad_steps=2"}));
  EXPECT_FALSE(t.step().skipped);
  at::Tensor b = t.model().trainable_parameters()[1].second;  // a lora_B
  ASSERT_NE(t.model().trainable_parameters()[1].first.find("lora_B"), std::string::npos);
  at::Tensor saved = b.detach().clone();
  {
    at::NoGradGuard no_grad;
    b[0][0] = std::nanf("");
  }
  launch::StepResult bad = t.step();
  EXPECT_TRUE(bad.skipped);
  EXPECT_TRUE(std::isnan(b[0][0].item<float>())) << "a skipped step must not update";
  {
    at::NoGradGuard no_grad;
    b.copy_(saved);
  }
  EXPECT_FALSE(t.step().skipped);  // recovered: the counter of consecutive bad steps resets
  {
    at::NoGradGuard no_grad;
    b[0][0] = INFINITY;
  }
  EXPECT_TRUE(t.step().skipped);
  try {
    t.step();
    FAIL() << "expected the run to stop";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("2 consecutive steps had a non-finite loss"), std::string::npos)
        << e.what();
  }
}

TEST(Trainer, MetricsJsonlAndTensorBoardAreWellFormed) {
  test::TempDir dir;
  launch::Trainer t(with(small_config(dir.path()),
                         {"adapter.method=mixlora", "train.steps=4", "log.every=2"}));
  launch::TrainSummary summary = t.run();
  EXPECT_EQ(summary.steps, 4);
  std::ifstream in(dir.file("metrics.jsonl"));
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(lines.size(), 3u);  // steps 1, 2, 4
  std::vector<int64_t> steps;
  for (const auto& l : lines) {
    steps.push_back(l.at("step").get<int64_t>());
    for (const char* key : {"loss", "lr", "tokens_per_s", "aux_loss", "grad_norm", "load_balance"}) {
      EXPECT_TRUE(l.contains(key) && l[key].is_number()) << key << " in " << l.dump();
    }
    const auto& loads = l.at("expert_load");
    ASSERT_EQ(loads.size(), 4u);  // one FFN site per layer of the synthetic model
    for (const auto& [site, fractions] : loads.items()) {
      double total = 0;
      for (const auto& f : fractions) total += f.get<double>();
      EXPECT_NEAR(total, 1.0, 1e-9) << site;
    }
  }
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 2, 4}));
  std::string events;
  for (const auto& entry : fs::directory_iterator(dir.path())) {
    if (entry.path().filename().string().rfind("events.out.tfevents.", 0) == 0) events = entry.path();
  }
  ASSERT_FALSE(events.empty());
  std::vector<launch::ScalarEvent> scalars = launch::read_tensorboard_scalars(events);
  std::vector<int64_t> loss_steps;
  for (const auto& e : scalars) {
    if (e.tag == "train/loss") {
      loss_steps.push_back(e.step);
      EXPECT_NEAR(e.value, lines[loss_steps.size() - 1].at("loss").get<double>(), 1e-5);
    }
  }
  EXPECT_EQ(loss_steps, (std::vector<int64_t>{1, 2, 4}));
  EXPECT_TRUE(fs::exists(dir.file("config.yaml")));
  EXPECT_TRUE(fs::exists(dir.file("summary.json")));
  // The resolved config parses back to the same run.
  EXPECT_EQ(launch::to_yaml(launch::load_config(dir.file("config.yaml"))), launch::to_yaml(t.config()));
}

int run_binary(const std::string& args, const std::string& log) {
  return std::system((std::string(MOLE_BINARY) + " " + args + " > " + log + " 2>&1").c_str());
}

// Train, export, and reload through the real binary: the logits of `mole forward` on the exported
// base + adapter equal the trained model's.
TEST(Trainer, ExportReloadParityForEveryLayout) {
  for (const char* method_name : {"lora", "mixlora", "mola"}) {
    const std::string method = method_name;
    test::TempDir dir;
    launch::Trainer t(with(small_config(dir.file("run")),
                           {"adapter.method=" + method, "adapter.experts=\"2,4\"", "train.steps=2",
                            "adapter.router.top_k=2"}));
    t.run();
    at::Tensor ids = at::randint(3, 200, {2, 12}, at::kLong);
    at::Tensor expected;
    {
      at::NoGradGuard no_grad;
      expected = t.model().forward(ids);
    }
    st::save_file(dir.file("in.safetensors"), {{"input_ids", ids}});
    ASSERT_EQ(run_binary("export " + dir.file("run") + " --out " + dir.file("exported"), dir.file("log")), 0)
        << test::read_bytes(dir.file("log"));
    for (const std::string& adapter : {dir.file("run/adapter"), dir.file("exported")}) {
      ASSERT_EQ(run_binary("forward --model " + dir.file("run/base") + " --adapter " + adapter +
                               " --input " + dir.file("in.safetensors") + " --output " +
                               dir.file("out.safetensors"),
                           dir.file("log")),
                0)
          << test::read_bytes(dir.file("log"));
      st::SafetensorsFile out(dir.file("out.safetensors"));
      EXPECT_LT(test::rel_error(out.tensor("logits"), expected), 1e-5) << method << " " << adapter;
    }
    const std::string config = test::read_bytes(dir.file("run/adapter/adapter_config.json"));
    EXPECT_NE(config.find(method == "lora" ? "\"LORA\"" : method == "mixlora" ? "\"MIXLORA\"" : "\"MOLA\""),
              std::string::npos);
  }
}

TEST(Trainer, UnsupportedOptionsAreClearErrors) {
  test::TempDir dir;
  EXPECT_THROW(launch::Trainer(with(small_config(dir.path()), {"parallel.ep=2"})), Error);
  const std::string no_checkpoint = test::error_of(
      [&] { launch::Trainer(with(small_config(dir.path()), {"checkpoint.resume=" + dir.file("none")})); });
  EXPECT_NE(no_checkpoint.find("is not a committed checkpoint folder (no manifest.pb there)"), std::string::npos)
      << no_checkpoint;
  EXPECT_THROW(launch::Trainer(with(small_config(dir.path()), {"train.global_batch=6"})), Error);
  // One process has no group to shard the base over.
  const std::string shard =
      test::error_of([&] { launch::Trainer(with(small_config(dir.path()), {"parallel.base_shard=2"})); });
  EXPECT_NE(shard.find("world size 1 is not divisible by parallel.base_shard = 2"), std::string::npos) << shard;
}

// ZeRO on one process has nothing to shard: it trains exactly as stage 0.
TEST(Trainer, ZeroOnOneProcessEqualsStageZero) {
  test::TempDir dir;
  std::vector<double> losses[2];
  for (int zero : {0, 2}) {
    launch::Trainer t(with(small_config(dir.file("zero" + std::to_string(zero))),
                           {"parallel.zero=" + std::to_string(zero), "train.steps=3"}));
    for (int i = 0; i < 3; ++i) losses[zero / 2].push_back(t.step().loss);
  }
  EXPECT_EQ(losses[0], losses[1]);
}

// The demo config, shortened: through the binary, the loss must fall.
TEST(Trainer, DemoConfigLossFalls) {
  test::TempDir dir;
  const std::string args = "train " + std::string(MOLE_SOURCE_DIR) +
                           "/examples/demo-mixlora.yaml --set train.steps=30 --set log.dir=" +
                           dir.file("run");
  ASSERT_EQ(run_binary(args, dir.file("log")), 0) << test::read_bytes(dir.file("log"));
  nlohmann::json summary = nlohmann::json::parse(test::read_bytes(dir.file("run/summary.json")));
  const double first = summary.at("first_loss").get<double>(), last = summary.at("last_loss").get<double>();
  RecordProperty("first_loss", std::to_string(first));
  RecordProperty("last_loss", std::to_string(last));
  EXPECT_LT(last, 0.8 * first) << test::read_bytes(dir.file("log"));
}

}  // namespace
}  // namespace mole
