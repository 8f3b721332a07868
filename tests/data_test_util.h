// Shared helpers of the data-pipeline tests (test_data.cpp, test_tokenizer.cpp): error messages,
// id-list building and a temporary JSONL file to load.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "kernels/check.h"
#include "launch/data.h"
#include "tests/test_util.h"

namespace mole::launch::data_test {

inline constexpr int64_t kIgnore = -100;

using test::error_of;  // shared with the other tests

// Expects `msg` to contain every one of `parts`.
inline void expect_all(const std::string& msg, std::initializer_list<std::string> parts) {
  for (const std::string& part : parts) {
    EXPECT_NE(msg.find(part), std::string::npos) << "missing '" << part << "' in: " << msg;
  }
}

inline std::vector<int64_t> cat(std::initializer_list<std::vector<int64_t>> parts) {
  std::vector<int64_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

inline std::vector<int64_t> ignored(size_t n) { return std::vector<int64_t>(n, kIgnore); }

// A temporary JSONL file of `lines`, and loading it.
struct JsonlFile {
  test::TempDir dir;
  std::string path;
  explicit JsonlFile(std::initializer_list<std::string> lines) : path(dir.file("data.jsonl")) {
    std::string text;
    for (const std::string& line : lines) text += line + "\n";
    test::write_bytes(path, text);
  }
  std::vector<Example> load(const Tokenizer& tok, const std::string& format, int64_t seq_len = 512,
                            DatasetStats* stats = nullptr) const {
    DataOptions o;
    o.path = path;
    o.format = format;
    o.seq_len = seq_len;
    return load_dataset(o, tok, stats);
  }
  std::string error(const std::string& format, int64_t seq_len = 512) const {
    auto tok = make_tokenizer("byte");
    return error_of([&] { load(*tok, format, seq_len); });
  }
};

}  // namespace mole::launch::data_test
