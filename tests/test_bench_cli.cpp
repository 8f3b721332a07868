// `mole bench train` and `mole bench kernels` through the real binary on a CPU (tests/gpu/run.sh
// runs the same commands at real shapes on a GPU): the JSON they print is checked against
// quantities computed here from the model itself, and bad options give clear errors. The model
// presets are checked against the published parameter counts of the checkpoints they mimic.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <string>
#include <utility>

#include "launch/bench_command.h"
#include "launch/run_parts.h"
#include "moe/adapter.h"
#include "moe/llama.h"
#include "moe/model_presets.h"
#include "parallel/parameter_registry.h"
#include "tests/test_util.h"

namespace mole {
namespace {

test::CommandResult run_mole(const std::string& args) {
  return test::run_command(std::string(MOLE_BINARY) + " " + args);
}

// The last line of `output` that parses as a JSON object.
nlohmann::json last_json(const std::string& output) {
  nlohmann::json found;
  size_t start = 0;
  while (start < output.size()) {
    size_t end = output.find('\n', start);
    if (end == std::string::npos) end = output.size();
    const std::string line = output.substr(start, end - start);
    if (!line.empty() && line.front() == '{') found = nlohmann::json::parse(line, nullptr, false);
    start = end + 1;
  }
  return found;
}

int64_t base_parameters(const moe::CausalLM& model) {
  int64_t total = 0;
  model.for_each_base_parameter([&](const std::string&, const at::Tensor& t) { total += t.numel(); });
  return total;
}

TEST(ModelPresets, ShapesGiveThePublishedParameterCounts) {
  // Parameter counts of the Hugging Face checkpoints (embeddings, norms and LM head included).
  // The models are declared on the meta device: shapes only, no memory.
  const std::pair<const char*, int64_t> published[] = {
      {"tinyllama", 1100048384},    {"llama-2-7b", 6738415616},  {"llama-3-8b", 8030261248},
      {"llama-2-70b", 68976648192}, {"llama-3-70b", 70553706496}, {"mistral-7b", 7248023552},
      {"qwen2-7b", 7615616512}};
  for (const auto& [name, count] : published) {
    const moe::ModelConfig config = moe::model_preset(name);
    moe::CausalLM model(config, at::TensorOptions(at::kFloat).device(at::kMeta));
    EXPECT_EQ(base_parameters(model), count) << name;
    // The matrix-product parameters: everything but the embedding table and the norm weights.
    int64_t matmul = 0;
    model.for_each_base_parameter([&](const std::string& n, const at::Tensor& t) {
      if (t.dim() == 2 && n != "model.embed_tokens.weight") matmul += t.numel();
    });
    EXPECT_EQ(moe::matmul_parameters(config), matmul) << name;
  }
  EXPECT_NE(test::error_of([] { moe::model_preset("llama-9"); }).find("known: tiny, tiny-llama3, tinyllama"),
            std::string::npos);
  // tiny-llama3: LLaMA-3-8B's vocabulary, GQA ratio (4 query heads per KV head) and RoPE base.
  const moe::ModelConfig tiny = moe::model_preset("tiny-llama3"), big = moe::model_preset("llama-3-8b");
  EXPECT_EQ(tiny.vocab_size, big.vocab_size);
  EXPECT_EQ(tiny.num_heads / tiny.num_kv_heads, big.num_heads / big.num_kv_heads);
  EXPECT_EQ(tiny.rope.theta, big.rope.theta);
}

// The adapter `mole train` builds for these keys on the tiny preset: its trainable count.
int64_t trainable_of(const std::string& method) {
  launch::Config c;
  c.adapter.method = method;
  c.adapter.r = 4;
  c.adapter.alpha = 8;
  c.adapter.experts = 4;
  c.adapter.router.top_k = 2;
  moe::CausalLM model(moe::model_preset("tiny"), at::TensorOptions(at::kFloat));
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);
  moe::attach_adapter(model, launch::adapter_spec(c, model.num_layers()), gen);
  return parallel::ParameterRegistry(model, parallel::OptimizerHints{}).global_numel();
}

TEST(BenchCli, TrainReportsWholeStepsOfTheRequestedModel) {
  for (const std::string method : {"lora", "mixlora"}) {
    const test::CommandResult run =
        run_mole("bench train --shape tiny --method " + method +
                 " --batch 2 --seq 16 --experts 4 --top-k 2 --r 4 --warmup 1 --iters 2"
                 " --peak-tflops 1 --json");
    ASSERT_EQ(run.exit_code, 0) << run.output;
    const nlohmann::json j = last_json(run.output);
    ASSERT_TRUE(j.is_object()) << run.output;
    EXPECT_EQ(j["bench"], "train");
    EXPECT_EQ(j["method"], method);
    EXPECT_EQ(j["layers"], 4);
    EXPECT_EQ(j["steps"], 2);
    EXPECT_EQ(j["trainable_params"].get<int64_t>(), trainable_of(method)) << method;
    EXPECT_EQ(j["peak_kind"], "host_rss");
    EXPECT_GT(j["peak_gib"].get<double>(), 0.0);
    const double tps = j["tokens_per_s"].get<double>();
    EXPECT_GT(tps, 0.0);
    EXPECT_NEAR(tps, 1000.0 * 32 / j["step_ms_median"].get<double>(), 1e-6 * tps);
    // MFU from the model's own FLOP count at the measured rate, over the given 1 TFLOP/s peak.
    const double tflops =
        launch::bench_train_model_flops_per_token(moe::model_preset("tiny"), 16) * tps / 1e12;
    EXPECT_NEAR(j["model_tflops"].get<double>(), tflops, 1e-9 * tflops);
    EXPECT_NEAR(j["mfu"].get<double>(), tflops, 1e-9 * tflops);
    // Random tokens over 256 entries: the first loss is near ln 256 and finite.
    const double loss = j["loss_first"].get<double>();
    EXPECT_TRUE(std::isfinite(loss));
    EXPECT_GT(loss, 0.5 * std::log(256.0));
    EXPECT_LT(loss, 2.0 * std::log(256.0));
  }
}

TEST(BenchCli, TrainRefusesBadOptions) {
  const std::pair<std::string, std::string> cases[] = {
      {"--shape llama-9", "unknown model shape 'llama-9' (known: tiny, tiny-llama3, tinyllama, llama-2-7b"},
      {"--shape tiny --dtype bf16", "--dtype bf16 is for --device cuda"},
      {"--shape tiny --seq 4096", "--seq 4096 exceeds the tiny context of 1024"},
      {"--shape tiny --batch 0", "need --batch > 0"},
      {"--shape tiny --method mixtral", "unknown adapter method 'mixtral'"},
  };
  for (const auto& [args, message] : cases) {
    const test::CommandResult run = run_mole("bench train --iters 1 --warmup 0 " + args);
    EXPECT_EQ(run.exit_code, 1) << args << "\n" << run.output;
    EXPECT_NE(run.output.find(message), std::string::npos) << args << "\n" << run.output;
  }
}

TEST(BenchCli, KernelsReportBandwidthAgainstTheCopy) {
  const test::CommandResult run = run_mole(
      "bench kernels --tokens 64 --hidden 32 --intermediate 48 --experts 4 --top-k 2 --r 4"
      " --warmup 1 --iters 2 --json");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const nlohmann::json j = last_json(run.output);
  ASSERT_TRUE(j.is_object()) << run.output;
  EXPECT_EQ(j["rows"], 128);
  ASSERT_EQ(j["results"].size(), 6u) << run.output;
  EXPECT_EQ(j["results"][0]["kernel"], "copy");
  EXPECT_DOUBLE_EQ(j["results"][0]["fraction_of_copy"].get<double>(), 1.0);
  for (const nlohmann::json& row : j["results"]) {
    const double gbps = row["gb_per_s"].get<double>();
    EXPECT_TRUE(std::isfinite(gbps) && gbps > 0.0) << row.dump();
    EXPECT_NEAR(row["fraction_of_copy"].get<double>(), gbps / j["copy_gb_per_s"].get<double>(),
                1e-9) << row.dump();
  }
}

// The checkpoint bench under mpirun: every element of the parameters and both AdamW moments is
// stored exactly once (float32: 12 bytes per parameter) at ZeRO 0 and 2, and with ZeRO 2 no rank
// writes more than the parameters plus its half of the moments.
TEST(BenchCli, CheckpointStoresEveryElementOnce) {
  const test::CommandResult run = test::run_command(
      "OMP_NUM_THREADS=1 " + std::string(MOLE_MPIRUN) + " -np 2 " + MOLE_BINARY +
      " bench checkpoint --shape tiny --method mixlora --experts 4 --r 4");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const nlohmann::json j = last_json(run.output);
  ASSERT_TRUE(j.contains("results")) << run.output;
  const int64_t params = j["params"];
  ASSERT_EQ(j["results"].size(), 2u);
  for (const nlohmann::json& r : j["results"]) {
    EXPECT_EQ(r["total_bytes"].get<int64_t>(), 12 * params) << r.dump();
    if (r["zero"] == 2) {
      EXPECT_LE(r["max_written_bytes_per_rank"].get<int64_t>(), 4 * params + 8 * ((params + 1) / 2)) << r.dump();
    }
  }
}

// The optimizer bench under mpirun: its adapter is the one `mole train` builds (the same number
// of trainable parameters), and each ZeRO stage keeps the bytes it should: two moments of every
// parameter at stage 0, of the padded half at stages 1 and 2 (two ranks, one world group).
TEST(BenchCli, OptimizerReportsEachZeroStage) {
  const test::CommandResult run = test::run_command(
      "OMP_NUM_THREADS=1 " + std::string(MOLE_MPIRUN) + " -np 2 " + MOLE_BINARY +
      " bench optimizer --shape tiny --method mixlora --experts 4 --r 4 --iters 1 --warmup 0");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const nlohmann::json j = last_json(run.output);
  ASSERT_TRUE(j.contains("results")) << run.output;

  moe::CausalLM model(moe::model_preset("tiny"), at::TensorOptions(at::kFloat));
  moe::AdapterSpec spec;
  spec.method = moe::Method::kMixLora;
  spec.lora.r = spec.expert_lora.r = 4;
  spec.experts_per_layer.assign(static_cast<size_t>(model.num_layers()), 4);
  moe::attach_adapter(model, spec, at::make_generator<at::CPUGeneratorImpl>(0));
  int64_t params = 0;
  for (const moe::TrainableTensor& t : model.trainable_tensors()) params += t.tensor.numel();
  EXPECT_EQ(j["params"].get<int64_t>(), params);

  ASSERT_EQ(j["results"].size(), 3u);
  for (const nlohmann::json& r : j["results"]) {
    const int zero = r["zero"];
    EXPECT_GT(r["median_ms"].get<double>(), 0.0);
    EXPECT_EQ(r["trainable_bytes"].get<int64_t>(), 4 * params);
    // One bucket (the default 32 MiB holds the whole tiny adapter): whole gradients, plus the
    // reduced half with ZeRO.
    const int64_t half = (params + 1) / 2;
    EXPECT_EQ(r["grad_bytes"].get<int64_t>(), zero == 0 ? 4 * params : 4 * (params + half))
        << "zero " << zero;
    EXPECT_EQ(r["optimizer_bytes"].get<int64_t>(), zero == 0 ? 8 * params : 8 * half)
        << "zero " << zero;
  }

  const test::CommandResult bad = test::run_command(
      std::string(MOLE_MPIRUN) + " -np 2 " + MOLE_BINARY +
      " bench optimizer --shape tiny --method mola --iters 1 --warmup 0");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("bench optimizer: --method lora or mixlora, got 'mola'"), std::string::npos)
      << bad.output;
}

}  // namespace
}  // namespace mole
