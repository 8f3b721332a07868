// Training config: defaults, the example file, every error naming its key, --set overrides, and
// the resolved YAML round trip. Optimizer and schedules against hand-computed values.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/check.h"
#include "launch/config.h"
#include "launch/schedule.h"
#include "parallel/adamw.h"
#include "tests/test_util.h"

namespace mole {
namespace {

using launch::Config;

std::string error_of(const std::string& yaml, const std::vector<std::string>& sets = {}) {
  try {
    launch::parse_config(yaml, "run.yaml", sets);
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

TEST(Config, DefaultsForEveryKey) {
  Config c = launch::parse_config("", "run.yaml");
  EXPECT_EQ(c.name, "demo");
  EXPECT_EQ(c.model.base, "synthetic:tiny");
  EXPECT_EQ(c.adapter.method, "lora");
  EXPECT_EQ(c.adapter.r, 16);
  EXPECT_DOUBLE_EQ(c.adapter.alpha, 32.0);
  EXPECT_EQ(c.adapter.target_modules.size(), 7u);
  EXPECT_EQ(c.data.train, "synthetic:multitask");
  EXPECT_EQ(c.train.micro_batch, 8);
  EXPECT_EQ(c.train.global_batch, 32);
  EXPECT_DOUBLE_EQ(c.train.lr, 2e-4);
  EXPECT_EQ(c.parallel.dispatch, "auto");
  EXPECT_EQ(c.log.dir, "runs/demo");
  EXPECT_EQ(c.log.every, 10);
}

TEST(Config, ExampleFileParses) {
  Config c = launch::load_config(std::string(MOLE_SOURCE_DIR) + "/examples/demo-mixlora.yaml");
  EXPECT_EQ(c.adapter.method, "mixlora");
  EXPECT_EQ(c.adapter.experts, 4);
  EXPECT_EQ(c.adapter.router.top_k, 2);
}

TEST(Config, ExpertsAsCountListOrPattern) {
  EXPECT_EQ(launch::parse_config("adapter: {experts: 6}", "r").adapter.experts, 6);
  EXPECT_EQ(launch::parse_config("adapter: {experts: [2, 4]}", "r").adapter.experts_list,
            (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(launch::parse_config("adapter: {experts: \"2,4,6,8\"}", "r").adapter.experts_pattern,
            "2,4,6,8");
  EXPECT_NE(error_of("adapter: {experts: [2, x]}").find("'adapter.experts' list must hold integers"),
            std::string::npos);
}

// model.base synthetic:<preset> and model.layers: unknown presets listed, too many layers, and
// layers on a Hugging Face folder refused by key.
TEST(Config, SyntheticPresetsAndLayers) {
  const launch::Config c = launch::parse_config("model: {base: 'synthetic:llama-3-70b', layers: 2}", "p");
  EXPECT_EQ(c.model.base, "synthetic:llama-3-70b");
  EXPECT_EQ(c.model.layers, 2);
  EXPECT_NE(error_of("model: {base: 'synthetic:llama-9'}").find(
                "'model.base' names an unknown preset 'llama-9' (known: synthetic:tiny, synthetic:tiny-llama3, synthetic:tinyllama, "
                "synthetic:llama-2-7b, synthetic:llama-3-8b, synthetic:llama-2-70b, synthetic:llama-3-70b, "
                "synthetic:mistral-7b, synthetic:qwen2-7b)"),
            std::string::npos)
      << error_of("model: {base: 'synthetic:llama-9'}");
  EXPECT_NE(error_of("model: {base: 'synthetic:qwen2-7b', layers: 29}")
                .find("'model.layers' is 29 but synthetic:qwen2-7b has 28 decoder layers"),
            std::string::npos);
  EXPECT_NE(error_of("model: {base: some/folder, layers: 2}")
                .find("'model.layers' applies to synthetic presets only"),
            std::string::npos);
  EXPECT_NE(error_of("model: {layers: -1}").find("'model.layers' must be 0 (all)"), std::string::npos);
}

TEST(Config, ErrorsNameTheKeyAndTheAllowedValues) {
  EXPECT_NE(error_of("adapter: {rank: 8}").find("unknown key 'adapter.rank'"), std::string::npos);
  EXPECT_NE(error_of("adapter: {rank: 8}").find("r, alpha"), std::string::npos);
  EXPECT_NE(error_of("trian: {steps: 1}").find("unknown key 'trian'"), std::string::npos);
  EXPECT_NE(error_of("adapter: {router: {topk: 1}}").find("unknown key 'adapter.router.topk'"),
            std::string::npos);
  EXPECT_NE(error_of("adapter: {method: moex}")
                .find("'adapter.method' is 'moex'; allowed: lora, mixlora, mola, dynmole, moelora"),
            std::string::npos);
  EXPECT_NE(error_of("train: {steps: many}").find("'train.steps' must be an integer, got 'many'"),
            std::string::npos);
  EXPECT_NE(error_of("train: {steps: 0}").find("'train.steps' must be positive"), std::string::npos);
  EXPECT_NE(error_of("adapter: {dropout: 1.5}").find("'adapter.dropout' must be in [0, 1)"),
            std::string::npos);
  EXPECT_NE(error_of("train: {schedule: step}").find("allowed: constant, linear, cosine"),
            std::string::npos);
  EXPECT_NE(error_of("train: {warmup: 500, steps: 100}").find("'train.warmup'"), std::string::npos);
  EXPECT_NE(error_of("model: [1, 2]").find("'model' must be a mapping"), std::string::npos);
  EXPECT_NE(error_of("a: [").find("run.yaml: not valid YAML"), std::string::npos);
  EXPECT_NE(error_of("adapter: {dora: true}").find("DoRA"), std::string::npos);
  // base_shard is a number of ranks (DESIGN.md §8), 0 for off.
  EXPECT_NE(error_of("parallel: {base_shard: -1}").find("'parallel.base_shard' must be 0 (off)"),
            std::string::npos);
  EXPECT_EQ(launch::parse_config("parallel: {base_shard: 8}", "run.yaml").parallel.base_shard, 8);
  EXPECT_NE(error_of("parallel: {zero: 3}").find("'parallel.zero' must be 0, 1 or 2"),
            std::string::npos);
  EXPECT_NE(error_of("parallel: {zero_bucket_mib: 0}").find("'parallel.zero_bucket_mib' must be in (0, 65536]"),
            std::string::npos);
  EXPECT_EQ(launch::parse_config("parallel: {zero_bucket_mib: 0.5}", "run.yaml").parallel.zero_bucket_mib, 0.5);
  EXPECT_NE(error_of("parallel: {dispatch: experts}").find("auto, tokens, weights"),
            std::string::npos);
  EXPECT_NE(error_of("adapter: {router_init_range: -0.1}").find("'adapter.router_init_range' must be at least 0"),
            std::string::npos);
}

TEST(Config, SetOverridesApplyBeforeValidation) {
  Config c = launch::parse_config("train: {steps: 10}", "r",
                                  {"train.steps=5", "adapter.router.top_k=1", "name=x",
                                   "adapter.target_modules=[q_proj, v_proj]"});
  EXPECT_EQ(c.train.steps, 5);
  EXPECT_EQ(c.adapter.router.top_k, 1);
  EXPECT_EQ(c.log.dir, "runs/x");
  EXPECT_EQ(c.adapter.target_modules, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_NE(error_of("", {"train.stepz=5"}).find("unknown key 'train.stepz'"), std::string::npos);
  EXPECT_NE(error_of("", {"train.steps"}).find("expected key=value"), std::string::npos);
  EXPECT_NE(error_of("", {"train.steps=-1"}).find("'train.steps' must be positive"), std::string::npos);
}

// Values that used to pass validation and then poisoned a run: non-finite numbers anywhere, a
// learning rate out of range, a key given twice, checkpoint keys that nothing implements yet.
TEST(Config, RefusesValuesThatWouldPoisonARun) {
  for (const char* lr : {".inf", "-.inf", ".nan", "1e30", "0", "-1e-4"}) {
    const std::string e = error_of(std::string("train: {lr: ") + lr + "}");
    EXPECT_NE(e.find("run.yaml: 'train.lr' must be"), std::string::npos) << lr << ": " << e;
  }
  EXPECT_EQ(launch::parse_config("train: {lr: 1}", "run.yaml").train.lr, 1.0);
  EXPECT_NE(error_of("train: {clip: .inf}").find("'train.clip' must be a finite number"),
            std::string::npos);
  EXPECT_NE(error_of("adapter: {alpha: .nan}").find("'adapter.alpha' must be a finite number"),
            std::string::npos);
  EXPECT_NE(error_of("train: {steps: 5, lr: 0.001, steps: 7}")
                .find("run.yaml: key 'train.steps' appears twice"),
            std::string::npos);
  EXPECT_NE(error_of("name: a\nname: b\n").find("key 'name' appears twice"), std::string::npos);
  EXPECT_NE(error_of("checkpoint: {resume: ''}")
                .find("'checkpoint.resume' must be auto, never or the path of a checkpoint folder"),
            std::string::npos);
  // A path is checked when the run starts (the folder may be made after the config is written).
  EXPECT_EQ(launch::parse_config("checkpoint: {resume: /ckpt/step-000010, dir: ckpt}", "run.yaml").checkpoint.dir,
            "ckpt");
  EXPECT_EQ(launch::parse_config("checkpoint: {resume: never}", "run.yaml").checkpoint.resume,
            "never");
}

// An error about a key set with --set names the option, not the file.
TEST(Config, SetErrorsNameTheOption) {
  EXPECT_NE(error_of("train: {lr: 0.001}", {"train.lr=.inf"})
                .find("--set 'train.lr=.inf': 'train.lr' must be a finite number"),
            std::string::npos);
  EXPECT_NE(error_of("", {"adapter.method=moex"}).find("--set 'adapter.method=moex': 'adapter.method'"),
            std::string::npos);
  EXPECT_NE(error_of("", {"train.steps=x"}).find("--set 'train.steps=x': 'train.steps' must be an integer"),
            std::string::npos);
  // A key from the file keeps naming the file.
  EXPECT_NE(error_of("train: {steps: 0}", {"train.lr=0.001"}).find("run.yaml: 'train.steps'"),
            std::string::npos);
}

// Expert counts and router bounds are checked where they are written, with the full key path.
TEST(Config, ExpertAndRouterErrorsGiveTheKeyPath) {
  EXPECT_NE(error_of("adapter: {method: mixlora}", {"adapter.experts=0"})
                .find("--set 'adapter.experts=0': 'adapter.experts': expert count must be at least 1, got 0"),
            std::string::npos);
  EXPECT_NE(error_of("adapter: {method: mola, experts: [2, 0, 4]}")
                .find("run.yaml: 'adapter.experts': per-layer expert list: expert count 0 at position 1 "
                      "must be at least 1"),
            std::string::npos);
  EXPECT_NE(error_of("adapter: {method: mola, experts: \"2,-1\"}").find("'adapter.experts': expert pattern '2,-1': expert count -1"),
            std::string::npos);
  EXPECT_NE(error_of("adapter: {method: mixlora, experts: 4}", {"adapter.router.top_k=9"})
                .find("--set 'adapter.router.top_k=9': 'adapter.router.top_k' is 9 but "
                      "adapter.experts is 4"),
            std::string::npos);
  EXPECT_NE(error_of("adapter: {method: mola, experts: [4, 2], router: {top_k: 3}}")
                .find("run.yaml: 'adapter.router.top_k' is 3 but the smallest layer of "
                      "adapter.experts has 2"),
            std::string::npos);
  EXPECT_NE(error_of("adapter: {method: mixlora, router: {top_k: 0}}")
                .find("run.yaml: 'adapter.router.top_k' must be at least 1, got 0"),
            std::string::npos);
  EXPECT_NE(error_of("adapter: {method: dynmole, experts: 2, router: {keep_top_k: 3}}")
                .find("'adapter.router.keep_top_k' is 3 but adapter.experts is 2"),
            std::string::npos);
  EXPECT_NE(error_of("adapter: {method: mixlora, router: {top_p: 1.5}}").find("'adapter.router.top_p' must be in (0, 1]"),
            std::string::npos);
  // A bound the routing rule does not read is not checked: dense routing over one expert.
  EXPECT_EQ(error_of("adapter: {method: mola, experts: 1, router: {strategy: dense}}"), "<no error>");
  EXPECT_EQ(error_of("adapter: {method: lora, experts: 1}"), "<no error>");
}

TEST(Config, ResolvedYamlRoundTrips) {
  Config c = launch::parse_config(
      "name: t\nadapter: {method: mola, experts: \"2,4\", router: {top_k: 1}}\ntrain: {lr: 1.0e-3}",
      "r");
  const std::string yaml = launch::to_yaml(c);
  Config again = launch::parse_config(yaml, "resolved.yaml");
  EXPECT_EQ(launch::to_yaml(again), yaml);
  EXPECT_EQ(again.adapter.experts_pattern, "2,4");
  EXPECT_DOUBLE_EQ(again.train.lr, 1e-3);
}

TEST(Optimizer, AdamWMatchesHandComputedSteps) {
  at::Tensor a = at::tensor({1.0f, -2.0f}).requires_grad_(true);
  at::Tensor b = at::tensor({0.5f}).requires_grad_(true);
  // Weight decay 0.1 on both, the LoRA+ lr multiplier 4 on B (as the parameter registry sets).
  parallel::AdamW adam({{"x.lora_A.weight", a, 1.0, 0.1}, {"x.lora_B.weight", b, 4.0, 0.1}},
                       parallel::AdamWOptions{});
  // Hand-run the same two steps in double.
  double pa[2] = {1.0, -2.0}, pb = 0.5, ma[2] = {0, 0}, va[2] = {0, 0}, mb = 0, vb = 0;
  const double ga[2][2] = {{0.1, -0.2}, {0.3, 0.05}}, gb[2] = {-1.0, 2.0}, lr = 0.01;
  for (int t = 1; t <= 2; ++t) {
    a.mutable_grad() = at::tensor({static_cast<float>(ga[t - 1][0]), static_cast<float>(ga[t - 1][1])});
    b.mutable_grad() = at::tensor({static_cast<float>(gb[t - 1])});
    adam.step(lr);
    const double c1 = 1 - std::pow(0.9, t), c2 = 1 - std::pow(0.999, t);
    for (int i = 0; i < 2; ++i) {
      pa[i] *= 1 - lr * 0.1;
      ma[i] = 0.9 * ma[i] + 0.1 * ga[t - 1][i];
      va[i] = 0.999 * va[i] + 0.001 * ga[t - 1][i] * ga[t - 1][i];
      pa[i] -= lr * (ma[i] / c1) / (std::sqrt(va[i] / c2) + 1e-8);
    }
    const double lrb = lr * 4.0;
    pb *= 1 - lrb * 0.1;
    mb = 0.9 * mb + 0.1 * gb[t - 1];
    vb = 0.999 * vb + 0.001 * gb[t - 1] * gb[t - 1];
    pb -= lrb * (mb / c1) / (std::sqrt(vb / c2) + 1e-8);
  }
  EXPECT_NEAR(a[0].item<double>(), pa[0], 1e-6);
  EXPECT_NEAR(a[1].item<double>(), pa[1], 1e-6);
  EXPECT_NEAR(b[0].item<double>(), pb, 1e-6);
  EXPECT_EQ(adam.steps_taken(), 2);
}

TEST(Optimizer, SchedulesByHand) {
  using launch::learning_rate;
  EXPECT_DOUBLE_EQ(learning_rate("constant", 1.0, 0, 4, 10), 0.25);
  EXPECT_DOUBLE_EQ(learning_rate("constant", 1.0, 3, 4, 10), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate("constant", 1.0, 9, 4, 10), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate("linear", 1.0, 4, 4, 10), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate("linear", 1.0, 7, 4, 10), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate("linear", 2.0, 0, 0, 4), 2.0);
  EXPECT_DOUBLE_EQ(learning_rate("linear", 2.0, 3, 0, 4), 0.5);
  EXPECT_NEAR(learning_rate("cosine", 1.0, 7, 4, 10), 0.5, 1e-12);  // progress 1/2
  EXPECT_NEAR(learning_rate("cosine", 1.0, 5, 4, 10), 0.5 * (1 + std::cos(M_PI / 6)), 1e-12);
  EXPECT_THROW(learning_rate("step", 1.0, 5, 0, 10), Error);
}

TEST(Optimizer, GlobalNormAndClipping) {
  at::Tensor a = at::zeros({2}).requires_grad_(true), b = at::zeros({1}).requires_grad_(true);
  a.mutable_grad() = at::tensor({3.0f, 0.0f});
  b.mutable_grad() = at::tensor({4.0f});
  std::vector<at::Tensor> params = {a, b};
  const double norm = parallel::global_grad_norm(params);
  EXPECT_DOUBLE_EQ(norm, 5.0);
  parallel::clip_grad_norm(params, 1.0, norm);
  EXPECT_NEAR(parallel::global_grad_norm(params), 1.0, 1e-6);
  EXPECT_NEAR(b.grad()[0].item<double>(), 0.8, 1e-6);
  parallel::clip_grad_norm(params, 10.0, 1.0);  // below the limit: unchanged
  EXPECT_NEAR(b.grad()[0].item<double>(), 0.8, 1e-6);
  b.mutable_grad() = at::tensor({std::nanf("")});
  EXPECT_FALSE(std::isfinite(parallel::global_grad_norm(params)));
}

}  // namespace
}  // namespace mole
