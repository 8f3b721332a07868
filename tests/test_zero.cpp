// ZeRO-1/2 under a real mpirun: the same seed and global batch train the same adapter as without
// ZeRO (float64 weights to 1e-12, float32 losses and gradient norms to 1e-5), at DP 2, DP 4,
// DP 2 x EP 2 in both dispatch modes and MoLA with a replicated layer under EP 4, with LoRA+ and
// weight decay on; each rank keeps exactly its padded 1/N share of the AdamW state; and a NaN on
// one rank is skipped by all.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include "checkpoint/safetensors.h"
#include "tests/test_util.h"
#include "tests/train_run_util.h"

namespace mole {
namespace {

namespace fs = std::filesystem;

// float64: ZeRO changes only the summation order of the gradient norm.
constexpr double kExactWeights = 1e-12;
constexpr double kExactSteps = 1e-10;
// float32: the elementwise update is the same; only the gradient norm's summation order differs.
constexpr double kFloat32Steps = 1e-5;
// LoRA+ and weight decay on, so that per-tensor settings inside a flat buffer are exercised.
const std::string kOptimizer = " --set train.lora_plus_ratio=16 --set train.weight_decay=0.1";

class ZeroTrain : public test::MpiJobTest {
 public:
  // Trains on `np` ranks with micro-batch 8 / np and ZeRO stage `zero`; returns the run folder.
  std::string train(int np, int zero, const std::string& name, const std::string& extra) {
    const std::string out = dir_.file(name + "-zero" + std::to_string(zero));
    const std::string cmd = "OMP_NUM_THREADS=1 " + test::mpirun(np) +
                            test::demo_train_args(out, 8 / np) + kOptimizer +
                            " --set parallel.zero=" + std::to_string(zero) + " " + extra;
    const std::string log = out + ".log";
    EXPECT_EQ(test::run(cmd, log), 0) << cmd << "\n" << test::read_bytes(log);
    log_ = test::read_bytes(log);
    return out;
  }

  // Zero 1 and 2 against zero 0 for one layout, in float64.
  void expect_zero_matches(int np, const std::string& name, const std::string& extra) {
    const std::string fp64 = " --set model.dtype=fp64 " + extra;
    const std::string ref = train(np, 0, name, fp64);
    for (int zero : {1, 2}) {
      const std::string got = train(np, zero, name, fp64);
      EXPECT_NE(log_.find("optimizer: AdamW, ZeRO-" + std::to_string(zero)), std::string::npos) << log_;
      test::expect_same_steps(ref, got, 5, kExactSteps);
      const double worst = test::worst_weight_error(ref, got);
      RecordProperty(name + "_zero" + std::to_string(zero) + "_fp64_weight_error", test::sci(worst));
      EXPECT_LT(worst, kExactWeights) << name << " zero " << zero;
    }
  }

  std::string log_;
};

// float32: losses and gradient norms of every step to 1e-5.
void expect_float32_steps_match(ZeroTrain& t, int np, const std::string& name, const std::string& extra) {
  const std::string ref = t.train(np, 0, name + "-fp32", extra);
  for (int zero : {1, 2}) {
    test::expect_same_steps(ref, t.train(np, zero, name + "-fp32", extra), 5, kFloat32Steps);
  }
}

// Small buckets (0.01 MiB: about one tensor each) put many reduce-scatters inside backward.
const std::string kSmallBuckets = " --set parallel.zero_bucket_mib=0.01";

TEST_F(ZeroTrain, DataParallelMatchesNoZero) {
  expect_zero_matches(2, "dp2", "");
  expect_zero_matches(4, "dp4", kSmallBuckets);
  expect_float32_steps_match(*this, 4, "dp4", "");
}

TEST_F(ZeroTrain, ExpertParallelMatchesNoZero) {
  expect_zero_matches(4, "dp2-ep2-tokens", "--set parallel.ep=2 --set parallel.dispatch=tokens" + kSmallBuckets);
  expect_zero_matches(4, "dp2-ep2-weights", "--set parallel.ep=2 --set parallel.dispatch=weights");
  // Gloo: the gradient threads' own communicators are Gloo's too.
  expect_zero_matches(4, "dp2-ep2-gloo", "--set parallel.ep=2 --set parallel.backend=gloo" + kSmallBuckets);
  // MoLA "2,4,4,8" under EP 4: the 2-expert layer is replicated (world group), the others split
  // (EDP groups of one rank).
  expect_zero_matches(4, "mola-ep4", "--set parallel.ep=4 --set adapter.method=mola --set adapter.experts=2,4,4,8");
  expect_float32_steps_match(*this, 4, "dp2-ep2-tokens", "--set parallel.ep=2 --set parallel.dispatch=tokens");
}

// summary.json reports this rank's (rank 0's) bytes: with ZeRO the optimizer state is exactly
// two moments of the padded 1/N share of each flat buffer (bucket); the gradients are the slices
// plus the whole gradient at stage 1, plus the largest bucket at stage 2.
TEST_F(ZeroTrain, OptimizerBytesAreThePaddedShare) {
  const std::string layout = "--set parallel.ep=2 --set parallel.dispatch=weights";
  const std::string buckets = " --set parallel.zero_bucket_mib=0.1";
  const nlohmann::json none =
      nlohmann::json::parse(test::read_bytes(train(4, 0, "bytes", layout) + "/summary.json"))["memory"];
  const int64_t element = 4;  // float32 adapters
  EXPECT_EQ(none["optimizer_bytes"].get<int64_t>(), 2 * none["trainable_bytes"].get<int64_t>());
  EXPECT_EQ(none["grad_bytes"].get<int64_t>(), none["trainable_bytes"].get<int64_t>());
  for (int zero : {1, 2}) {
    const nlohmann::json m = nlohmann::json::parse(
        test::read_bytes(train(4, zero, "bytes", layout + buckets) + "/summary.json"))["memory"];
    ASSERT_TRUE(m.contains("groups")) << m.dump();
    int64_t numel = 0, slices = 0, largest = 0;  // elements
    std::map<std::string, int> buckets_of;
    for (const nlohmann::json& g : m["groups"]) {
      const int64_t n = g["numel"], size = g["ranks"], slice = g["slice"];
      // World group over 4 ranks; EDP group (the other EP group's rank with this ep_rank) over 2.
      EXPECT_EQ(size, g["group"] == "world" ? 4 : 2) << g.dump();
      EXPECT_EQ(slice, (n + size - 1) / size) << g.dump();
      EXPECT_EQ(g["bucket"].get<int>(), buckets_of[g["group"].get<std::string>()]++) << g.dump();  // in order
      numel += n;
      slices += slice;
      largest = std::max(largest, n);
    }
    EXPECT_GT(buckets_of["world"], 1) << m.dump();
    EXPECT_GT(buckets_of["edp"], 1) << m.dump();
    EXPECT_EQ(numel * element, none["trainable_bytes"].get<int64_t>());
    EXPECT_EQ(m["trainable_bytes"], none["trainable_bytes"]);
    EXPECT_EQ(m["optimizer_bytes"].get<int64_t>(), 2 * slices * element);
    EXPECT_EQ(m["grad_bytes"].get<int64_t>(), (slices + (zero == 1 ? numel : largest)) * element);
    if (zero == 2) {
      EXPECT_LT(m["grad_bytes"].get<int64_t>(), numel * element);
    }
    RecordProperty("grad_bytes_zero" + std::to_string(zero), std::to_string(m["grad_bytes"].get<int64_t>()));
    RecordProperty("optimizer_bytes_zero" + std::to_string(zero), std::to_string(m["optimizer_bytes"].get<int64_t>()));
  }
  RecordProperty("optimizer_bytes_zero0", std::to_string(none["optimizer_bytes"].get<int64_t>()));
}

// A step whose gradient is NaN on one rank only is skipped by every rank, with and without ZeRO:
// a base whose embedding row of 'Z' overflows the backward pass, and data where only one example
// of four holds a 'Z', so that in some steps one of the two ranks reads it. Every layout skips the
// steps the single process skips and trains the same adapter on the others (were a rank to apply
// a NaN update alone, its later gradients would be NaN and every later step skipped).
TEST_F(ZeroTrain, NanOnOneRankIsSkippedByEveryRank) {
  const std::string first = dir_.file("first");
  ASSERT_EQ(test::run(std::string(MOLE_BINARY) + " train " + MOLE_SOURCE_DIR +
                          "/examples/demo-mixlora.yaml --set train.steps=1 --set train.warmup=0"
                          " --set data.eval= --set log.dir=" + first,
                      dir_.file("first.log")),
            0)
      << test::read_bytes(dir_.file("first.log"));
  const std::string base = dir_.file("poisoned-base");
  fs::create_directory(base);
  for (const char* file : {"config.json", "tokenizer_config.json"}) {
    fs::copy_file(first + "/base/" + file, base + "/" + file);
  }
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  {
    st::SafetensorsFile weights(first + "/base/model.safetensors");
    for (const std::string& name : weights.names()) {
      at::Tensor t = weights.tensor(name).clone();
      if (name == "model.embed_tokens.weight") t['Z' + 3].fill_(3e38);  // finite, but t*t is not
      tensors.emplace_back(name, t);
    }
  }
  st::save_file(base + "/model.safetensors", tensors, {{"format", "pt"}});
  const std::string data = dir_.file("data.jsonl");
  std::ofstream(data) << "{\"prompt\": \"say abc\", \"response\": \"abc ok\"}\n"
                      << "{\"prompt\": \"say Zed\", \"response\": \"Zed ok\"}\n"
                      << "{\"prompt\": \"say def\", \"response\": \"def ok\"}\n"
                      << "{\"prompt\": \"say ghi\", \"response\": \"ghi ok\"}\n";
  const std::string config = dir_.file("nan.yaml");
  std::ofstream(config) << "model: {base: " << base << "}\nadapter: {method: lora, dropout: 0.0}\n"
                        << "data: {train: " << data << ", format: prompt_response, seq_len: 16}\n"
                        << "train: {steps: 8, global_batch: 2, warmup: 0}\n"
                        << "log: {every: 1, tensorboard: false}\n";
  auto run = [&](int np, int zero) {
    const std::string out = dir_.file("nan-np" + std::to_string(np) + "-zero" + std::to_string(zero));
    const std::string cmd = "OMP_NUM_THREADS=1 " + (np > 1 ? test::mpirun(np) : std::string()) +
                            MOLE_BINARY + " train " + config + " --set log.dir=" + out +
                            " --set train.micro_batch=" + std::to_string(2 / np) +
                            " --set parallel.zero=" + std::to_string(zero);
    EXPECT_EQ(test::run(cmd, out + ".log"), 0) << cmd << "\n" << test::read_bytes(out + ".log");
    return out;
  };
  const std::string ref = run(1, 0);
  const std::vector<nlohmann::json> ref_steps = test::metrics(ref);
  ASSERT_EQ(ref_steps.size(), 8u);
  int skipped = 0;
  for (const nlohmann::json& step : ref_steps) skipped += step["skipped"].get<bool>();
  EXPECT_GT(skipped, 0);
  EXPECT_LT(skipped, 8);
  for (int zero : {0, 1, 2}) {
    const std::string got = run(2, zero);
    const std::vector<nlohmann::json> steps = test::metrics(got);
    ASSERT_EQ(steps.size(), ref_steps.size()) << got;
    for (size_t i = 0; i < steps.size(); ++i) {
      EXPECT_EQ(steps[i]["skipped"], ref_steps[i]["skipped"]) << "step " << i + 1 << " of " << got;
      const double a = ref_steps[i]["loss"], b = steps[i]["loss"];
      EXPECT_NEAR(b, a, (i == 0 ? 1e-5 : 1e-3) * std::abs(a)) << "step " << i + 1 << " of " << got;
    }
    EXPECT_LT(test::worst_weight_error(ref, got), 2e-2) << got;
  }
}

}  // namespace
}  // namespace mole
