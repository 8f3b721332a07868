// Hugging Face config.json parsing: the fixture, older and newer rope layouts, model types,
// and the errors for unknown types, missing fields and wrong types.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/adapter_export.h"
#include "checkpoint/hf_config.h"
#include "checkpoint/model_loader.h"
#include "kernels/check.h"
#include "moe/llama.h"
#include "moe/model_presets.h"
#include "moe/rope.h"
#include "tests/test_util.h"

namespace mole {
namespace {

// Minimal llama config with `extra` spliced into the object.
std::string llama_json(const std::string& extra, const std::string& model_type = "llama") {
  return R"({"model_type": ")" + model_type + R"(", "vocab_size": 32, "hidden_size": 16,
             "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4,
             "rms_norm_eps": 1e-6)" +
         (extra.empty() ? "" : ", " + extra) + "}";
}

std::string error_of(const std::string& json) {
  try {
    ckpt::parse_hf_config(json, "cfg.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

TEST(HfConfig, TinyLlamaFixture) {
  moe::ModelConfig c = ckpt::load_hf_config(test::tiny_llama_dir() + "/base");
  EXPECT_EQ(c.model_type, "llama");
  EXPECT_EQ(c.vocab_size, 256);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 176);
  EXPECT_EQ(c.num_layers, 2);
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope.theta, 10000.0);  // from rope_parameters (transformers 5)
  EXPECT_EQ(c.rope.type, "default");
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.qkv_bias);
}

TEST(HfConfig, DefaultsAndTopLevelRopeTheta) {
  moe::ModelConfig c = ckpt::parse_hf_config(llama_json(R"("rope_theta": 500000.0)"), "cfg.json");
  EXPECT_DOUBLE_EQ(c.rope.theta, 500000.0);
  EXPECT_EQ(c.num_kv_heads, 4);  // defaults to num_attention_heads
  EXPECT_EQ(c.head_dim, 4);      // hidden / heads
  moe::ModelConfig tied = ckpt::parse_hf_config(
      llama_json(R"("tie_word_embeddings": true, "attention_bias": true, "head_dim": 8)"), "cfg.json");
  EXPECT_TRUE(tied.tie_word_embeddings);
  EXPECT_TRUE(tied.qkv_bias);
  EXPECT_TRUE(tied.o_bias);
  EXPECT_EQ(tied.head_dim, 8);
}

TEST(HfConfig, Qwen2HasQkvBiasAndMistralSlidingWindow) {
  moe::ModelConfig q = ckpt::parse_hf_config(llama_json("", "qwen2"), "cfg.json");
  EXPECT_TRUE(q.qkv_bias);
  EXPECT_FALSE(q.o_bias);
  moe::ModelConfig m =
      ckpt::parse_hf_config(llama_json(R"("sliding_window": 4096)", "mistral"), "cfg.json");
  ASSERT_TRUE(m.sliding_window.has_value());
  EXPECT_EQ(*m.sliding_window, 4096);
  moe::ModelConfig m2 =
      ckpt::parse_hf_config(llama_json(R"("sliding_window": null)", "mistral"), "cfg.json");
  EXPECT_FALSE(m2.sliding_window.has_value());
}

// save_hf_model writes each architecture's own config.json (Qwen2's q/k/v biases, Mistral's
// window, LLaMA's attention_bias): loading the folder back gives the same configuration and the
// same tensors.
TEST(HfModelWrite, EachArchitectureRoundTrips) {
  test::TempDir dir;
  for (const std::string type : {"llama", "qwen2", "mistral"}) {
    moe::ModelConfig c = moe::tiny_model_config(64);
    c.model_type = type;
    if (type == "qwen2") c.qkv_bias = true;
    if (type == "mistral") c.sliding_window = 16;
    moe::CausalLM model(c, at::TensorOptions(at::kFloat));
    model.init_base_random(3);
    ckpt::save_hf_model(model, dir.file(type));
    const moe::ModelConfig back = ckpt::load_hf_config(dir.file(type) + "/config.json");
    EXPECT_EQ(back.model_type, type);
    EXPECT_EQ(back.qkv_bias, c.qkv_bias) << type;
    EXPECT_EQ(back.o_bias, c.o_bias) << type;
    EXPECT_EQ(back.sliding_window, c.sliding_window) << type;
    EXPECT_EQ(back.num_layers, c.num_layers);
    const std::unique_ptr<moe::CausalLM> loaded = ckpt::load_model(dir.file(type), at::TensorOptions(at::kFloat));
    std::vector<std::pair<std::string, at::Tensor>> a, b;
    model.for_each_base_parameter([&](const std::string& n, const at::Tensor& t) { a.emplace_back(n, t); });
    loaded->for_each_base_parameter([&](const std::string& n, const at::Tensor& t) { b.emplace_back(n, t); });
    ASSERT_EQ(a.size(), b.size()) << type;
    bool has_bias = false;
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_EQ(a[i].first, b[i].first);
      EXPECT_TRUE(at::equal(a[i].second, b[i].second)) << a[i].first;
      has_bias = has_bias || a[i].first.find("q_proj.bias") != std::string::npos;
    }
    EXPECT_EQ(has_bias, type == "qwen2");
  }
}

TEST(HfConfig, Llama3RopeScalingInBothLayouts) {
  const std::string scaling = R"({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192)";
  moe::ModelConfig old_style = ckpt::parse_hf_config(
      llama_json(R"("rope_theta": 500000.0, "rope_scaling": )" + scaling + "}"), "cfg.json");
  moe::ModelConfig new_style = ckpt::parse_hf_config(
      llama_json(R"("rope_parameters": )" + scaling + R"(, "rope_theta": 500000.0})"), "cfg.json");
  for (const moe::ModelConfig* c : {&old_style, &new_style}) {
    EXPECT_EQ(c->rope.type, "llama3");
    EXPECT_DOUBLE_EQ(c->rope.theta, 500000.0);
    EXPECT_DOUBLE_EQ(c->rope.factor, 8.0);
    EXPECT_EQ(c->rope.original_max_position_embeddings, 8192);
  }
}

// Llama 3.1 scaling, by hand at three frequencies of head_dim 128, theta 500000: the highest
// frequency (wavelength 2*pi < 8192/4) is unchanged, the lowest (wavelength > 8192) is divided by
// 8, and one in the band is the smooth interpolation s*f + (1-s)*f/8 with
// s = (8192/wavelength - 1) / (4 - 1).
TEST(Rope, Llama3ScalingByHand) {
  moe::RopeConfig rope;
  rope.type = "llama3";
  rope.theta = 500000.0;
  rope.factor = 8.0;
  moe::RopeConfig plain;
  plain.theta = 500000.0;
  at::Tensor scaled = moe::rope_inv_freq(rope, 128).to(at::kDouble);
  at::Tensor base = moe::rope_inv_freq(plain, 128).to(at::kDouble);
  ASSERT_EQ(scaled.size(0), 64);
  EXPECT_DOUBLE_EQ(scaled[0].item<double>(), 1.0);
  EXPECT_NEAR(scaled[63].item<double>(), base[63].item<double>() / 8.0, 1e-12);
  int in_band = 0;
  for (int i = 0; i < 64; ++i) {
    double f = base[i].item<double>();
    double wavelen = 2.0 * M_PI / f;
    if (wavelen < 8192.0 / 4.0 || wavelen > 8192.0) continue;
    double s = (8192.0 / wavelen - 1.0) / 3.0;
    EXPECT_NEAR(scaled[i].item<double>(), s * f + (1.0 - s) * f / 8.0, 1e-6 * f) << i;
    ++in_band;
  }
  EXPECT_GT(in_band, 0);
  // theta^(-2i/d) itself: i = 1 of head_dim 128.
  EXPECT_NEAR(base[1].item<double>(), std::pow(500000.0, -2.0 / 128.0), 1e-7);
}

TEST(HfConfig, Errors) {
  EXPECT_NE(error_of(llama_json("", "gpt2")).find("model_type 'gpt2' is not supported"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"model_type": "llama", "vocab_size": 32})")
                .find("cfg.json: required field 'hidden_size' is missing"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"vocab_size": 32})").find("'model_type' is missing"), std::string::npos);
  EXPECT_NE(error_of(llama_json(R"("num_key_value_heads": "two")")).find("'num_key_value_heads' must be an integer"),
            std::string::npos);
  EXPECT_NE(error_of(llama_json(R"("num_key_value_heads": 3)")).find("multiple of num_key_value_heads (3)"),
            std::string::npos);
  EXPECT_NE(error_of(llama_json(R"("rope_scaling": {"rope_type": "yarn", "factor": 4.0})"))
                .find("rope type 'yarn' is not supported"),
            std::string::npos);
  EXPECT_NE(error_of(llama_json(R"("rope_scaling": {"rope_type": "llama3", "factor": 8.0})"))
                .find("'low_freq_factor' is missing"),
            std::string::npos);
  EXPECT_NE(error_of(llama_json(R"("hidden_act": "gelu")")).find("hidden_act 'gelu'"),
            std::string::npos);
  EXPECT_NE(error_of("{not json").find("cfg.json: not valid JSON"), std::string::npos);
  EXPECT_NE(error_of("[1, 2]").find("expected a JSON object"), std::string::npos);
  try {
    ckpt::load_hf_config("/nonexistent/model");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model path '/nonexistent/model' does not exist"), std::string::npos);
  }
}

}  // namespace
}  // namespace mole
