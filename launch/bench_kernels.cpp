// `mole bench kernels` (see bench_command.h): the MoE primitives of one MixLoRA FFN site at a
// model's shape, in bytes moved per second against a plain device copy measured in the same run.
// The primitives are the ones the model calls (kernels/permute.h, kernels/grouped_lora.h), so on
// a GPU built with the CUDA kernels these are the CUDA twins.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/check.h"
#include "kernels/grouped_lora.h"
#include "kernels/permute.h"
#include "launch/bench_command.h"

namespace mole::launch {
namespace {

void synchronize(const at::Device& device) {
  if (device.is_cuda()) at::empty({1}, at::TensorOptions(device)).cpu();
}

// Mean seconds of `fn` over `iters` calls after `warmup` calls, timed as a batch (the device
// queue stays full; one sync at each end).
double seconds_per_call(const at::Device& device, int64_t warmup, int64_t iters,
                        const std::function<void()>& fn) {
  for (int64_t i = 0; i < warmup; ++i) fn();
  synchronize(device);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) fn();
  synchronize(device);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() /
         static_cast<double>(iters);
}

double bytes_of(const at::Tensor& t) {
  return static_cast<double>(t.numel()) * static_cast<double>(t.element_size());
}

}  // namespace

void bench_kernels(const BenchOptions& o) {
  const at::Device device(o.device == "cuda" ? at::kCUDA : at::kCPU);
  const at::ScalarType dtype = o.dtype == "bf16" ? at::kBFloat16 : at::kFloat;
  const at::TensorOptions rows = at::TensorOptions(dtype).device(device);
  const at::TensorOptions master = at::TensorOptions(at::kFloat).device(device);
  const int64_t T = o.tokens, D = o.hidden, F = o.intermediate, E = o.experts, K = o.top_k,
                r = o.rank;
  MOLE_CHECK(K >= 1 && K <= E, "bench kernels: need 1 <= --top-k <= --experts");
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);

  // A top-k routing with distinct experts per token, as the router makes it.
  at::Tensor expert_TK = std::get<1>(at::rand({T, E}, gen).topk(K, 1)).contiguous();
  at::Tensor token_N = at::arange(T, at::kLong).repeat_interleave(K);
  at::Tensor expert_N = expert_TK.reshape({-1});
  at::Tensor weight_N = at::rand({T * K}, gen).to(device);
  kernels::PermutePlan plan =
      kernels::make_permute_plan(token_N.to(device), expert_N.to(device), T, E);
  const int64_t N = plan.num_rows();

  at::Tensor x_TD = at::randn({T, D}, gen).to(rows);
  at::Tensor x_ND = kernels::permute_rows(x_TD, plan);
  at::Tensor h_NF = at::randn({N, F}, gen).to(rows);
  at::Tensor a_up = (at::randn({E, r, D}, gen) / 64.0).to(master);
  at::Tensor b_up = (at::randn({E, F, r}, gen) / 64.0).to(master);
  at::Tensor a_down = (at::randn({E, r, F}, gen) / 64.0).to(master);
  at::Tensor b_down = (at::randn({E, D, r}, gen) / 64.0).to(master);
  at::Tensor big = at::empty({std::max<int64_t>(N * F, 1) * 4}, rows);  // several times the L2
  at::Tensor big_out = at::empty_like(big);
  big.uniform_(-1.0, 1.0);

  struct Row {
    std::string kernel;
    double bytes = 0.0;
    double seconds = 0.0;
  };
  std::vector<Row> results;
  const auto run = [&](const std::string& name, double bytes, const std::function<void()>& fn) {
    results.push_back({name, bytes, seconds_per_call(device, o.warmup, o.iters, fn)});
  };
  at::NoGradGuard no_grad;
  run("copy", 2.0 * bytes_of(big), [&] { big_out.copy_(big); });
  run("permute_rows [T,D]->[N,D]", bytes_of(x_TD) + bytes_of(x_ND),
      [&] { kernels::permute_rows(x_TD, plan); });
  run("combine [N,F]->[T,F]", bytes_of(h_NF) + static_cast<double>(T * F) * h_NF.element_size(),
      [&] { kernels::unpermute_combine(h_NF, plan, weight_N); });
  // Shrink and expand: rows in, rows out, the (small) expert weights once.
  run("grouped_lora D->F fwd", bytes_of(x_ND) + static_cast<double>(N * F) * x_ND.element_size() +
                                   bytes_of(a_up) + bytes_of(b_up),
      [&] { kernels::grouped_lora(x_ND, a_up, b_up, plan.counts, 2.0); });
  run("grouped_lora F->D fwd", bytes_of(h_NF) + static_cast<double>(N * D) * h_NF.element_size() +
                                   bytes_of(a_down) + bytes_of(b_down),
      [&] { kernels::grouped_lora(h_NF, a_down, b_down, plan.counts, 2.0); });
  {
    // Forward and backward of the F -> D expert LoRA: the forward's traffic, then gy read, x read
    // again, gx written, and the weight gradients.
    at::AutoGradMode grad(true);
    at::Tensor h = h_NF.detach().requires_grad_(true);
    at::Tensor a = a_down.detach().requires_grad_(true);
    at::Tensor b = b_down.detach().requires_grad_(true);
    at::Tensor gy = at::randn({N, D}, gen).to(rows);
    const double fwd = bytes_of(h) + bytes_of(gy) + bytes_of(a) + bytes_of(b);
    const double bwd = bytes_of(gy) + 2.0 * bytes_of(h) + 2.0 * (bytes_of(a) + bytes_of(b));
    run("grouped_lora F->D fwd+bwd", fwd + bwd, [&] {
      at::Tensor y = kernels::grouped_lora(h, a, b, plan.counts, 2.0);
      y.backward(gy);
      h.mutable_grad() = at::Tensor();
      a.mutable_grad() = at::Tensor();
      b.mutable_grad() = at::Tensor();
    });
  }

  const double copy_gbps = results.front().bytes / results.front().seconds / 1e9;
  nlohmann::json json = {{"bench", "kernels"}, {"device", o.device}, {"dtype", o.dtype},
                         {"tokens", T}, {"rows", N}, {"hidden", D}, {"intermediate", F},
                         {"experts", E}, {"top_k", K}, {"r", r}, {"iters", o.iters},
                         {"copy_gb_per_s", copy_gbps}};
  if (!o.json) {
    std::printf("mole bench kernels: T=%lld N=%lld D=%lld F=%lld E=%lld K=%lld r=%lld, %s %s\n",
                static_cast<long long>(T), static_cast<long long>(N), static_cast<long long>(D),
                static_cast<long long>(F), static_cast<long long>(E), static_cast<long long>(K),
                static_cast<long long>(r), o.device.c_str(), o.dtype.c_str());
    std::printf("%-28s %10s %10s %10s\n", "kernel", "us", "GB/s", "of copy");
  }
  for (const Row& row : results) {
    const double gbps = row.bytes / row.seconds / 1e9;
    json["results"].push_back({{"kernel", row.kernel}, {"us", row.seconds * 1e6},
                               {"bytes", row.bytes}, {"gb_per_s", gbps},
                               {"fraction_of_copy", gbps / copy_gbps}});
    if (!o.json) {
      std::printf("%-28s %10.1f %10.1f %9.1f%%\n", row.kernel.c_str(), row.seconds * 1e6, gbps,
                  100.0 * gbps / copy_gbps);
    }
  }
  std::printf("%s\n", json.dump().c_str());
}

}  // namespace mole::launch
