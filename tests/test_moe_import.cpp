// MoE-PEFT adapter import: MixLoRA parity with the MixLoRA authors' package (fixture
// mixlora_logits), through the library and through `mole forward`, and clear errors for broken
// adapters.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <limits>
#include <sys/wait.h>

#include "checkpoint/model_loader.h"
#include "checkpoint/moe_peft_adapter.h"
#include "checkpoint/safetensors.h"
#include "kernels/check.h"
#include "moe/adapter.h"
#include "tests/test_util.h"

namespace mole {
namespace {

namespace fs = std::filesystem;

std::unique_ptr<moe::CausalLM> tiny_model() {
  return ckpt::load_model(test::tiny_llama_dir() + "/base", at::TensorOptions(at::kFloat));
}

TEST(MoeImport, MixLoraMatchesAuthorsPackage) {
  auto model = tiny_model();
  moe::AdapterSpec spec = ckpt::load_adapter(*model, test::tiny_llama_dir() + "/mixlora");
  EXPECT_EQ(spec.method, moe::Method::kMixLora);
  EXPECT_EQ(spec.experts_per_layer, (std::vector<int64_t>{4, 4}));
  EXPECT_EQ(spec.router.top_k, 2);
  st::SafetensorsFile ref(test::tiny_llama_dir() + "/reference.safetensors");
  moe::ForwardContext ctx;
  at::Tensor logits;
  {
    at::NoGradGuard no_grad;
    logits = model->forward(ref.tensor("input_ids"), ctx);
  }
  const double err = test::rel_error(logits, ref.tensor("mixlora_logits"));
  RecordProperty("mixlora_rel_error", test::sci(err));
  EXPECT_LT(err, 1e-4);
  EXPECT_EQ(ctx.sites.size(), 2u);
  EXPECT_EQ(ctx.sites[0].stats.num_pairs, 2 * 16 * 2);  // every token, top-2
}

TEST(MoeImport, MixLoraThroughTheBinary) {
  test::TempDir dir;
  const std::string f = test::tiny_llama_dir();
  const std::string cmd = std::string(MOLE_BINARY) + " forward --model " + f + "/base --adapter " +
                          f + "/mixlora --input " + f + "/reference.safetensors --output " +
                          dir.file("out.safetensors") + " > " + dir.file("log") + " 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << test::read_bytes(dir.file("log"));
  st::SafetensorsFile out(dir.file("out.safetensors")), ref(f + "/reference.safetensors");
  EXPECT_LT(test::rel_error(out.tensor("logits"), ref.tensor("mixlora_logits")), 1e-4);
}

// A copy of the fixture MixLoRA adapter that a test edits before importing.
class MoeImportErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string src = test::tiny_llama_dir() + "/mixlora";
    config_ = test::read_bytes(src + "/adapter_config.json");
    st::SafetensorsFile file(src + "/adapter_model.safetensors");
    for (const std::string& name : file.names()) tensors_.emplace_back(name, file.tensor(name).clone());
  }
  std::string import_error() {
    test::write_bytes(dir_.file("adapter_config.json"), config_);
    st::save_file(dir_.file("adapter_model.safetensors"), tensors_);
    auto model = tiny_model();
    try {
      ckpt::load_adapter(*model, dir_.path());
    } catch (const Error& e) {
      return e.what();
    }
    return "<no error>";
  }
  void drop(const std::string& name) {
    tensors_.erase(std::remove_if(tensors_.begin(), tensors_.end(),
                                  [&](const auto& kv) { return kv.first == name; }),
                   tensors_.end());
  }
  void replace_in_config(const std::string& from, const std::string& to) {
    size_t at = config_.find(from);
    ASSERT_NE(at, std::string::npos) << from;
    config_.replace(at, from.size(), to);
  }
  std::string config_;
  std::vector<std::pair<std::string, at::Tensor>> tensors_;
  test::TempDir dir_;
};

TEST_F(MoeImportErrors, UnchangedCopyImports) { EXPECT_EQ(import_error(), "<no error>"); }

TEST_F(MoeImportErrors, MissingExpertNamesItAndTheSite) {
  drop("mixlora.layers.1.mlp.up_proj.experts.2.lora_B.weight");
  std::string err = import_error();
  EXPECT_NE(err.find("mixlora.layers.1.mlp.up_proj: expert 2 lacks lora_A or lora_B"), std::string::npos) << err;
}

TEST_F(MoeImportErrors, ExpertsWithoutRouter) {
  drop("mixlora.layers.0.mlp.moe_gate.weight");
  std::string err = import_error();
  EXPECT_NE(err.find("experts of mixlora.layers.0.mlp.down_proj have no router"), std::string::npos) << err;
}

TEST_F(MoeImportErrors, RouterShapeAndUnknownKey) {
  for (auto& [name, t] : tensors_) {
    if (name == "mixlora.layers.0.mlp.moe_gate.weight") t = at::zeros({4, 63});
  }
  EXPECT_NE(import_error().find("moe_gate.weight must be [E, 64], got [4, 63]"), std::string::npos);
  for (auto& [name, t] : tensors_) {
    if (name == "mixlora.layers.0.mlp.moe_gate.weight") t = at::zeros({4, 64});
  }
  tensors_.emplace_back("mixlora.layers.0.mlp.gate_proj.experts.0.lora_C.weight", at::zeros({1}));
  EXPECT_NE(import_error().find("'mixlora.layers.0.mlp.gate_proj.experts.0.lora_C.weight' is not a known mixlora key"),
            std::string::npos);
  tensors_.pop_back();
  tensors_.emplace_back("mixlora.layers.7.mlp.moe_gate.weight", at::zeros({4, 64}));
  EXPECT_NE(import_error().find("names layer 7 but the model has 2"), std::string::npos);
}

TEST_F(MoeImportErrors, ConfigProblems) {
  replace_in_config(R"("routing_strategy": "mixlora")", R"("routing_strategy": "mixlora-switch")");
  EXPECT_NE(import_error().find("routing_strategy 'mixlora-switch' is not supported for import"),
            std::string::npos);
  replace_in_config(R"("routing_strategy": "mixlora-switch")", R"("routing_strategy": "mixlora")");
  replace_in_config(R"("top_k": 2)", R"("top_k": 5)");
  EXPECT_NE(import_error().find("top_k"), std::string::npos);
  replace_in_config(R"("top_k": 5)", R"("top_k": 2)");
  replace_in_config(R"("act_fn": "silu")", R"("act_fn": "gelu")");
  EXPECT_NE(import_error().find("act_fn 'gelu' is not supported"), std::string::npos);
  replace_in_config(R"("act_fn": "gelu")", R"("act_fn": "silu")");
  replace_in_config(R"("peft_type": "MIXLORA")", R"("peft_type": "MOEX")");
  EXPECT_NE(import_error().find("peft_type 'MOEX' is not a MoE-PEFT adapter"), std::string::npos);
}

// The rank in adapter_config.json sets the scale: it must be the rank of the weights.
TEST_F(MoeImportErrors, RankMustMatchTheWeights) {
  replace_in_config(R"("r": 4,)", R"("r": 8,)");
  std::string err = import_error();
  EXPECT_NE(err.find("mixlora.layers.0.self_attn.k_proj: lora_A [4, 64] / lora_B [32, 4] have rank "
                     "4/4 but adapter_config.json gives r = 8"),
            std::string::npos)
      << err;
  replace_in_config(R"("r": 8,)", R"("r": 4, "expert_lora": {"r": 2},)");
  err = import_error();
  EXPECT_NE(err.find("mixlora.layers.0.mlp.gate_proj: lora_A [4, 4, 64] / lora_B [4, 176, 4] have "
                     "rank 4/4 but adapter_config.json gives expert_lora.r = 2"),
            std::string::npos)
      << err;
}

// A plain-LoRA module or a whole layer's MoE block left out, a module the config does not list,
// a target that names nothing, and an expert count other than num_experts are all refused.
TEST_F(MoeImportErrors, AdapterMustBeWhatItsConfigSays) {
  const auto tensors = tensors_;
  drop("mixlora.layers.1.self_attn.v_proj.lora_A.weight");
  drop("mixlora.layers.1.self_attn.v_proj.lora_B.weight");
  std::string err = import_error();
  EXPECT_NE(err.find("no lora_A/lora_B for mixlora.layers.1.self_attn.v_proj, which " + dir_.path() +
                     "/adapter_config.json targets; the adapter is incomplete"),
            std::string::npos)
      << err;
  tensors_ = tensors;

  tensors_.erase(std::remove_if(tensors_.begin(), tensors_.end(), [](const auto& kv) {
    return kv.first.rfind("mixlora.layers.1.mlp.", 0) == 0;
  }), tensors_.end());
  err = import_error();
  EXPECT_NE(err.find("layer 1 has no MoE block (mixlora.layers.1.mlp.moe_gate and its experts)"),
            std::string::npos)
      << err;
  tensors_ = tensors;

  const std::string config = config_;
  replace_in_config(R"("o_proj",)", "");
  err = import_error();
  EXPECT_NE(err.find("holds weights for mixlora.layers.0.self_attn.o_proj, which target_modules in " +
                     dir_.path() + "/adapter_config.json does not list"),
            std::string::npos)
      << err;
  config_ = config;
  replace_in_config(R"("q_proj")", R"("q_prj")");
  err = import_error();
  EXPECT_NE(err.find(dir_.path() + "/adapter_config.json: target_modules: unknown module 'q_prj'"),
            std::string::npos)
      << err;
  config_ = config;
  replace_in_config(R"("num_experts": 4)", R"("num_experts": 8)");
  err = import_error();
  EXPECT_NE(err.find("mixlora.layers.0.mlp has 4 experts but " + dir_.path() +
                     "/adapter_config.json declares num_experts = 8"),
            std::string::npos)
      << err;
  config_ = config;
  EXPECT_EQ(import_error(), "<no error>");
}

TEST_F(MoeImportErrors, NonFiniteWeightNamesTheTensor) {
  const std::string key = "mixlora.layers.1.mlp.moe_gate.weight";
  for (auto& [name, t] : tensors_) {
    if (name == key) t.view({-1})[7] = -std::numeric_limits<float>::infinity();
  }
  std::string err = import_error();
  EXPECT_NE(err.find("tensor '" + key + "' in '" + dir_.path() +
                     "/adapter_model.safetensors' holds 1 non-finite value(s)"),
            std::string::npos)
      << err;
}

TEST_F(MoeImportErrors, BinOnlyAdapterAsksForConversion) {
  test::write_bytes(dir_.file("adapter_config.json"), config_);
  test::write_bytes(dir_.file("adapter_model.bin"), "PK");
  auto model = tiny_model();
  try {
    ckpt::load_adapter(*model, dir_.path());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("safetensors.torch.save_file"), std::string::npos) << e.what();
  }
}

// A MoLA adapter in MoE-PEFT's layout, written by hand with layer-wise expert counts (2 and 3)
// on q_proj only, imports into per-linear sites whose output matches the formula.
TEST(MoeImport, MolaLayoutWithLayerwiseCounts) {
  test::TempDir dir;
  test::write_bytes(dir.file("adapter_config.json"),
                    R"({"peft_type": "MOLA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                        "routing_strategy": "mola", "num_experts": [2, 3], "top_k": 2})");
  at::manual_seed(4);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (int layer = 0; layer < 2; ++layer) {
    const std::string p = "mola.layers." + std::to_string(layer) + ".self_attn.q_proj.";
    const int experts = layer == 0 ? 2 : 3;
    tensors.emplace_back(p + "moe_gate.weight", at::randn({experts, 64}));
    for (int e = 0; e < experts; ++e) {
      tensors.emplace_back(p + "experts." + std::to_string(e) + ".lora_A.weight", at::randn({2, 64}));
      tensors.emplace_back(p + "experts." + std::to_string(e) + ".lora_B.weight", at::randn({64, 2}));
    }
  }
  st::save_file(dir.file("adapter_model.safetensors"), tensors);
  auto model = tiny_model();
  moe::AdapterSpec spec = ckpt::load_adapter(*model, dir.path());
  EXPECT_EQ(spec.method, moe::Method::kMola);
  EXPECT_EQ(spec.experts_per_layer, (std::vector<int64_t>{2, 3}));
  const moe::LinearMoeSite& site = *model->layer(1).linear_sites.at("self_attn.q_proj");
  EXPECT_EQ(site.num_experts(), 3);
  EXPECT_DOUBLE_EQ(site.experts().scale, 2.0);
  EXPECT_TRUE(at::equal(site.experts().a_ErI[2], tensors[10].second));  // layer 1 (after 5 tensors of layer 0): gate, e0, e1, then e2 A
}

}  // namespace
}  // namespace mole
