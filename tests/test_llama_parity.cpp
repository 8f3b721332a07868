// Parity of the LLaMA decoder and PEFT LoRA against transformers/peft reference outputs
// (../shared/fixtures/hf-tiny-llama, float32): logits, loss, and LoRA gradients from our autograd.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <map>

#include "checkpoint/model_loader.h"
#include "checkpoint/peft_adapter.h"
#include "checkpoint/safetensors.h"
#include "kernels/check.h"
#include "tests/test_util.h"

namespace mole {
namespace {

using test::rel_error;

constexpr double kLogitsTol = 1e-4;  // fixtures/README.md: logits and losses
constexpr double kGradTol = 1e-3;    // fixtures/README.md: gradients

class TinyLlamaParity : public ::testing::Test {
 protected:
  void SetUp() override {
    reference_ = std::make_unique<st::SafetensorsFile>(test::tiny_llama_dir() + "/reference.safetensors");
    input_ids_ = reference_->tensor("input_ids");
    labels_ = reference_->tensor("labels");
  }
  std::unique_ptr<moe::CausalLM> load(at::ScalarType dtype = at::kFloat) {
    return ckpt::load_model(test::tiny_llama_dir() + "/base", at::TensorOptions().dtype(dtype));
  }
  std::unique_ptr<st::SafetensorsFile> reference_;
  at::Tensor input_ids_, labels_;
};

TEST_F(TinyLlamaParity, BaseLogitsAndLoss) {
  auto model = load();
  at::NoGradGuard no_grad;
  at::Tensor logits = model->forward(input_ids_);
  double logits_err = rel_error(logits, reference_->tensor("base_logits"));
  double loss_err = rel_error(moe::causal_lm_loss(logits, labels_).reshape({1}),
                              reference_->tensor("base_loss"));
  RecordProperty("logits_rel_error", test::sci(logits_err));
  RecordProperty("loss_rel_error", test::sci(loss_err));
  EXPECT_LT(logits_err, kLogitsTol);
  EXPECT_LT(loss_err, kLogitsTol);
}

TEST_F(TinyLlamaParity, PeftLoraLogitsLossAndGradients) {
  auto model = load();
  EXPECT_EQ(ckpt::load_peft_adapter(*model, test::tiny_llama_dir() + "/peft_lora"), 14);
  at::Tensor logits = model->forward(input_ids_);
  at::Tensor loss = moe::causal_lm_loss(logits, labels_);
  const double logits_err = rel_error(logits, reference_->tensor("peft_lora_logits"));
  const double loss_err = rel_error(loss.reshape({1}), reference_->tensor("peft_lora_loss"));
  RecordProperty("logits_rel_error", test::sci(logits_err));
  RecordProperty("loss_rel_error", test::sci(loss_err));
  EXPECT_LT(logits_err, kLogitsTol);
  EXPECT_LT(loss_err, kLogitsTol);

  loss.backward();
  std::map<std::string, at::Tensor> params;
  for (const auto& [name, tensor] : model->lora_parameters()) params[name] = tensor;
  const std::string prefix = "peft_lora_grad.";
  int checked = 0;
  double worst = 0.0;
  for (const std::string& key : reference_->names()) {
    if (key.rfind(prefix, 0) != 0) continue;
    const std::string name = key.substr(prefix.size());
    ASSERT_TRUE(params.count(name)) << "reference gradient for unknown parameter " << name;
    ASSERT_TRUE(params[name].grad().defined()) << name << " received no gradient";
    double err = rel_error(params[name].grad(), reference_->tensor(key));
    EXPECT_LT(err, kGradTol) << name;
    worst = std::max(worst, err);
    ++checked;
  }
  RecordProperty("worst_grad_rel_error", test::sci(worst));
  EXPECT_EQ(checked, 16);  // every gradient listed in fixtures/hf-tiny-llama/README.json
}

TEST_F(TinyLlamaParity, BaseWeightsAreFrozen) {
  auto model = load();
  ckpt::load_peft_adapter(*model, test::tiny_llama_dir() + "/peft_lora");
  int base = 0;
  model->for_each_base_parameter([&](const std::string& name, const at::Tensor& t) {
    EXPECT_FALSE(t.requires_grad()) << name;
    ++base;
  });
  EXPECT_EQ(base, 1 + 2 * (2 + 7) + 1 + 1);
  for (const auto& [name, t] : model->lora_parameters()) EXPECT_TRUE(t.requires_grad()) << name;
}

TEST_F(TinyLlamaParity, Bf16CloseToFloat32Reference) {
  auto model = load(at::kBFloat16);
  at::NoGradGuard no_grad;
  at::Tensor logits = model->forward(input_ids_);
  EXPECT_EQ(logits.scalar_type(), at::kBFloat16);
  // bf16 keeps 8 mantissa bits; two layers of tiny-llama stay within a few percent.
  EXPECT_LT(rel_error(logits, reference_->tensor("base_logits")), 3e-2);
}

TEST_F(TinyLlamaParity, OutOfRangeTokenIsAClearError) {
  auto model = load();
  at::Tensor ids = input_ids_.clone();
  ids[1][5] = 256;
  try {
    model->forward(ids);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("token id 256 at input_ids[1][5]"), std::string::npos)
        << e.what();
  }
  at::Tensor labels = labels_.clone();
  labels[0][7] = -5;
  EXPECT_THROW(moe::check_tokens(input_ids_, labels, 256), Error);
}

TEST_F(TinyLlamaParity, LossSumMatchesMeanTimesCount) {
  auto model = load();
  at::NoGradGuard no_grad;
  at::Tensor logits = model->forward(input_ids_);
  moe::LossSum sum = moe::causal_lm_loss_sum(logits, labels_);
  // Row 0 has its first 4 labels masked; the shift drops position 0 of both rows.
  EXPECT_EQ(sum.num_tokens, 2 * 15 - 3);
  EXPECT_NEAR((sum.sum / sum.num_tokens).item<double>(),
              reference_->tensor("base_loss").item<double>(), 1e-4);
}

}  // namespace
}  // namespace mole
