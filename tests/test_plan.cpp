// `mole plan` against what a run measures. A real training run (under mpirun where the layout
// needs ranks) writes summary.json "memory": the bytes of the tensors mole holds per category
// (frozen base shard, gathered layers with the host pool, trainable tensors, gradients, optimizer
// state) and the most tensor bytes a step held at once (counted by the CPU allocator), whose
// remainder is the activations. The plan of the same config, computed from shapes alone, must be
// within 15 % of each category (issue bound; observed: the categories other than activations
// equal, activations within 6 %). The data are full-length sequences, as the plan assumes.
// Also: the 70B layout of the issue fits 8 x 80 GiB; bad layouts and models are clear errors;
// the allocator's count is exact for a tensor of known size.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <string>

#include "launch/memory_stats.h"
#include "tests/test_util.h"
#include "tests/train_run_util.h"

namespace mole {
namespace {

constexpr double kPlanTolerance = 0.15;

// Examples of exactly `len` byte-tokenizer ids: every micro-batch is seq_len long.
void write_full_length_tokens(const std::string& path, int examples, int len) {
  std::ofstream out(path);
  for (int i = 0; i < examples; ++i) {
    nlohmann::json ids = nlohmann::json::array();
    for (int j = 0; j < len; ++j) ids.push_back(3 + (i * 131 + j * 17) % 240);
    out << nlohmann::json{{"input_ids", ids}}.dump() << "\n";
  }
}

std::string plan_command(const std::string& sets, int world) {
  return std::string(MOLE_BINARY) + " plan " + MOLE_SOURCE_DIR + "/examples/demo-mixlora.yaml --json --world " +
         std::to_string(world) + sets;
}

nlohmann::json plan_json(const std::string& sets, int world) {
  const test::CommandResult r = test::run_command(plan_command(sets, world));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return nlohmann::json::parse(r.output);
}

class PlanVsMeasured : public test::MpiJobTest {
 protected:
  // Trains `steps` steps of the demo config with `sets` on `np` processes (mpirun when np > 1)
  // and compares its summary's memory with the plan's.
  void compare(const std::string& name, int np, const std::string& sets) {
    const std::string out = dir_.file(name);
    const std::string train = std::string(MOLE_BINARY) + " train " + MOLE_SOURCE_DIR +
                              "/examples/demo-mixlora.yaml --set train.steps=1 --set train.warmup=0"
                              " --set data.eval= --set log.dir=" + out + sets;
    const std::string cmd = "OMP_NUM_THREADS=1 " + (np > 1 ? test::mpirun(np) : std::string()) + train;
    const std::string log = dir_.file(name + ".log");
    ASSERT_EQ(test::run(cmd, log), 0) << cmd << "\n" << test::read_bytes(log);
    std::ifstream in(out + "/summary.json");
    const nlohmann::json measured = nlohmann::json::parse(in)["memory"];
    const nlohmann::json plan = plan_json(sets, np)["memory"];
    const auto check = [&](const char* plan_key, const char* measured_key) {
      const double want = measured.at(measured_key).get<double>();
      const double got = plan.at(plan_key).get<double>();
      const double rel = want > 0 ? std::abs(got - want) / want : std::abs(got);
      EXPECT_LE(rel, kPlanTolerance) << name << ": plan " << plan_key << " " << got << " vs measured "
                                     << measured_key << " " << want;
      std::printf("  %-18s plan %14.0f  measured %14.0f  (%+.1f%%)\n", plan_key, got, want,
                  want > 0 ? 100.0 * (got - want) / want : 0.0);
    };
    std::printf("%s:\n", name.c_str());
    check("base_bytes", "base_bytes");
    check("gathered_bytes", "gathered_bytes");
    check("trainable_bytes", "trainable_bytes");
    check("grads_bytes", "grad_bytes");
    check("optimizer_bytes", "optimizer_bytes");
    check("activations_bytes", "activation_bytes");
    check("total_bytes", "step_peak_bytes");
    EXPECT_GT(measured.at("activation_bytes").get<int64_t>(), 0);
  }
};

// Two ranks: tinyllama's shapes cut to 2 layers, MixLoRA with EP 2, ZeRO-2 and the base sharded
// over both ranks (every category non-zero).
TEST_F(PlanVsMeasured, ShardedExpertParallelZero2) {
  write_full_length_tokens(dir_.file("data.jsonl"), 32, 128);
  compare("tinyllama-ep2-zero2-shard2", 2,
          " --set model.base=synthetic:tinyllama --set model.layers=2 --set data.seq_len=128"
          " --set train.micro_batch=2 --set train.global_batch=8 --set data.format=tokens"
          " --set data.train=" + dir_.file("data.jsonl") +
          " --set parallel.ep=2 --set parallel.zero=2 --set parallel.base_shard=2");
}

// One process, the tiny preset: MixLoRA with activation checkpointing; DynMoLE (whose routers
// may take every expert: the plan holds the worst step); plain LoRA with dropout.
TEST_F(PlanVsMeasured, OneProcessMethods) {
  write_full_length_tokens(dir_.file("data.jsonl"), 64, 64);
  const std::string data = " --set data.format=tokens --set data.train=" + dir_.file("data.jsonl");
  compare("tiny-mixlora-checkpointing", 1, data + " --set train.activation_checkpointing=true");
  compare("tiny-dynmole", 1, data + " --set adapter.method=dynmole");
  compare("tiny-lora-dropout", 1, data + " --set adapter.method=lora --set adapter.dropout=0.05");
}

// The 70B layout: LLaMA-3-70B, MixLoRA 8 experts top-2 r=16, bf16, seq 4096,
// micro-batch 1, 8 ranks with EP 8, ZeRO-2, base_shard 8, activation checkpointing: fits in
// 80 GiB with the reserve; one rank (no sharding of any kind) cannot hold it; the smallest world that fits is at most 8.
TEST(Plan, Llama3_70bFitsOnEightRanks) {
  const std::string sets =
      " --set model.base=synthetic:llama-3-70b --set model.dtype=bf16 --set model.device=cuda"
      " --set adapter.method=mixlora --set adapter.experts=8 --set adapter.router.top_k=2"
      " --set adapter.r=16 --set data.seq_len=4096 --set train.micro_batch=1 --set train.global_batch=8"
      " --set parallel.ep=8 --set parallel.zero=2 --set parallel.base_shard=8"
      " --set train.activation_checkpointing=true --device-memory 80 --smallest-world";
  const nlohmann::json plan = plan_json(sets, 8);
  const nlohmann::json& m = plan["memory"];
  std::printf("memory %s\ncomm %s\n", m.dump().c_str(), plan["comm"].dump().c_str());
  EXPECT_TRUE(plan["fits"].get<bool>());
  const int64_t sum = m["base_bytes"].get<int64_t>() + m["gathered_bytes"].get<int64_t>() +
                      m["trainable_bytes"].get<int64_t>() + m["grads_bytes"].get<int64_t>() +
                      m["optimizer_bytes"].get<int64_t>() + m["activations_bytes"].get<int64_t>();
  EXPECT_EQ(sum, m["total_bytes"].get<int64_t>());
  // 1/8 of the 70.6e9 bf16 parameters.
  EXPECT_NEAR(m["base_bytes"].get<double>(), 70.55e9 * 2 / 8, 0.01e9 * 2);
  EXPECT_GT(plan["comm"]["base_allgather_bytes"].get<int64_t>(), 0);
  EXPECT_GT(plan["comm"]["grad_reduce_scatter_bytes"].get<int64_t>(), 0);
  ASSERT_TRUE(plan["smallest_world"].is_number());
  EXPECT_LE(plan["smallest_world"].get<int>(), 8);
  const nlohmann::json one =
      plan_json(sets + " --set parallel.ep=1 --set parallel.zero=0 --set parallel.base_shard=0", 1);
  EXPECT_FALSE(one["fits"].get<bool>());
}

TEST(Plan, BadLayoutsAndModelsAreClearErrors) {
  const auto error = [](const std::string& sets, int world) {
    const test::CommandResult r = test::run_command(plan_command(sets, world));
    EXPECT_NE(r.exit_code, 0) << r.output;
    return r.output;
  };
  EXPECT_NE(error(" --set model.base=synthetic:llama-9", 1).find("llama-3-70b"), std::string::npos);
  EXPECT_NE(error(" --set model.base=synthetic:tiny --set model.layers=9", 1).find("model.layers"), std::string::npos);
  EXPECT_NE(error(" --set parallel.base_shard=3", 4).find("base_shard"), std::string::npos);
  EXPECT_NE(error(" --set train.global_batch=6", 4).find("global_batch"), std::string::npos);
  EXPECT_NE(error(" --set model.device=cuda --set model.dtype=bf16", 1).find("--device-memory"), std::string::npos);
  EXPECT_NE(error(" --set model.base=/nonexistent/model", 1).find("/nonexistent/model"), std::string::npos);
}

// The CPU allocator's count moves by exactly a tensor's bytes.
TEST(Plan, CpuTensorBytesCountEachAllocation) {
  launch::track_cpu_tensor_bytes();
  const int64_t before = launch::cpu_tensor_bytes();
  {
    at::Tensor t = at::empty({1000, 250}, at::kFloat);
    EXPECT_EQ(launch::cpu_tensor_bytes() - before, 1000 * 250 * 4);
    EXPECT_GE(launch::peak_cpu_tensor_bytes(), launch::cpu_tensor_bytes());
  }
  EXPECT_EQ(launch::cpu_tensor_bytes(), before);
}

}  // namespace
}  // namespace mole
