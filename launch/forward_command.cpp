// `mole forward` (see forward_command.h).
#include "launch/forward_command.h"

#include <ATen/ATen.h>
#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include <filesystem>

#include "checkpoint/model_loader.h"
#include "checkpoint/moe_peft_adapter.h"
#include "checkpoint/safetensors.h"
#include "kernels/check.h"

namespace mole::launch {

void add_forward_command(CLI::App& app, ForwardOptions& options) {
  CLI::App* cmd = app.add_subcommand(
      "forward", "Run one forward pass: token ids in, logits (and loss, given labels) out");
  cmd->add_option("--model", options.model_dir, "Hugging Face model folder (config.json + safetensors)")
      ->required();
  cmd->add_option("--adapter", options.adapter_dir, "PEFT LoRA or MoE-PEFT (MixLoRA, MoLA, DynMoLE, LoRAMoE) adapter folder");
  cmd->add_option("--input", options.input,
                  "safetensors file with input_ids int64 [B,S] and optional labels int64 [B,S]")
      ->required();
  cmd->add_option("--output", options.output,
                  "safetensors file to write: logits float32 [B,S,V], loss float32 [1]")
      ->required();
  cmd->add_option("--device", options.device, "cpu or cuda")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--dtype", options.dtype, "fp32 or bf16 (base weights and activations)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
}

void run_forward(const ForwardOptions& options) {
  MOLE_CHECK(options.device != "cuda" || at::hasCUDA(),
             "--device cuda was requested but this LibTorch build has no usable CUDA device");
  at::TensorOptions tensor_options = at::TensorOptions()
                                         .dtype(options.dtype == "bf16" ? at::kBFloat16 : at::kFloat)
                                         .device(options.device == "cuda" ? at::kCUDA : at::kCPU);

  st::SafetensorsFile input(options.input);
  MOLE_CHECK(input.contains("input_ids"), options.input, ": no tensor 'input_ids' (expected int64 [B,S])");
  at::Tensor input_ids = input.tensor("input_ids");
  at::Tensor labels = input.contains("labels") ? input.tensor("labels") : at::Tensor();

  std::unique_ptr<moe::CausalLM> model = ckpt::load_model(options.model_dir, tensor_options);
  try {
    moe::check_tokens(input_ids, labels, model->config().vocab_size);
  } catch (const Error& e) {
    MOLE_FAIL(options.input, ": ", e.what());
  }
  if (!options.adapter_dir.empty()) ckpt::load_adapter(*model, options.adapter_dir);

  at::NoGradGuard no_grad;
  at::Tensor logits = model->forward(input_ids);
  std::vector<std::pair<std::string, at::Tensor>> out = {{"logits", logits.to(at::kCPU, at::kFloat)}};
  if (labels.defined()) {
    at::Tensor loss = moe::causal_lm_loss(logits, labels).reshape({1}).to(at::kCPU, at::kFloat);
    spdlog::info("loss {:.6f} over {} sequences of {} tokens", loss.item<float>(),
                 input_ids.size(0), input_ids.size(1));
    out.emplace_back("loss", loss);
  }
  st::save_file(options.output, out);
  spdlog::info("wrote logits [{}, {}, {}] to {}", logits.size(0), logits.size(1), logits.size(2),
               options.output);
}

}  // namespace mole::launch
