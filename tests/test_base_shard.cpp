// Frozen-base sharding (parallel.base_shard) and activation checkpointing under a real mpirun,
// against the same layout with the whole base on every rank (same seed, same 16-example global
// batch, 5 steps). Sharding moves the base's bytes, not its arithmetic, and checkpointing
// recomputes a layer from the same input and generator state, so in float64 the per-step metrics
// and the trained adapters agree to 1e-12 relative (observed: bit for bit), and in float32 the
// losses to 1e-5. Also: a sharded Hugging Face folder (several files and an index) loads into the
// same model sharded or not, a rank reads only about its part of the mapped files, and a missing
// shard file is a clear error.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/adapter_export.h"
#include "checkpoint/safetensors.h"
#include "launch/config.h"
#include "launch/data.h"
#include "launch/run_parts.h"
#include "moe/model_presets.h"
#include "tests/test_util.h"
#include "tests/train_run_util.h"

namespace mole {
namespace {

namespace fs = std::filesystem;

constexpr double kExact = 1e-12;
const std::string kFp64 = " --set model.dtype=fp64";
const std::string kShard2 = " --set parallel.base_shard=2";
const std::string kShard4 = " --set parallel.base_shard=4";
const std::string kCheckpointing = " --set train.activation_checkpointing=true";
// EP 2 with ZeRO-2, router jitter on (a random draw inside every layer, replayed by checkpointing).
const std::string kEp2Zero2 = " --set parallel.ep=2 --set parallel.zero=2 --set adapter.router.jitter_noise=0.1";

class BaseShardTrain : public test::MpiJobTest {
 protected:
  std::string train(int np, const std::string& name, const std::string& extra, int steps = 5) {
    const std::string out = dir_.file(name);
    const std::string cmd = "OMP_NUM_THREADS=1 " + test::mpirun(np) + test::demo_train_args(out, 8 / np) +
                            " --set train.steps=" + std::to_string(steps) + extra;
    const std::string log = dir_.file(name + ".log");
    EXPECT_EQ(test::run(cmd, log), 0) << cmd << "\n" << test::read_bytes(log);
    return out;
  }
  std::string log_of(const std::string& name) { return test::read_bytes(dir_.file(name + ".log")); }
};

// "<x> MiB of frozen ... weights on this rank" from a run's start-up log.
double base_mib(const std::string& log) {
  std::smatch m;
  EXPECT_TRUE(std::regex_search(log, m, std::regex(R"(([0-9.]+) MiB of frozen)"))) << log;
  return m.empty() ? 0.0 : std::stod(m[1]);
}

void expect_same_file(const std::string& a, const std::string& b) {
  EXPECT_EQ(test::read_bytes(a), test::read_bytes(b)) << a << " vs " << b;
}

TEST_F(BaseShardTrain, ShardedBaseAndCheckpointedLayersReproduceTheWholeBase) {
  // Data parallel: 2 ranks, one base-shard group of 2.
  const std::string dp = train(2, "dp2", kFp64);
  const std::string dp_sharded = train(2, "dp2-shard2", kFp64 + kShard2);
  // EP 2 x EDP 2 with ZeRO-2 on 4 ranks: one group of 4, or two groups of 2 with checkpointing.
  const std::string ep = train(4, "ep2", kFp64 + kEp2Zero2);
  const std::string ep_sharded4 = train(4, "ep2-shard4", kFp64 + kEp2Zero2 + kShard4);
  const std::string ep_sharded2_ckpt = train(4, "ep2-shard2-ckpt", kFp64 + kEp2Zero2 + kShard2 + kCheckpointing);
  double worst = 0.0;
  for (const auto& [ref, got] : {std::pair{dp, dp_sharded}, {ep, ep_sharded4}, {ep, ep_sharded2_ckpt}}) {
    test::expect_same_steps(ref, got, 5, kExact);
    worst = std::max(worst, test::worst_weight_error(ref, got));
    // The synthetic base written beside the adapter is gathered from the shards: the same bytes.
    expect_same_file(ref + "/base/model.safetensors", got + "/base/model.safetensors");
  }
  RecordProperty("worst_weight_rel_error_fp64", test::sci(worst));
  EXPECT_LE(worst, kExact);
  // Each rank keeps 1/N of the base (plus at most N - 1 padding elements per tensor).
  EXPECT_NEAR(base_mib(log_of("dp2-shard2")), base_mib(log_of("dp2")) / 2, 0.02) << log_of("dp2-shard2");
  EXPECT_NEAR(base_mib(log_of("ep2-shard4")), base_mib(log_of("ep2")) / 4, 0.02) << log_of("ep2-shard4");
  EXPECT_NE(log_of("ep2-shard4").find("(1/4 of each tensor, parallel.base_shard)"), std::string::npos);
  // summary.json's memory: the gathered layers' peak is reported for a sharded base only; a pass
  // holds at most two groups at once (one in use, the next prefetched), less than the whole base.
  const auto memory_of = [&](const std::string& run) {
    return nlohmann::json::parse(test::read_bytes(run + "/summary.json")).at("memory");
  };
  EXPECT_EQ(memory_of(dp).at("gathered_bytes").get<int64_t>(), 0);
  const int64_t whole_base = memory_of(dp).at("base_bytes").get<int64_t>();
  const int64_t gathered = memory_of(dp_sharded).at("gathered_bytes").get<int64_t>();
  EXPECT_GT(gathered, 0);
  EXPECT_LT(gathered, whole_base);

  // The per-linear methods (routers on attention inputs, the contrastive and entropy losses) on
  // two ranks, one group of 2.
  for (const std::string& method : {std::string(" --set adapter.method=mola --set adapter.experts=2,2,4,4"),
                                    std::string(" --set adapter.method=moelora --set adapter.contrastive_coef=0.1"),
                                    std::string(" --set adapter.method=dynmole")}) {
    const std::string name = method.substr(method.find('=') + 1, 4);
    const std::string ref = train(2, name, kFp64 + method, 3);
    const std::string got = train(2, name + "-shard2", kFp64 + method + kShard2, 3);
    test::expect_same_steps(ref, got, 3, kExact);
    EXPECT_LE(test::worst_weight_error(ref, got), kExact) << method;
  }

  // float32: the losses agree to 1e-5 (the same arithmetic: observed equal).
  const std::string dp32 = train(2, "dp2-fp32", "", 3);
  const std::string dp32_sharded = train(2, "dp2-fp32-shard2-ckpt", kShard2 + kCheckpointing, 3);
  test::expect_same_steps(dp32, dp32_sharded, 3, 1e-5);
}

// A Hugging Face folder of several safetensors files and an index, written from a synthetic
// TinyLlama cut to one layer (about 670 MiB in float32, so that page granularity does not blur
// what a rank reads).
std::string write_sharded_folder(const std::string& dir) {
  const launch::Config c = launch::parse_config(
      "model: {base: 'synthetic:tinyllama', layers: 1}\n", "test.yaml");
  const std::unique_ptr<moe::CausalLM> model = launch::synthetic_base_model(c, 256, at::TensorOptions(at::kFloat));
  // config.json and the tokenizer as save_hf_model writes them; the tensors then in shards.
  ckpt::save_hf_model(*model, dir, launch::tokenizer_files("byte"));
  fs::remove(dir + "/model.safetensors");
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  model->for_each_base_parameter([&](const std::string& name, const at::Tensor& t) { tensors.emplace_back(name, t); });
  st::save_checkpoint(dir, tensors, 200u << 20);
  return dir;
}

// Tied embeddings: one tensor serves the lookup and the LM head and is gathered with the head's
// group (for the lookup at the start, again for the head at the end). Sharded, with
// checkpointing, it trains the same weights as the whole base, in float64.
TEST_F(BaseShardTrain, TiedEmbeddingsShardAsOneTensor) {
  // Sized to the byte tokenizer, as the tiny preset of a run is.
  moe::ModelConfig shape = moe::tiny_model_config(launch::make_tokenizer("byte")->vocab_size());
  shape.tie_word_embeddings = true;
  moe::CausalLM model(shape, at::TensorOptions(at::kFloat));
  model.init_base_random(5);
  const std::string folder = dir_.file("tied-base");
  ckpt::save_hf_model(model, folder, launch::tokenizer_files("byte"));
  const std::string base = kFp64 + " --set model.base=" + folder;
  const std::string whole = train(2, "tied", base, 3);
  const std::string sharded = train(2, "tied-shard2", base + kShard2 + kCheckpointing, 3);
  test::expect_same_steps(whole, sharded, 3, kExact);
  EXPECT_LE(test::worst_weight_error(whole, sharded), kExact);
  // The tied tensor is in the head's group: kept once, at 1/2 per rank.
  EXPECT_NEAR(base_mib(log_of("tied-shard2")), base_mib(log_of("tied")) / 2, 0.02) << log_of("tied-shard2");
}

TEST_F(BaseShardTrain, ShardedFolderLoadsTheSameModelAndEachRankReadsItsPart) {
  const std::string folder = write_sharded_folder(dir_.file("tinyllama-1"));
  size_t shard_files = 0;
  for (const auto& entry : fs::directory_iterator(folder)) {
    shard_files += entry.path().extension() == ".safetensors";
  }
  ASSERT_GE(shard_files, 3u);
  ASSERT_TRUE(fs::exists(folder + "/model.safetensors.index.json"));
  const std::string small =
      " --set model.base=" + folder + " --set data.seq_len=32 --set train.global_batch=4 --set data.synthetic_examples=16";
  const auto run2 = [&](const std::string& name, const std::string& extra) {
    const std::string out = dir_.file(name);
    // With evaluation at the end: rank 0 alone with the whole base, both ranks of the group when
    // sharded.
    const std::string cmd = "OMP_NUM_THREADS=1 " + test::mpirun(2) + test::demo_train_args(out, 1) +
                            " --set train.steps=2 --set data.eval=synthetic:multitask" + small + extra;
    EXPECT_EQ(test::run(cmd, dir_.file(name + ".log")), 0) << cmd << "\n" << log_of(name);
    return out;
  };
  const std::string whole = run2("whole", "");
  const std::string sharded = run2("sharded", kShard2);
  // The same model: the same losses, gradient norms and evaluation, bit for bit.
  const auto a = test::metrics(whole), b = test::metrics(sharded);
  ASSERT_EQ(a.size(), 3u);  // two steps, then the evaluation
  ASSERT_EQ(b.size(), a.size());
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(b[i].at("loss").get<double>(), a[i].at("loss").get<double>()) << "step " << i + 1;
    EXPECT_EQ(b[i].at("grad_norm").get<double>(), a[i].at("grad_norm").get<double>()) << "step " << i + 1;
  }
  EXPECT_EQ(b[2].at("eval_loss").get<double>(), a[2].at("eval_loss").get<double>());
  // What the load made resident of the mapped files in rank 0's process: all of them without
  // sharding; about half (its part, plus the pages the kernel maps around each fault) with it.
  const std::regex read_line(R"(base files: ([0-9.]+) MiB of the ([0-9.]+) MiB mapped)");
  std::smatch m;
  const std::string whole_log = log_of("whole"), sharded_log = log_of("sharded");
  ASSERT_TRUE(std::regex_search(whole_log, m, read_line)) << whole_log;
  const double whole_read = std::stod(m[1]), mapped = std::stod(m[2]);
  ASSERT_TRUE(std::regex_search(sharded_log, m, read_line)) << sharded_log;
  const double sharded_read = std::stod(m[1]);
  RecordProperty("resident_mib_whole", test::sci(whole_read));
  RecordProperty("resident_mib_shard2", test::sci(sharded_read));
  EXPECT_GT(whole_read, 0.95 * mapped);
  EXPECT_GT(sharded_read, 0.45 * mapped);
  EXPECT_LT(sharded_read, 0.56 * mapped);

  // A shard file listed by the index but missing: a clear error naming it.
  const std::string missing = folder + "/model-00002-of-0000" + std::to_string(shard_files) + ".safetensors";
  ASSERT_TRUE(fs::exists(missing)) << missing;
  fs::remove(missing);
  const std::string cmd = test::mpirun(2) + test::demo_train_args(dir_.file("broken"), 1) + small + kShard2;
  EXPECT_NE(test::run(cmd, dir_.file("broken.log")), 0);
  const std::string log = log_of("broken");
  EXPECT_NE(log.find("shard 'model-00002-of-0000" + std::to_string(shard_files) + ".safetensors'"), std::string::npos)
      << log;
  EXPECT_NE(log.find("does not exist"), std::string::npos) << log;
}

}  // namespace
}  // namespace mole
