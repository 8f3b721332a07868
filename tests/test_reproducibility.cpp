// Every random draw of a run comes from generators seeded by train.seed (and the rank) whose
// states the trainer reports: LoRA dropout and router jitter give the same losses for the same
// seed and others for another seed; a run restored from TrainerState continues bit for bit as the
// uninterrupted one; decoder layers re-run through a LayerRunner (as activation checkpointing
// does) record their MoE sites once and give the same result; activation checkpointing gives the
// same losses and gradients as keeping the activations, for every method and its auxiliary losses.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/check.h"
#include "launch/trainer.h"
#include "moe/random.h"
#include "tests/test_util.h"

namespace mole {
namespace {

// A short MixLoRA run of the synthetic model with LoRA dropout 0.05 (the config default) and
// router jitter on, so that every step draws.
launch::Config noisy_config(const std::string& dir, const std::vector<std::string>& sets = {}) {
  std::vector<std::string> all = {"adapter.dropout=0.05", "adapter.router.jitter_noise=0.1"};
  all.insert(all.end(), sets.begin(), sets.end());
  return launch::parse_config(
      "name: t\n"
      "adapter: {method: mixlora, r: 4, alpha: 8, experts: 4}\n"
      "data: {seq_len: 40, synthetic_examples: 64}\n"
      "train: {steps: 4, micro_batch: 2, global_batch: 4, lr: 1.0e-2, seed: 7}\n"
      "log: {every: 1, dir: " + dir + "}\n",
      "test.yaml", all);
}

std::vector<double> losses(launch::Trainer& t, int steps) {
  std::vector<double> out;
  for (int i = 0; i < steps; ++i) out.push_back(t.step().loss);
  return out;
}

TEST(Reproducibility, DropoutAndJitterFollowTheSeed) {
  test::TempDir dir;
  launch::Trainer a(noisy_config(dir.file("a"))), b(noisy_config(dir.file("b")));
  const std::vector<double> la = losses(a, 3), lb = losses(b, 3);
  EXPECT_EQ(la, lb) << "same train.seed, same losses (bit for bit)";
  // Another seed: another init, data order and draws, so other losses.
  launch::Trainer c(noisy_config(dir.file("c"), {"train.seed=8"}));
  const std::vector<double> lc = losses(c, 3);
  EXPECT_NE(lc, la);
  // The draws are real: the same seed without dropout and jitter trains otherwise (same init,
  // same data; only the draws differ; at step 1 every LoRA B is zero, so the LM loss of step 1
  // may agree, the gradients do not).
  launch::Trainer quiet(noisy_config(dir.file("d"), {"adapter.dropout=0", "adapter.router.jitter_noise=0"}));
  EXPECT_NE(losses(quiet, 3), la);
}

TEST(Reproducibility, RestoredStateContinuesBitForBit) {
  test::TempDir dir;
  launch::Trainer whole(noisy_config(dir.file("whole")));
  const std::vector<double> expected = losses(whole, 4);

  launch::Trainer first(noisy_config(dir.file("first")));
  losses(first, 2);
  const launch::TrainerState saved = first.state();
  // A fresh run (its own init, loader, optimizer and generator) restored from the state.
  launch::Trainer resumed(noisy_config(dir.file("resumed")));
  resumed.load_state(saved);
  const std::vector<double> rest = losses(resumed, 2);
  EXPECT_EQ(rest[0], expected[2]);
  EXPECT_EQ(rest[1], expected[3]);
  // And the weights agree exactly afterwards.
  const auto pw = whole.model().trainable_parameters(), pr = resumed.model().trainable_parameters();
  ASSERT_EQ(pw.size(), pr.size());
  for (size_t i = 0; i < pw.size(); ++i) EXPECT_TRUE(at::equal(pw[i].second, pr[i].second)) << pw[i].first;
}

TEST(Reproducibility, StateOfAnotherRunIsRefused) {
  test::TempDir dir;
  launch::Trainer mixlora(noisy_config(dir.file("a")));
  launch::Trainer lora(noisy_config(dir.file("b"), {"adapter.method=lora"}));
  EXPECT_THROW(lora.load_state(mixlora.state()), Error);
}

// Runs every layer body twice, as activation checkpointing does (the first result is dropped,
// the generator's state restored before the second run).
class RunTwice final : public moe::LayerRunner {
 public:
  explicit RunTwice(at::Generator gen) : gen_(std::move(gen)) {}
  at::Tensor run(int64_t, const at::Tensor& h_BSD, const moe::LayerBody& body) const override {
    const at::Tensor state = gen_.get_state();
    {
      at::NoGradGuard no_grad;
      body(h_BSD);
    }
    gen_.set_state(state);
    ++calls;
    return body(h_BSD);
  }
  mutable int calls = 0;

 private:
  mutable at::Generator gen_;
};

TEST(Reproducibility, ReRunLayersRecordTheirSitesOnce) {
  test::TempDir dir;
  launch::Trainer t(noisy_config(dir.file("a")));
  moe::CausalLM& model = t.model();
  at::Tensor ids = at::randint(3, 200, {2, 10}, at::kLong);
  moe::ForwardContext plain;
  plain.training = true;
  plain.generator = moe::make_generator(123, at::kCPU);
  const at::Tensor ref = model.forward(ids, plain);

  moe::ForwardContext twice;
  twice.training = true;
  twice.generator = moe::make_generator(123, at::kCPU);
  RunTwice runner(*twice.generator);  // the same generator (a shared handle)
  twice.layer_runner = &runner;
  const at::Tensor got = model.forward(ids, twice);
  EXPECT_EQ(runner.calls, model.num_layers());
  EXPECT_TRUE(at::equal(got, ref));
  EXPECT_EQ(plain.sites.size(), static_cast<size_t>(model.num_layers()));  // one FFN site a layer
  ASSERT_EQ(twice.sites.size(), plain.sites.size());
  for (size_t i = 0; i < plain.sites.size(); ++i) {
    EXPECT_EQ(twice.sites[i].site, plain.sites[i].site);
    EXPECT_TRUE(at::equal(twice.sites[i].stats.pairs_E, plain.sites[i].stats.pairs_E));
  }
}

}  // namespace
}  // namespace mole

namespace mole {
namespace {

// Activation checkpointing recomputes each layer in backward from its input and the generator
// state it started with: with dropout and jitter on, the losses and every gradient (LoRA,
// routers, experts, through the auxiliary losses) agree with the run that keeps its activations,
// to 1e-6 relative to the tensor's largest gradient (observed: equal).
TEST(Reproducibility, ActivationCheckpointingGivesTheSameLossesAndGradients) {
  const std::vector<std::vector<std::string>> methods = {
      {"adapter.method=mixlora"},
      {"adapter.method=mola", "adapter.experts=2,2,4,4"},
      {"adapter.method=dynmole"},
      {"adapter.method=moelora", "adapter.contrastive_coef=0.1"},
  };
  for (const std::vector<std::string>& method : methods) {
    test::TempDir dir;
    std::vector<std::string> with = method;
    with.push_back("train.activation_checkpointing=true");
    launch::Trainer plain(noisy_config(dir.file("plain"), method)), ckpt(noisy_config(dir.file("ckpt"), with));
    for (int step = 0; step < 3; ++step) {
      const launch::StepResult a = plain.accumulate_gradients(), b = ckpt.accumulate_gradients();
      EXPECT_NEAR(b.loss, a.loss, 1e-6 * std::abs(a.loss)) << method[0] << " step " << step;
      EXPECT_NEAR(b.aux_loss, a.aux_loss, 1e-6 * std::abs(a.aux_loss) + 1e-12) << method[0] << " step " << step;
      const auto pa = plain.model().trainable_parameters(), pb = ckpt.model().trainable_parameters();
      ASSERT_EQ(pa.size(), pb.size());
      for (size_t i = 0; i < pa.size(); ++i) {
        const at::Tensor ga = pa[i].second.grad(), gb = pb[i].second.grad();
        ASSERT_TRUE(ga.defined() && gb.defined()) << method[0] << " " << pa[i].first;
        const double scale = ga.abs().max().item<double>();
        EXPECT_LE((ga - gb).abs().max().item<double>(), 1e-6 * scale + 1e-30)
            << method[0] << " step " << step << " " << pa[i].first;
      }
      plain.apply_update(const_cast<launch::StepResult&>(a));
      ckpt.apply_update(const_cast<launch::StepResult&>(b));
    }
  }
}

}  // namespace
}  // namespace mole
