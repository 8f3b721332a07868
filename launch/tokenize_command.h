// `mole tokenize --tokenizer SPEC (--text STR | --input FILE.jsonl) [--output FILE.jsonl]
// [--special] [--decode]`: what a tokenizer makes of text, to check data before training. Input
// lines are JSON objects {"text": ...}; each output line is the same object plus "ids" (with
// --special, the special tokens the tokenizer adds, e.g. BOS). With --decode the lines hold "ids"
// and get "text" back. Output goes to --output or stdout; errors name the line.
#pragma once

#include <string>

namespace CLI {
class App;
}

namespace mole::launch {

struct TokenizeOptions {
  std::string tokenizer;
  std::string text;
  std::string input;
  std::string output;
  bool special = false;
  bool decode = false;
};

void add_tokenize_command(CLI::App& app, TokenizeOptions& options);
void run_tokenize(const TokenizeOptions& options);

}  // namespace mole::launch
