// `mole bench train` (see bench_command.h): whole training steps of a random-initialised model at
// a real shape, with the adapter `mole train` would build for the same keys.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include "kernels/check.h"
#include "launch/bench_command.h"
#include "launch/memory_stats.h"
#include "launch/run_parts.h"
#include "moe/aux_losses.h"
#include "moe/model_presets.h"
#include "moe/random.h"

namespace mole::launch {
namespace {

using Clock = std::chrono::steady_clock;

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// The adapter keys of `mole train` for this benchmark's options; every other key keeps its
// default (alpha 2r, dropout 0.05, all seven projections targeted, the method's router and
// auxiliary losses).
Config bench_run_config(const BenchOptions& o) {
  Config c;
  c.model.device = o.device;
  c.model.dtype = o.dtype;
  c.adapter.method = o.method;
  c.adapter.r = o.rank;
  c.adapter.alpha = 2.0 * static_cast<double>(o.rank);
  c.adapter.experts = o.experts;
  c.adapter.router.top_k = o.top_k;
  c.train.seed = o.seed;
  return c;
}

void synchronize(const at::Device& device) {
  // The host waits for the device, so that wall time covers the queued work.
  if (device.is_cuda()) at::empty({1}, at::TensorOptions(device)).cpu();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

double bench_train_model_flops_per_token(const moe::ModelConfig& m, int64_t seq) {
  // Frozen base: forward 2P, backward 2P (input gradients only, no weight gradients); the adapters
  // are not counted. Attention scores and values: 4 S d per layer forward, twice that backward
  // (PaLM's convention: the causal half is not subtracted).
  const double p = static_cast<double>(moe::matmul_parameters(m));
  const double attention = 12.0 * static_cast<double>(m.num_layers) * static_cast<double>(seq) *
                           static_cast<double>(m.num_heads * m.head_dim);
  return 4.0 * p + attention;
}

void bench_train(const BenchOptions& o) {
  MOLE_CHECK(o.batch > 0 && o.seq > 1, "bench train: need --batch > 0 and --seq > 1, got ",
             o.batch, " and ", o.seq);
  moe::ModelConfig shape = moe::model_preset(o.shape);
  MOLE_CHECK(o.layers >= 0, "bench train: --layers must be >= 0 (0: all), got ", o.layers);
  if (o.layers > 0) shape.num_layers = std::min(shape.num_layers, o.layers);
  MOLE_CHECK(o.seq <= shape.max_position_embeddings, "bench train: --seq ", o.seq,
             " exceeds the ", o.shape, " context of ", shape.max_position_embeddings);
  Config config = bench_run_config(o);
  const at::TensorOptions options = model_options(config);
  const at::Device device = options.device();

  // The base is drawn on its device: a 7B model is filled on the GPU without a host copy.
  const auto build_start = Clock::now();
  moe::CausalLM model(shape, options);
  model.init_base_random(o.seed, device);
  at::Generator init_gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  const moe::AdapterSpec spec = adapter_spec(config, model.num_layers());
  moe::attach_adapter(model, spec, init_gen);
  parallel::ParameterRegistry registry(model, parallel::OptimizerHints{1.0, 0.0});
  std::unique_ptr<parallel::Optimizer> optimizer =
      parallel::make_optimizer(registry, nullptr, parallel::AdamWOptions{});
  at::Generator forward_gen = moe::make_generator(forward_seed(o.seed, 0), device);
  synchronize(device);
  const double build_s = std::chrono::duration<double>(Clock::now() - build_start).count();
  reset_peak_cuda_allocated_bytes(device);

  std::vector<double> step_ms;
  double first_loss = 0.0, last_loss = 0.0;
  for (int64_t i = 0; i < o.warmup + o.iters; ++i) {
    // Host ids, as training batches come: the model and the loss move them over.
    at::Tensor ids = at::randint(0, shape.vocab_size, {o.batch, o.seq}, init_gen, at::kLong);
    synchronize(device);
    const auto start = Clock::now();
    // The step of launch/train_step.cpp for one micro-batch: forward, loss with the auxiliary
    // losses, backward, gradient norm, clipping at 1, AdamW update.
    moe::ForwardContext ctx;
    ctx.training = true;
    ctx.generator = forward_gen;
    at::Tensor logits = model.forward(ids, ctx);
    at::Tensor loss = moe::causal_lm_loss(logits, ids) + moe::aux_losses(ctx, spec.aux).total;
    loss.backward();
    const double norm = optimizer->grad_norm();  // a device -> host sync, as in training
    optimizer->clip(1.0, norm);
    optimizer->step(1e-4);
    optimizer->zero_grad();
    synchronize(device);
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    const double value = loss.item<double>();
    MOLE_CHECK(std::isfinite(value), "bench train: step ", i + 1, " has a non-finite loss");
    if (i == 0) first_loss = value;
    last_loss = value;
    if (i >= o.warmup) step_ms.push_back(ms);
  }

  const int64_t tokens = o.batch * o.seq;
  const double med = median(step_ms);
  const double tps = 1000.0 * static_cast<double>(tokens) / med;
  const int64_t gpu_bytes = peak_cuda_allocated_bytes(device);
  const double peak_gib = gpu_bytes >= 0 ? static_cast<double>(gpu_bytes) / kGiB
                                         : peak_host_mib() / 1024.0;
  const double flops = bench_train_model_flops_per_token(shape, o.seq) * tps;
  const double peak_tflops = o.peak_tflops > 0 ? o.peak_tflops : (device.is_cuda() ? 989.0 : 0.0);
  const double mfu = peak_tflops > 0 ? flops / (peak_tflops * 1e12) : 0.0;

  nlohmann::json json = {
      {"bench", "train"}, {"shape", o.shape}, {"method", o.method}, {"layers", shape.num_layers},
      {"batch", o.batch}, {"seq", o.seq}, {"experts", spec.is_moe() ? o.experts : 0},
      {"top_k", spec.is_moe() ? o.top_k : 0}, {"r", o.rank}, {"device", o.device},
      {"dtype", o.dtype}, {"threads", at::get_num_threads()}, {"warmup", o.warmup},
      {"steps", o.iters}, {"step_ms_median", med},
      {"step_ms_min", *std::min_element(step_ms.begin(), step_ms.end())},
      {"tokens_per_s", tps}, {"peak_gib", peak_gib},
      {"peak_kind", gpu_bytes >= 0 ? "cuda_allocated" : "host_rss"},
      {"model_tflops", flops / 1e12}, {"peak_tflops", peak_tflops}, {"mfu", mfu},
      {"trainable_params", registry.global_numel()}, {"build_s", build_s},
      {"loss_first", first_loss}, {"loss_last", last_loss}};
  if (o.json) {
    std::printf("%s\n", json.dump().c_str());
    return;
  }
  std::printf("mole bench train: %s x %lld layers, %s, batch %lld x seq %lld, %s %s\n",
              o.shape.c_str(), static_cast<long long>(shape.num_layers), o.method.c_str(),
              static_cast<long long>(o.batch), static_cast<long long>(o.seq), o.device.c_str(),
              o.dtype.c_str());
  std::printf("%-10s %11s %11s %12s %10s %8s %14s\n", "method", "step ms", "min ms", "tokens/s",
              "peak GiB", "MFU", "trainable");
  std::printf("%-10s %11.1f %11.1f %12.0f %10.2f %7.1f%% %14lld\n", o.method.c_str(), med,
              json["step_ms_min"].get<double>(), tps, peak_gib, 100.0 * mfu,
              static_cast<long long>(registry.global_numel()));
  std::printf("%s\n", json.dump().c_str());
}

}  // namespace mole::launch
