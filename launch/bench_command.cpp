// `mole bench` (see bench_command.h).
#include "launch/bench_command.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "kernels/check.h"
#include "moe/adapter.h"
#include "moe/llama.h"

namespace mole::launch {
namespace {

struct Variant {
  std::string name;
  moe::Method method;
};

struct Timing {
  std::string name;
  double median_ms = 0.0;
  double min_ms = 0.0;
  int64_t trainable = 0;
};

moe::ModelConfig bench_config(const BenchOptions& o) {
  moe::ModelConfig c;
  c.vocab_size = 32;  // tiny vocabulary: the decoder layer dominates the step
  c.hidden_size = o.hidden;
  c.intermediate_size = o.intermediate;
  c.num_layers = 1;
  c.num_heads = o.heads;
  c.num_kv_heads = o.kv_heads;
  c.head_dim = o.hidden / o.heads;
  c.rms_norm_eps = 1e-5;
  return c;
}

void synchronize(const at::Device& device) {
  // Host waits for the device so that wall time covers the queued work.
  if (device.is_cuda()) at::empty({1}, at::TensorOptions(device)).cpu();
}

Timing time_variant(const BenchOptions& o, const Variant& v) {
  const at::Device device(o.device == "cuda" ? at::kCUDA : at::kCPU);
  at::TensorOptions opts = at::TensorOptions(o.dtype == "bf16" ? at::kBFloat16 : at::kFloat).device(device);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(0);
  moe::CausalLM model(bench_config(o), opts);
  model.init_base_random(0);
  moe::AdapterSpec spec;
  spec.method = v.method;
  spec.lora = spec.expert_lora = {o.rank, 2.0 * o.rank, false, 0.0};
  spec.experts_per_layer = {o.experts};
  spec.router.top_k = o.top_k;
  moe::attach_adapter(model, spec, gen);
  Timing t;
  t.name = v.name;
  for (const auto& [name, p] : model.trainable_parameters()) t.trainable += p.numel();

  at::Tensor ids = at::randint(0, 32, {1, o.tokens}, gen, at::kLong);
  std::vector<double> ms;
  for (int64_t i = 0; i < o.warmup + o.iters; ++i) {
    synchronize(device);
    auto start = std::chrono::steady_clock::now();
    moe::ForwardContext ctx;
    ctx.training = true;
    at::Tensor logits = model.forward(ids, ctx);
    at::Tensor loss = moe::causal_lm_loss(logits, ids) + moe::aux_losses(ctx, spec.aux).total;
    loss.backward();
    synchronize(device);
    const double elapsed = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (i >= o.warmup) ms.push_back(elapsed);
    for (auto& [name, p] : model.trainable_parameters()) p.mutable_grad() = at::Tensor();
  }
  std::sort(ms.begin(), ms.end());
  t.median_ms = ms[ms.size() / 2];
  t.min_ms = ms.front();
  return t;
}

void bench_moe(const BenchOptions& o) {
  const std::vector<Variant> variants = {
      {"lora", moe::Method::kLora},
      {"mixlora", moe::Method::kMixLora},
      {"mola", moe::Method::kMola},
  };
  std::printf("mole bench moe: one decoder layer, forward + backward, T=%lld D=%lld F=%lld E=%lld K=%lld r=%lld, %s %s, %d threads\n",
              static_cast<long long>(o.tokens), static_cast<long long>(o.hidden),
              static_cast<long long>(o.intermediate), static_cast<long long>(o.experts),
              static_cast<long long>(o.top_k), static_cast<long long>(o.rank), o.device.c_str(),
              o.dtype.c_str(), at::get_num_threads());
  std::printf("%-10s %12s %12s %14s %12s %10s\n", "variant", "median ms", "min ms", "tokens/s",
              "trainable", "vs lora");
  nlohmann::json json = {{"bench", "moe"}, {"tokens", o.tokens}, {"hidden", o.hidden},
                         {"intermediate", o.intermediate}, {"experts", o.experts},
                         {"top_k", o.top_k}, {"rank", o.rank}, {"device", o.device},
                         {"dtype", o.dtype}, {"threads", at::get_num_threads()}};
  double lora_ms = 0.0;
  for (const Variant& v : variants) {
    Timing t = time_variant(o, v);
    if (v.name == "lora") lora_ms = t.median_ms;
    const double ratio = lora_ms > 0 ? t.median_ms / lora_ms : 0.0;
    std::printf("%-10s %12.2f %12.2f %14.0f %12lld %9.2fx\n", t.name.c_str(), t.median_ms, t.min_ms,
                1000.0 * static_cast<double>(o.tokens) / t.median_ms,
                static_cast<long long>(t.trainable), ratio);
    json["results"].push_back({{"variant", t.name}, {"median_ms", t.median_ms}, {"min_ms", t.min_ms},
                               {"trainable_params", t.trainable}, {"ratio_vs_lora", ratio}});
  }
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  json["peak_rss_mib"] = static_cast<double>(usage.ru_maxrss) / 1024.0;
  std::printf("peak RSS %.0f MiB\n%s\n", static_cast<double>(usage.ru_maxrss) / 1024.0, json.dump().c_str());
}

}  // namespace

void add_bench_command(CLI::App& app, BenchOptions& o) {
  CLI::App* cmd = app.add_subcommand("bench", "Benchmarks; prints a table and a JSON line");
  cmd->add_option("what", o.what, "moe (MoE-LoRA layer vs LoRA), dispatch (expert parallelism, under mpirun), train (whole training steps at a model shape), kernels (MoE primitives against the copy bandwidth) optimizer (reduction and update of an adapter's state for ZeRO 0/1/2, under mpirun) or checkpoint (save and load of the same state, ZeRO 0 and 2)")->required()->check(CLI::IsMember({"moe", "dispatch", "train", "kernels", "optimizer", "checkpoint"}));
  cmd->add_option("--tokens", o.tokens, "tokens per step");
  cmd->add_option("--hidden", o.hidden, "hidden size D");
  cmd->add_option("--intermediate", o.intermediate, "FFN size F");
  cmd->add_option("--heads", o.heads, "attention heads");
  cmd->add_option("--kv-heads", o.kv_heads, "key/value heads");
  cmd->add_option("--experts", o.experts, "experts E");
  cmd->add_option("--top-k", o.top_k, "experts per token K");
  cmd->add_option("--rank,--r", o.rank, "LoRA rank r");
  cmd->add_option("--iters", o.iters, "timed iterations");
  cmd->add_option("--warmup", o.warmup, "untimed iterations first");
  cmd->add_option("--device", o.device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--dtype", o.dtype, "fp32 or bf16 (default: bf16 on cuda, fp32 on cpu)")->check(CLI::IsMember({"fp32", "bf16"}));
  cmd->add_option("--shape", o.shape, "train, optimizer: tiny, tinyllama, llama-2-7b or llama-3-8b");
  cmd->add_option("--method", o.method, "train: lora, mixlora, mola, dynmole or moelora; optimizer: lora or mixlora");
  cmd->add_option("--batch", o.batch, "train: sequences per step");
  cmd->add_option("--seq", o.seq, "train: tokens per sequence");
  cmd->add_option("--layers", o.layers, "train, optimizer: keep the first N decoder layers (0: all)");
  cmd->add_option("--seed", o.seed, "train, kernels: seed of the weights, the tokens and the forward draws");
  cmd->add_option("--peak-tflops", o.peak_tflops, "train: the device's dense peak for MFU (default 989 on cuda)");
  cmd->add_flag("--json", o.json, "train, kernels: print only the JSON line");
  cmd->add_option("--site", o.site, "dispatch: linear or ffn")->check(CLI::IsMember({"linear", "ffn"}));
  cmd->add_option("--backend", o.backend, "dispatch, optimizer: auto, mpi, gloo or nccl");
  cmd->add_option("--zero-bucket-mib", o.zero_bucket_mib, "optimizer: ZeRO's bucket size (parallel.zero_bucket_mib)")
      ->check(CLI::Range(1e-3, 65536.0));
}

void run_bench(const BenchOptions& options) {
  BenchOptions o = options;
  MOLE_CHECK(o.iters > 0 && o.warmup >= 0 && o.tokens > 1, "bench: need --iters > 0, --warmup >= 0, --tokens > 1");
  MOLE_CHECK(o.device != "cuda" || at::hasCUDA(), "bench: --device cuda but no CUDA device is usable");
  if (o.dtype.empty()) o.dtype = o.device == "cuda" && o.what != "moe" ? "bf16" : "fp32";
  MOLE_CHECK(o.what != "train" || o.dtype != "bf16" || o.device == "cuda",
             "bench train: --dtype bf16 is for --device cuda (on a CPU mole trains in fp32)");
  if (o.what == "moe") bench_moe(o);
  if (o.what == "dispatch") bench_dispatch(o);
  if (o.what == "train") bench_train(o);
  if (o.what == "kernels") bench_kernels(o);
  if (o.what == "optimizer") bench_optimizer(o);
  if (o.what == "checkpoint") bench_checkpoint(o);
}

}  // namespace mole::launch
