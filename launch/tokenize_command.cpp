// `mole tokenize` (see tokenize_command.h).
#include "launch/tokenize_command.h"

#include <CLI/CLI.hpp>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <thread>
#include <utility>
#include <vector>

#include "kernels/check.h"
#include "launch/data.h"

namespace mole::launch {

void add_tokenize_command(CLI::App& app, TokenizeOptions& o) {
  CLI::App* cmd = app.add_subcommand("tokenize", "Token ids of text (or text of ids) with a model's tokenizer");
  cmd->add_option("--tokenizer", o.tokenizer, "Model folder, tokenizer.json, tokenizer.model or \"byte\"")->required();
  auto* text = cmd->add_option("--text", o.text, "One text");
  auto* input = cmd->add_option("--input", o.input, "JSONL file of {\"text\": ...} (with --decode: {\"ids\": [...]})");
  text->excludes(input);
  cmd->add_option("--output", o.output, "JSONL file to write (default: stdout)");
  cmd->add_flag("--special", o.special, "Add the special tokens the tokenizer adds around a text (e.g. BOS)");
  cmd->add_flag("--decode", o.decode, "Turn \"ids\" back into \"text\"");
}

void run_tokenize(const TokenizeOptions& o) {
  MOLE_CHECK(!o.text.empty() || !o.input.empty(), "mole tokenize: give --text or --input");
  MOLE_CHECK(!(o.decode && !o.text.empty()), "mole tokenize: --decode reads \"ids\" from --input lines");
  const std::unique_ptr<Tokenizer> tok = make_tokenizer(o.tokenizer);
  std::ofstream file;
  if (!o.output.empty()) {
    file.open(o.output, std::ios::binary | std::ios::trunc);
    MOLE_CHECK(file.good(), "mole tokenize: cannot write '", o.output, "'");
  }
  std::ostream& out = o.output.empty() ? std::cout : file;
  // One line's output (without its newline).
  const auto tokenize = [&](nlohmann::json line, const std::string& where) -> std::string {
    if (o.decode) {
      MOLE_CHECK(line.contains("ids") && line["ids"].is_array(), where, ": no \"ids\" array");
      std::vector<int64_t> ids;
      for (const nlohmann::json& id : line["ids"]) {
        MOLE_CHECK(id.is_number_integer(), where, ": \"ids\" holds ", id.dump(), ", not an integer");
        const auto v = id.get<int64_t>();
        MOLE_CHECK(v >= 0 && v < tok->vocab_size(), where, ": id ", v, " is outside the vocabulary [0, ",
                   tok->vocab_size(), ")");
        ids.push_back(v);
      }
      line["text"] = tok->decode(ids);
    } else {
      MOLE_CHECK(line.contains("text") && line["text"].is_string(), where, ": no string \"text\"");
      const std::string text = line["text"].get<std::string>();
      line["ids"] = o.special ? tok->encode_with_special(text) : tok->encode(text);
    }
    return line.dump();
  };
  if (!o.text.empty()) {
    out << tokenize(nlohmann::json{{"text", o.text}}, "--text") << "\n";
  } else {
    std::ifstream in(o.input, std::ios::binary);
    MOLE_CHECK(in.good(), "mole tokenize: cannot open '", o.input, "'");
    // Chunks of lines, each on every core; output in input order; the first bad line is the error.
    constexpr size_t kChunk = 1 << 16;
    std::vector<std::pair<int64_t, std::string>> lines;  // (1-based number, text), blank lines skipped
    std::vector<std::string> results;
    const auto flush = [&] {
      results.assign(lines.size(), std::string());
      parallel_for(lines.size(), static_cast<int>(std::thread::hardware_concurrency()), [&](size_t i) {
        const std::string where = o.input + ":" + std::to_string(lines[i].first);
        try {
          nlohmann::json j;
          try {
            j = nlohmann::json::parse(lines[i].second);
          } catch (const nlohmann::json::exception& e) {
            MOLE_FAIL(where, ": not JSON (", e.what(), ")");
          }
          MOLE_CHECK(j.is_object(), where, ": not a JSON object");
          results[i] = tokenize(std::move(j), where);
        } catch (const std::exception& e) {
          const std::string message = e.what();
          if (message.rfind(where, 0) == 0) throw;
          MOLE_FAIL(where, ": ", message);  // e.g. decoded ids that are not whole UTF-8 characters
        }
      });
      for (const std::string& r : results) out << r << "\n";
      lines.clear();
    };
    std::string line;
    for (int64_t n = 1; std::getline(in, line); ++n) {
      if (line.find_first_not_of(" \t\r") != std::string::npos) lines.emplace_back(n, std::move(line));
      if (lines.size() == kChunk) flush();
    }
    flush();
  }
  out.flush();
  MOLE_CHECK(out.good(), "mole tokenize: writing ", o.output.empty() ? "stdout" : "'" + o.output + "'", " failed");
}

}  // namespace mole::launch
