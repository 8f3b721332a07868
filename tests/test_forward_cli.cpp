// `mole forward` end to end, through the real binary: parity with the PEFT reference from the
// fixture files, and clear errors (non-zero exit, message naming the problem) for bad inputs.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cmath>
#include <filesystem>
#include <limits>

#include "checkpoint/safetensors.h"
#include "kernels/check.h"
#include "tests/test_util.h"

namespace mole {
namespace {

namespace fs = std::filesystem;

using RunResult = test::CommandResult;

RunResult run_mole(const std::string& args) {
  return test::run_command(std::string(MOLE_BINARY) + " " + args);
}

class ForwardCli : public ::testing::Test {
 protected:
  void SetUp() override {
    fixture_ = test::tiny_llama_dir();
    reference_ = std::make_unique<st::SafetensorsFile>(fixture_ + "/reference.safetensors");
  }
  std::string args(const std::string& input, const std::string& extra = "") {
    return "forward --model " + fixture_ + "/base --input " + input + " --output " +
           dir_.file("out.safetensors") + " " + extra;
  }
  std::string fixture_;
  std::unique_ptr<st::SafetensorsFile> reference_;
  test::TempDir dir_;
};

TEST_F(ForwardCli, PeftLoraMatchesReference) {
  const std::string input = dir_.file("in.safetensors");
  st::save_file(input, {{"input_ids", reference_->tensor("input_ids")},
                        {"labels", reference_->tensor("labels")}});
  RunResult run = run_mole(args(input, "--adapter " + fixture_ + "/peft_lora"));
  ASSERT_EQ(run.exit_code, 0) << run.output;
  st::SafetensorsFile out(dir_.file("out.safetensors"));
  EXPECT_EQ(out.tensor("logits").scalar_type(), at::kFloat);
  EXPECT_EQ(out.tensor("loss").sizes(), (std::vector<int64_t>{1}));
  EXPECT_LT(test::rel_error(out.tensor("logits"), reference_->tensor("peft_lora_logits")), 1e-4);
  EXPECT_LT(test::rel_error(out.tensor("loss"), reference_->tensor("peft_lora_loss")), 1e-4);
}

TEST_F(ForwardCli, BaseWithoutLabelsWritesOnlyLogits) {
  const std::string input = dir_.file("in.safetensors");
  st::save_file(input, {{"input_ids", reference_->tensor("input_ids")}});
  RunResult run = run_mole(args(input));
  ASSERT_EQ(run.exit_code, 0) << run.output;
  st::SafetensorsFile out(dir_.file("out.safetensors"));
  EXPECT_FALSE(out.contains("loss"));
  EXPECT_LT(test::rel_error(out.tensor("logits"), reference_->tensor("base_logits")), 1e-4);
}

TEST_F(ForwardCli, TokenIdOutsideVocabulary) {
  const std::string input = dir_.file("in.safetensors");
  at::Tensor ids = reference_->tensor("input_ids").clone();
  ids[0][3] = 1000;
  st::save_file(input, {{"input_ids", ids}});
  RunResult run = run_mole(args(input));
  EXPECT_NE(run.exit_code, 0);
  EXPECT_NE(run.output.find("token id 1000 at input_ids[0][3] is outside the vocabulary [0, 256)"),
            std::string::npos)
      << run.output;
  EXPECT_FALSE(fs::exists(dir_.file("out.safetensors")));
}

TEST_F(ForwardCli, BadInputs) {
  const std::string input = dir_.file("in.safetensors");
  st::save_file(input, {{"tokens", reference_->tensor("input_ids")}});
  RunResult run = run_mole(args(input));
  EXPECT_NE(run.exit_code, 0);
  EXPECT_NE(run.output.find("no tensor 'input_ids'"), std::string::npos) << run.output;

  st::save_file(input, {{"input_ids", reference_->tensor("input_ids").to(at::kInt)}});
  run = run_mole(args(input));
  EXPECT_NE(run.exit_code, 0);
  EXPECT_NE(run.output.find("input_ids must be int64"), std::string::npos) << run.output;

  st::save_file(input, {{"input_ids", reference_->tensor("input_ids")},
                        {"labels", reference_->tensor("labels").narrow(1, 0, 8)}});
  run = run_mole(args(input));
  EXPECT_NE(run.exit_code, 0);
  EXPECT_NE(run.output.find("labels shape [2, 8] differs from input_ids shape [2, 16]"),
            std::string::npos)
      << run.output;

  run = run_mole(args(dir_.file("missing.safetensors")));
  EXPECT_NE(run.exit_code, 0);
  EXPECT_NE(run.output.find("missing.safetensors"), std::string::npos) << run.output;

  run = run_mole("forward --model x --input y --output z --dtype fp16");
  EXPECT_NE(run.exit_code, 0);
  EXPECT_NE(run.output.find("--dtype"), std::string::npos) << run.output;
}

// A model folder whose weights file is cut short, and one with an unknown model_type.
TEST_F(ForwardCli, BrokenModelFolders) {
  const std::string input = dir_.file("in.safetensors");
  st::save_file(input, {{"input_ids", reference_->tensor("input_ids")}});
  const std::string model = dir_.file("model");
  fs::create_directory(model);
  fs::copy_file(fixture_ + "/base/config.json", model + "/config.json");
  std::string weights = test::read_bytes(fixture_ + "/base/model.safetensors");
  test::write_bytes(model + "/model.safetensors", weights.substr(0, weights.size() - 100));
  RunResult run = run_mole("forward --model " + model + " --input " + input + " --output " +
                           dir_.file("out.safetensors"));
  EXPECT_NE(run.exit_code, 0);
  EXPECT_NE(run.output.find("model.safetensors"), std::string::npos) << run.output;

  std::string config = test::read_bytes(fixture_ + "/base/config.json");
  config.replace(config.find("\"llama\""), 7, "\"gpt2\"");
  test::write_bytes(model + "/config.json", config);
  run = run_mole("forward --model " + model + " --input " + input + " --output " +
                 dir_.file("out.safetensors"));
  EXPECT_NE(run.exit_code, 0);
  EXPECT_NE(run.output.find("model_type 'gpt2' is not supported"), std::string::npos) << run.output;
}

// A NaN in a base weight or in an adapter weight: `mole forward` refuses to load it, naming the
// tensor, instead of printing a NaN loss with exit 0.
TEST_F(ForwardCli, NonFiniteWeightsAreRefusedByName) {
  const std::string input = dir_.file("in.safetensors");
  st::save_file(input, {{"input_ids", reference_->tensor("input_ids")},
                        {"labels", reference_->tensor("labels")}});
  const std::string model = dir_.file("model");
  fs::create_directory(model);
  fs::copy_file(fixture_ + "/base/config.json", model + "/config.json");
  std::vector<std::pair<std::string, at::Tensor>> weights;
  {
    st::SafetensorsFile base(fixture_ + "/base/model.safetensors");
    for (const std::string& name : base.names()) weights.emplace_back(name, base.tensor(name).clone());
  }
  for (auto& [name, t] : weights) {
    if (name == "model.layers.1.mlp.down_proj.weight") t.view({-1})[5] = std::nan("");
  }
  st::save_file(model + "/model.safetensors", weights);
  RunResult run = run_mole("forward --model " + model + " --input " + input + " --output " +
                           dir_.file("out.safetensors"));
  EXPECT_NE(run.exit_code, 0);
  EXPECT_NE(run.output.find("tensor 'model.layers.1.mlp.down_proj.weight' in '" + model +
                            "' holds 1 non-finite value(s)"),
            std::string::npos)
      << run.output;
  EXPECT_NE(run.output.find("first at flat index 5"), std::string::npos) << run.output;
  EXPECT_FALSE(fs::exists(dir_.file("out.safetensors")));

  const std::string adapter = dir_.file("adapter");
  fs::create_directory(adapter);
  fs::copy_file(fixture_ + "/peft_lora/adapter_config.json", adapter + "/adapter_config.json");
  std::vector<std::pair<std::string, at::Tensor>> lora;
  {
    st::SafetensorsFile file(fixture_ + "/peft_lora/adapter_model.safetensors");
    for (const std::string& name : file.names()) lora.emplace_back(name, file.tensor(name).clone());
  }
  const std::string bad = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight";
  for (auto& [name, t] : lora) {
    if (name == bad) t.view({-1})[0] = std::numeric_limits<float>::infinity();
  }
  st::save_file(adapter + "/adapter_model.safetensors", lora);
  run = run_mole(args(input, "--adapter " + adapter));
  EXPECT_NE(run.exit_code, 0);
  EXPECT_NE(run.output.find("tensor '" + bad + "' in '" + adapter +
                            "/adapter_model.safetensors' holds 1 non-finite value(s)"),
            std::string::npos)
      << run.output;
  EXPECT_FALSE(fs::exists(dir_.file("out.safetensors")));
}

}  // namespace
}  // namespace mole
