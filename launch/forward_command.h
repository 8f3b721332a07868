// `mole forward`: one forward pass of a Hugging Face model (optionally with an adapter) over
// token ids from a safetensors file, or over a text tokenized with the model's tokenizer; logits
// and loss to another safetensors file, the loss and the likeliest next tokens to the log.
#pragma once

#include <string>

namespace CLI {
class App;
}

namespace mole::launch {

struct ForwardOptions {
  std::string model_dir;
  std::string adapter_dir;  // empty: base model only
  std::string input;        // safetensors with input_ids int64 [B,S], optional labels int64 [B,S]
  std::string text;         // instead of input: one sequence, bos + the text's tokens, all scored
  std::string tokenizer;    // for text; empty: the model folder's
  std::string output;       // safetensors with logits float32 [B,S,V], loss float32 [1]
  std::string device = "cpu";
  std::string dtype = "fp32";
};

// Registers the subcommand on `app`; the returned options are filled when it parses.
void add_forward_command(CLI::App& app, ForwardOptions& options);
// Runs it. Throws mole::Error on bad input.
void run_forward(const ForwardOptions& options);

}  // namespace mole::launch
