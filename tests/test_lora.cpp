// LoRA linear semantics (scale, rsLoRA, dropout on the LoRA input only, init) and PEFT adapter
// import errors.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "checkpoint/model_loader.h"
#include "checkpoint/peft_adapter.h"
#include "checkpoint/safetensors.h"
#include "kernels/check.h"
#include "moe/lora_linear.h"
#include "tests/test_util.h"

namespace mole {
namespace {

namespace fs = std::filesystem;

struct Fixture {
  at::Tensor w = at::randn({6, 5}, at::kDouble).to(at::kFloat);
  at::Tensor b = at::randn({6});
  at::Tensor a = at::randn({3, 5});
  at::Tensor bb = at::randn({6, 3});
  at::Tensor x = at::randn({4, 7, 5});
};

TEST(LoraLinear, MatchesFormulaAndScales) {
  Fixture f;
  moe::LoraLinear linear(f.w, f.b);
  moe::LoraOptions opts{3, 12.0, false, 0.0};
  EXPECT_DOUBLE_EQ(opts.scale(), 4.0);
  moe::LoraOptions rs{3, 12.0, true, 0.0};
  EXPECT_DOUBLE_EQ(rs.scale(), 12.0 / std::sqrt(3.0));
  linear.set_lora(f.a, f.bb, opts.scale(), 0.0, "test");
  at::Tensor expected = at::matmul(f.x, f.w.t()) + f.b + 4.0 * at::matmul(at::matmul(f.x, f.a.t()), f.bb.t());
  EXPECT_TRUE(at::allclose(linear.forward(f.x, false), expected, 1e-5, 1e-5));
  EXPECT_TRUE(at::allclose(linear.forward_base(f.x), at::matmul(f.x, f.w.t()) + f.b, 1e-5, 1e-5));
}

TEST(LoraLinear, DropoutOnlyTouchesTheLoraInput) {
  Fixture f;
  moe::LoraLinear linear(f.w, f.b);
  // With B = 0 the LoRA path contributes nothing: training output is exactly the base.
  linear.set_lora(f.a, at::zeros({6, 3}), 2.0, 0.5, "test");
  // Dropout draws from the generator it is given (never from the global one).
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(11);
  EXPECT_TRUE(at::equal(linear.forward(f.x, true, gen), linear.forward_base(f.x) + 0.0));
  // With B != 0, dropout makes training differ from evaluation, and evaluation is deterministic.
  linear.set_lora(f.a, f.bb, 2.0, 0.5, "test");
  EXPECT_FALSE(at::allclose(linear.forward(f.x, true, gen), linear.forward(f.x, false)));
  EXPECT_TRUE(at::equal(linear.forward(f.x, false), linear.forward(f.x, false)));
  // Each input element is either dropped or scaled by 1/(1-p): the delta equals the LoRA of a
  // masked input for the mask recovered from a one-hot probe.
  at::Tensor eye = at::eye(5).unsqueeze(0).expand({200, 5, 5}).reshape({1000, 5});
  at::Tensor delta = linear.lora_delta(eye, true, gen);                 // rows: s * B A (m_i e_i / (1-p))
  at::Tensor column = 2.0 * at::matmul(f.bb, f.a).t() / 0.5;       // [5, 6]: kept rows
  at::Tensor expected_kept = column.repeat({200, 1});
  at::Tensor kept = (delta - expected_kept).abs().amax(1) < 1e-4;
  at::Tensor dropped = delta.abs().amax(1) < 1e-6;
  EXPECT_TRUE(kept.logical_or(dropped).all().item<bool>());
  double keep_fraction = kept.to(at::kDouble).mean().item<double>();
  EXPECT_GT(keep_fraction, 0.35);
  EXPECT_LT(keep_fraction, 0.65);
}

TEST(LoraLinear, InitIsKaimingUniformAWithZeroB) {
  Fixture f;
  moe::LoraLinear linear(f.w, f.b);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(123);
  linear.init_lora({4, 8.0, false, 0.0}, gen);
  const auto& lora = *linear.lora();
  EXPECT_EQ(lora.a_rI.sizes(), (std::vector<int64_t>{4, 5}));
  EXPECT_LE(lora.a_rI.abs().max().item<double>(), 1.0 / std::sqrt(5.0));
  EXPECT_GT(lora.a_rI.abs().max().item<double>(), 0.0);
  EXPECT_EQ(lora.b_Or.abs().max().item<double>(), 0.0);
  EXPECT_TRUE(lora.a_rI.requires_grad());
  EXPECT_TRUE(at::equal(linear.forward(f.x, false), linear.forward_base(f.x)));
  // Same seed, same draw.
  moe::LoraLinear again(f.w, f.b);
  at::Generator gen2 = at::make_generator<at::CPUGeneratorImpl>(123);
  again.init_lora({4, 8.0, false, 0.0}, gen2);
  EXPECT_TRUE(at::equal(again.lora()->a_rI, lora.a_rI));
}

TEST(LoraLinear, ShapeErrors) {
  Fixture f;
  moe::LoraLinear linear(f.w, f.b);
  EXPECT_THROW(linear.set_lora(at::randn({3, 4}), f.bb, 1.0, 0.0, "t"), Error);
  EXPECT_THROW(linear.set_lora(f.a, at::randn({5, 3}), 1.0, 0.0, "t"), Error);
  EXPECT_THROW(linear.set_lora(f.a, at::randn({6, 2}), 1.0, 0.0, "t"), Error);
}

// A copy of the fixture adapter with its config and tensors rewritten by the test.
class PeftImportErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = ckpt::load_model(test::tiny_llama_dir() + "/base", at::TensorOptions(at::kFloat));
    src_ = test::tiny_llama_dir() + "/peft_lora";
    config_ = test::read_bytes(src_ + "/adapter_config.json");
    st::SafetensorsFile file(src_ + "/adapter_model.safetensors");
    for (const std::string& name : file.names()) tensors_.emplace_back(name, file.tensor(name).clone());
  }
  std::string import_error() {
    test::write_bytes(dir_.file("adapter_config.json"), config_);
    st::save_file(dir_.file("adapter_model.safetensors"), tensors_);
    try {
      ckpt::load_peft_adapter(*model_, dir_.path());
    } catch (const Error& e) {
      return e.what();
    }
    return "<no error>";
  }
  void replace_in_config(const std::string& from, const std::string& to) {
    size_t at = config_.find(from);
    ASSERT_NE(at, std::string::npos) << from;
    config_.replace(at, from.size(), to);
  }
  void drop(const std::string& name) {
    tensors_.erase(std::remove_if(tensors_.begin(), tensors_.end(),
                                  [&](const auto& kv) { return kv.first == name; }),
                   tensors_.end());
  }
  std::unique_ptr<moe::CausalLM> model_;
  std::string src_, config_;
  std::vector<std::pair<std::string, at::Tensor>> tensors_;
  test::TempDir dir_;
};

TEST_F(PeftImportErrors, UnchangedCopyImports) { EXPECT_EQ(import_error(), "<no error>"); }

TEST_F(PeftImportErrors, WrongPeftTypeAndDora) {
  replace_in_config(R"("peft_type": "LORA")", R"("peft_type": "MIXLORA")");
  EXPECT_NE(import_error().find("peft_type 'MIXLORA'"), std::string::npos);
  replace_in_config(R"("peft_type": "MIXLORA")", R"("peft_type": "LORA")");
  replace_in_config(R"("use_dora": false)", R"("use_dora": true)");
  EXPECT_NE(import_error().find("DoRA"), std::string::npos);
}

TEST_F(PeftImportErrors, RankMismatchUnknownKeyAndMissingPartner) {
  replace_in_config(R"("r": 4)", R"("r": 8)");
  EXPECT_NE(import_error().find("implies rank 8"), std::string::npos);
  replace_in_config(R"("r": 8)", R"("r": 4)");

  tensors_.emplace_back("base_model.model.lm_head.lora_A.weight", at::zeros({4, 64}));
  EXPECT_NE(import_error().find("'base_model.model.lm_head.lora_A.weight' is not a LoRA weight"),
            std::string::npos);
  tensors_.pop_back();

  tensors_.erase(std::remove_if(tensors_.begin(), tensors_.end(), [](const auto& kv) {
    return kv.first == "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight";
  }), tensors_.end());
  EXPECT_NE(import_error().find("model.layers.1.mlp.up_proj has only one of lora_A / lora_B"),
            std::string::npos);
}

TEST_F(PeftImportErrors, WrongShapeNamesTheModule) {
  for (auto& [name, t] : tensors_) {
    if (name == "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight") t = at::zeros({64, 4});
  }
  std::string err = import_error();
  EXPECT_NE(err.find("model.layers.0.self_attn.k_proj: lora_B must be [32, r]"), std::string::npos)
      << err;
}

// The weights must be exactly what target_modules / layers_to_transform say, in both directions.
TEST_F(PeftImportErrors, WeightsMustMatchTheTargetedModules) {
  const std::string v1 = "base_model.model.model.layers.1.self_attn.v_proj.";
  const auto saved = tensors_;
  drop(v1 + "lora_A.weight");
  drop(v1 + "lora_B.weight");
  std::string err = import_error();
  EXPECT_NE(err.find("no lora_A/lora_B for 1 module(s) that " + dir_.path() +
                     "/adapter_config.json targets, e.g. model.layers.1.self_attn.v_proj"),
            std::string::npos)
      << err;
  tensors_ = saved;

  const std::string config = config_;
  replace_in_config(R"("v_proj")", R"("q_proj")");  // v_proj dropped from the targets
  err = import_error();
  EXPECT_NE(err.find("'base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight' adapts "
                     "model.layers.0.self_attn.v_proj, which " + dir_.path() +
                     "/adapter_config.json does not target"),
            std::string::npos)
      << err;
  config_ = config;
  EXPECT_EQ(import_error(), "<no error>");

  replace_in_config(R"("up_proj",)", R"("up_proj", "lm_head",)");  // an extra module
  err = import_error();
  EXPECT_NE(err.find("target_modules entry 'lm_head' names no linear mole adapts"), std::string::npos)
      << err;
  replace_in_config(R"("up_proj", "lm_head",)", R"("up_proj",)");

  replace_in_config(R"("layers_to_transform": null)", R"("layers_to_transform": [0])");
  err = import_error();
  EXPECT_NE(err.find("adapts model.layers.1.self_attn.q_proj, which"), std::string::npos) << err;
  tensors_.erase(std::remove_if(tensors_.begin(), tensors_.end(), [](const auto& kv) {
    return kv.first.find(".layers.1.") != std::string::npos;
  }), tensors_.end());
  model_ = ckpt::load_model(test::tiny_llama_dir() + "/base", at::TensorOptions(at::kFloat));
  EXPECT_EQ(import_error(), "<no error>");
  EXPECT_FALSE(model_->layer(1).linear("self_attn.q_proj").has_lora());
  EXPECT_TRUE(model_->layer(0).linear("self_attn.q_proj").has_lora());
}

TEST_F(PeftImportErrors, AllLinearAndExcludeModules) {
  const size_t start = config_.find(R"("target_modules": [)");
  const size_t end = config_.find(']', start);
  config_.replace(start, end + 1 - start, R"("target_modules": "all-linear")");
  EXPECT_EQ(import_error(), "<no error>");
  replace_in_config(R"("exclude_modules": null)", R"("exclude_modules": ["k_proj"])");
  EXPECT_NE(import_error().find("adapts model.layers.0.self_attn.k_proj, which"), std::string::npos);
  drop("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight");
  drop("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight");
  drop("base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight");
  drop("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight");
  EXPECT_EQ(import_error(), "<no error>");
}

TEST_F(PeftImportErrors, NonFiniteWeightNamesTheTensor) {
  const std::string key = "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight";
  for (auto& [name, t] : tensors_) {
    if (name == key) t.view({-1})[3] = std::nan("");
  }
  std::string err = import_error();
  EXPECT_NE(err.find("tensor '" + key + "' in '" + dir_.path() +
                     "/adapter_model.safetensors' holds 1 non-finite value(s)"),
            std::string::npos)
      << err;
}

TEST_F(PeftImportErrors, BinOnlyAdapterAsksForConversion) {
  test::write_bytes(dir_.file("adapter_config.json"), config_);
  test::write_bytes(dir_.file("adapter_model.bin"), "not a pickle");
  try {
    ckpt::load_peft_adapter(*model_, dir_.path());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("convert it to safetensors"), std::string::npos);
  }
}

}  // namespace
}  // namespace mole
