// `mole forward` (see forward_command.h).
#include "launch/forward_command.h"

#include <ATen/ATen.h>
#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "checkpoint/model_loader.h"
#include "checkpoint/moe_peft_adapter.h"
#include "checkpoint/safetensors.h"
#include "kernels/check.h"
#include "launch/data.h"

namespace mole::launch {

void add_forward_command(CLI::App& app, ForwardOptions& options) {
  CLI::App* cmd = app.add_subcommand(
      "forward", "Run one forward pass: token ids in, logits (and loss, given labels) out");
  cmd->add_option("--model", options.model_dir, "Hugging Face model folder (config.json + safetensors)")
      ->required();
  cmd->add_option("--adapter", options.adapter_dir, "PEFT LoRA or MoE-PEFT (MixLoRA, MoLA, DynMoLE, LoRAMoE) adapter folder");
  CLI::Option* input = cmd->add_option(
      "--input", options.input,
      "safetensors file with input_ids int64 [B,S] and optional labels int64 [B,S]");
  CLI::Option* text = cmd->add_option(
      "--text", options.text,
      "a text instead of --input: tokenized with the model's tokenizer (bos first), every next "
      "token scored; the loss and the likeliest next tokens are printed");
  input->excludes(text);
  cmd->add_option("--tokenizer", options.tokenizer,
                  "tokenizer for --text: \"byte\", a tokenizer.model file or a folder (default: "
                  "the --model folder's)")
      ->needs(text);
  cmd->add_option("--output", options.output,
                  "safetensors file to write: logits float32 [B,S,V], loss float32 [1] (required "
                  "with --input)");
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

  MOLE_CHECK(!options.input.empty() || !options.text.empty(),
             "mole forward needs --input IN.safetensors or --text \"...\"");
  MOLE_CHECK(options.input.empty() || !options.output.empty(), "--output is required with --input");
  at::Tensor input_ids, labels;
  std::unique_ptr<Tokenizer> tokenizer;
  const std::string source = options.text.empty() ? options.input : "--text";
  if (!options.text.empty()) {
    tokenizer = make_tokenizer(options.tokenizer.empty() ? options.model_dir : options.tokenizer);
    std::vector<int64_t> ids;
    if (tokenizer->bos_id() >= 0) ids.push_back(tokenizer->bos_id());
    for (int64_t id : tokenizer->encode(options.text)) ids.push_back(id);
    MOLE_CHECK(ids.size() >= 2, "--text: '", options.text, "' gives ", ids.size(),
               " token(s); at least 2 are needed to score a next token");
    input_ids = at::tensor(ids, at::kLong).reshape({1, -1});
    labels = input_ids.clone();
  } else {
    st::SafetensorsFile input(options.input);
    MOLE_CHECK(input.contains("input_ids"), options.input, ": no tensor 'input_ids' (expected int64 [B,S])");
    input_ids = input.tensor("input_ids");
    labels = input.contains("labels") ? input.tensor("labels") : at::Tensor();
  }

  std::unique_ptr<moe::CausalLM> model = ckpt::load_model(options.model_dir, tensor_options);
  try {
    moe::check_tokens(input_ids, labels, model->config().vocab_size);
  } catch (const Error& e) {
    MOLE_FAIL(source, ": ", e.what());
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
  if (tokenizer) {
    // The likeliest tokens to follow the text.
    const at::Tensor probs = at::softmax(logits[0][-1].to(at::kCPU, at::kFloat), -1);
    const auto top = probs.topk(std::min<int64_t>(5, probs.size(0)));
    const at::Tensor p = std::get<0>(top), id = std::get<1>(top);
    std::string next;
    for (int64_t k = 0; k < p.size(0); ++k) {
      const int64_t token = id[k].item<int64_t>();
      const bool printable = token < tokenizer->vocab_size();
      // As a JSON string: quotes show spaces, escapes show control bytes.
      const std::string shown =
          printable ? nlohmann::json(tokenizer->decode({token}))
                          .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
                    : "id " + std::to_string(token);
      next += fmt::format("{}{} ({:.3f})", k ? ", " : "", shown, p[k].item<float>());
    }
    spdlog::info("likeliest next tokens: {}", next);
  }
  if (options.output.empty()) return;
  st::save_file(options.output, out);
  spdlog::info("wrote logits [{}, {}, {}] to {}", logits.size(0), logits.size(1), logits.size(2),
               options.output);
}

}  // namespace mole::launch
