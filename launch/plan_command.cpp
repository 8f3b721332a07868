// `mole plan` (see plan_command.h).
#include "launch/plan_command.h"

#include <CLI/CLI.hpp>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <spdlog/fmt/fmt.h>

#include "checkpoint/hf_config.h"
#include "kernels/check.h"
#include "kernels/torch_compat.h"
#include "launch/config.h"
#include "launch/data.h"
#include "launch/run_parts.h"
#include "parallel/memory_plan.h"

namespace mole::launch {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
// Kept free of the plan's tensors: the runtime's own memory (CUDA context, communication
// buffers) and the allocator's fragmentation.
constexpr double kReserve = 0.10;

int64_t element_bytes(const std::string& dtype) {
  return dtype == "bf16" ? 2 : dtype == "fp64" ? 8 : 4;
}

// The base's architecture without its weights: a preset, or a Hugging Face config.json.
moe::ModelConfig model_shape(const Config& c) {
  if (c.model.base.rfind("synthetic:", 0) == 0) {
    // The tiny preset is sized to its tokenizer's vocabulary.
    const std::string tokenizer = c.data.tokenizer.empty() ? "byte" : c.data.tokenizer;
    const int64_t vocab = c.model.base == "synthetic:tiny" ? make_tokenizer(tokenizer)->vocab_size() : 0;
    return synthetic_shape(c, vocab);
  }
  return ckpt::load_hf_config(c.model.base);
}

parallel::PlanInput plan_input(const Config& c, const moe::ModelConfig& shape, int world) {
  parallel::PlanInput in;
  in.model = shape;
  in.adapter = adapter_spec(c, shape.num_layers);
  in.world = world;
  in.ep = static_cast<int>(c.parallel.ep);
  in.zero = static_cast<int>(c.parallel.zero);
  in.base_shard = static_cast<int>(c.parallel.base_shard);
  in.element_bytes = element_bytes(c.model.dtype);
  in.cuda = c.model.device == "cuda";
  // CUDA runs use a LibTorch with the fused kernel; on the host, this build's.
  in.fused_attention = in.cuda || compat::kHasFusedAttention;
  in.activation_checkpointing = c.train.activation_checkpointing;
  in.micro_batch = c.train.micro_batch;
  in.global_batch = c.train.global_batch;
  in.seq_len = c.data.seq_len;
  in.zero_bucket_bytes = static_cast<int64_t>(c.parallel.zero_bucket_mib * (1 << 20));
  in.dispatch = c.parallel.dispatch;
  return in;
}

bool fits(const parallel::MemoryPlan& plan, int64_t device_bytes) {
  return static_cast<double>(plan.total_bytes) <= (1.0 - kReserve) * static_cast<double>(device_bytes);
}

// The layout scaled to `world` ranks: the frozen base sharded over all of them (when it is
// sharded at all), expert parallelism over the largest common divisor of the configured EP and
// the world, the global batch the smallest multiple of micro-batch x world not below the
// configured one. Empty when that layout is invalid (expert counts EP cannot split).
std::optional<parallel::MemoryPlan> scaled_plan(const Config& c, const moe::ModelConfig& shape, int world) {
  parallel::PlanInput in = plan_input(c, shape, world);
  in.base_shard = c.parallel.base_shard > 0 && world > 1 ? world : 0;
  in.ep = std::gcd(static_cast<int>(c.parallel.ep), world);
  const int64_t unit = in.micro_batch * world;
  in.global_batch = (in.global_batch + unit - 1) / unit * unit;
  try {
    return parallel::plan_memory(in);
  } catch (const Error&) {
    return std::nullopt;
  }
}

// GiB, or MiB below one GiB.
std::string gib(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  return b >= kGiB ? fmt::format("{:9.2f} GiB", b / kGiB) : fmt::format("{:9.2f} MiB", b / (1024.0 * 1024.0));
}

}  // namespace

void add_plan_command(CLI::App& app, PlanOptions& options) {
  CLI::App* cmd = app.add_subcommand(
      "plan", "Per-rank memory and per-step communication of a training config, without weights");
  cmd->add_option("config", options.config, "Training config (YAML)")->required();
  cmd->add_option("--world", options.world, "Ranks of the run (default 1)")->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--set", options.overrides, "Override a config key: key.path=value (repeatable)");
  cmd->add_option("--device-memory", options.device_memory_gib,
                  "Memory of one rank's device in GiB (default: this machine's memory for model.device cpu)")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--json", options.json, "Print JSON");
  cmd->add_flag("--smallest-world", options.smallest_world,
                "Also find the fewest ranks at which this layout, scaled, fits");
}

void run_plan(const PlanOptions& options) {
  const Config c = load_config(options.config, options.overrides);
  const moe::ModelConfig shape = model_shape(c);
  const parallel::PlanInput in = plan_input(c, shape, options.world);
  const parallel::MemoryPlan plan = parallel::plan_memory(in);

  // One rank's memory: given, or on the host this machine's shared by the ranks (all of them on
  // this machine, the conservative reading).
  int64_t device_bytes = 0;
  std::string memory_source = "--device-memory";
  if (options.device_memory_gib > 0) {
    device_bytes = static_cast<int64_t>(options.device_memory_gib * kGiB);
  } else {
    MOLE_CHECK(c.model.device == "cpu", "model.device is ", c.model.device,
               ": give the memory of one device with --device-memory GiB");
    device_bytes = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE) / options.world;
    memory_source = fmt::format("this machine's memory / {} rank(s); --device-memory to set it", options.world);
  }
  const bool plan_fits = fits(plan, device_bytes);
  std::optional<int> smallest;
  if (options.smallest_world) {
    for (int world = 1; world <= 4096 && !smallest; ++world) {
      const std::optional<parallel::MemoryPlan> p = scaled_plan(c, shape, world);
      if (p && fits(*p, device_bytes)) smallest = world;
    }
  }

  nlohmann::json out;
  out["model"] = {{"base", c.model.base}, {"layers", shape.num_layers}, {"hidden_size", shape.hidden_size},
                  {"vocab_size", shape.vocab_size}, {"dtype", c.model.dtype}, {"device", c.model.device}};
  // One process runs without ZeRO and with the whole base (no process grid).
  const int zero = in.world > 1 ? in.zero : 0, base_shard = in.world > 1 ? in.base_shard : 0;
  out["layout"] = {{"world", in.world}, {"ep", in.ep}, {"edp", in.world / in.ep}, {"zero", zero},
                   {"base_shard", base_shard}, {"activation_checkpointing", in.activation_checkpointing},
                   {"micro_batch", in.micro_batch}, {"seq_len", in.seq_len},
                   {"micro_batches", plan.micro_batches}, {"attention", in.fused_attention ? "fused" : "explicit"}};
  out["memory"] = {{"base_bytes", plan.base_bytes},
                   {"gathered_bytes", plan.gathered_bytes},
                   {"trainable_bytes", plan.trainable_bytes},
                   {"grads_bytes", plan.grad_bytes},
                   {"optimizer_bytes", plan.optimizer_bytes},
                   {"activations_bytes", plan.activation_bytes},
                   {"total_bytes", plan.total_bytes}};
  out["activations"] = {{"layer_kept_bytes", plan.layer_kept_bytes},
                        {"layers_kept_bytes", plan.layers_kept_bytes},
                        {"head_bytes", plan.head_bytes},
                        {"working_bytes", plan.working_bytes}};
  out["comm"] = nlohmann::json::object();
  for (const auto& [name, bytes] : plan.comm) out["comm"][name] = bytes;
  int64_t tokens_sites = 0, weights_sites = 0;
  for (const parallel::SiteDispatch& d : plan.dispatch) {
    tokens_sites += d.mode == moe::DispatchMode::kTokens;
    weights_sites += d.mode == moe::DispatchMode::kWeights;
  }
  out["dispatch"] = {{"sites", plan.dispatch.size()}, {"tokens", tokens_sites}, {"weights", weights_sites}};
  out["device_memory_bytes"] = device_bytes;
  out["device_memory_source"] = memory_source;
  out["reserve_fraction"] = kReserve;
  out["fits"] = plan_fits;
  if (options.smallest_world) out["smallest_world"] = smallest ? nlohmann::json(*smallest) : nlohmann::json();

  if (options.json) {
    std::printf("%s\n", out.dump(2).c_str());
    return;
  }
  std::printf("plan: %s, %lld decoder layers, %s on %s | world %d, ep %d, zero %d, base_shard %d%s\n",
              c.model.base.c_str(), static_cast<long long>(shape.num_layers), c.model.dtype.c_str(),
              c.model.device.c_str(), in.world, in.ep, zero, base_shard,
              in.activation_checkpointing ? ", activation checkpointing" : "");
  std::printf("  micro-batch %lld x %lld tokens, %lld micro-batches per step, %s attention\n",
              static_cast<long long>(in.micro_batch), static_cast<long long>(in.seq_len),
              static_cast<long long>(plan.micro_batches), in.fused_attention ? "fused" : "explicit");
  std::printf("memory per rank:\n");
  std::printf("  base (kept shard)       %s\n", gib(plan.base_bytes).c_str());
  std::printf("  gathered layers         %s\n", gib(plan.gathered_bytes).c_str());
  std::printf("  trainable               %s\n", gib(plan.trainable_bytes).c_str());
  std::printf("  gradients               %s\n", gib(plan.grad_bytes).c_str());
  std::printf("  optimizer state         %s\n", gib(plan.optimizer_bytes).c_str());
  std::printf("  activations             %s  (layers %s, loss %s, working %s)\n", gib(plan.activation_bytes).c_str(),
              gib(plan.layers_kept_bytes).c_str(), gib(plan.head_bytes).c_str(), gib(plan.working_bytes).c_str());
  std::printf("  total                   %s  of %s (%s; %.0f%% kept in reserve): %s\n",
              gib(plan.total_bytes).c_str(), gib(device_bytes).c_str(), memory_source.c_str(), kReserve * 100,
              plan_fits ? "fits" : "does NOT fit");
  std::printf("communication per rank and step:\n");
  for (const auto& [name, bytes] : plan.comm) std::printf("  %-28s %s\n", name.c_str(), gib(bytes).c_str());
  if (options.smallest_world) {
    if (smallest) std::printf("smallest world that fits: %d ranks\n", *smallest);
    else std::printf("smallest world that fits: none up to 4096 ranks\n");
  }
}

}  // namespace mole::launch
