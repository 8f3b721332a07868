// The tokenizers: the byte tokenizer and the sentencepiece tokenizer.model reader (small BPE
// models written by the test, with and without byte fallback), its loss masks in the alpaca
// format, and the errors for missing and unsupported models.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "launch/data.h"
#include "tests/data_test_util.h"
#include "tests/test_util.h"

namespace mole::launch {
namespace {

using data_test::cat;
using data_test::error_of;
using data_test::expect_all;
using data_test::ignored;
using data_test::JsonlFile;

// ---------------------------------------------------------------- tokenizers

TEST(TokenizerByte, RoundTripUtf8AndSpecialIds) {
  auto tok = make_tokenizer("byte");
  EXPECT_EQ(tok->vocab_size(), 259);
  EXPECT_EQ(tok->pad_id(), 0);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  const std::string text = "h\xC3\xA9llo \xE2\x9C\x93 \xE6\x97\xA5\xE6\x9C\xAC\n";  // héllo ✓ 日本
  std::vector<int64_t> ids = tok->encode(text);
  ASSERT_EQ(ids.size(), text.size());
  EXPECT_EQ(ids[0], 3 + 'h');
  EXPECT_EQ(ids[1], 3 + 0xC3);
  for (int64_t id : ids) EXPECT_TRUE(id >= 3 && id < 259) << id;
  EXPECT_EQ(tok->decode(ids), text);
  EXPECT_EQ(tok->decode(cat({{1}, ids, {2, 0, 0}})), text);
  EXPECT_TRUE(tok->encode("").empty());
  expect_all(error_of([&] { tok->decode({3, 259}); }), {"id 259", "index 1"});
}

// Protobuf wire format, just enough to write a sentencepiece ModelProto.
std::string varint(uint64_t v) {
  std::string out;
  for (; v >= 0x80; v >>= 7) out.push_back(static_cast<char>((v & 0x7F) | 0x80));
  out.push_back(static_cast<char>(v));
  return out;
}
std::string int_field(int number, uint64_t v) { return varint(number << 3) + varint(v); }
std::string bytes_field(int number, const std::string& b) {
  return varint(number << 3 | 2) + varint(b.size()) + b;
}
std::string piece(const std::string& text, float score, int type) {
  std::string bits(4, '\0');
  std::memcpy(&bits[0], &score, 4);  // fixed32 is little-endian, as the hosts we build on
  return bytes_field(1, bytes_field(1, text) + varint(2 << 3 | 5) + bits + int_field(3, type));
}

// A small LLaMA-style BPE model: <unk> <s> </s>, then with byte fallback the 256 byte pieces
// (ids 3..258), without it a <pad> control piece (id 3); merges scored by rank, single
// characters, and a user-defined "<sep>". With byte fallback whitespace is kept as is (LLaMA);
// without it, extra whitespace is removed (sentencepiece's default).
std::string bpe_model(bool byte_fallback) {
  std::string model = piece("<unk>", 0, 2) + piece("<s>", 0, 3) + piece("</s>", 0, 3);
  if (byte_fallback) {
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      model += piece(name, 0, 6);
    }
  } else {
    model += piece("<pad>", 0, 3);
  }
  std::istringstream normal(
      "▁t he ▁the er ▁r ou ▁rou te ▁route ▁router ll ▁he llo ▁hello ▁w or ld ▁wor ▁world "
      "▁ e t h r o u l w d s a");
  float score = 0;
  for (std::string p; normal >> p;) model += piece(p, --score, 1);
  model += piece("<sep>", 0, 4);
  const std::string trainer = int_field(3, 2) + int_field(35, byte_fallback);  // type BPE
  const std::string normalizer =
      bytes_field(1, "identity") + int_field(3, 1) + int_field(4, byte_fallback ? 0 : 1);
  return model + bytes_field(2, trainer) + bytes_field(3, normalizer);
}

// The expected ids below are what sentencepiece 0.1.97's SentencePieceProcessor gives for these
// models (checked in a separate process: it cannot be loaded beside LibTorch's protobuf).
TEST(TokenizerSentencePiece, LlamaStyleModelMatchesSentencePiece) {
  test::TempDir dir;
  test::write_bytes(dir.file("tokenizer.model"), bpe_model(true));
  auto tok = make_tokenizer(dir.path());  // the folder holding tokenizer.model
  EXPECT_EQ(tok->vocab_size(), 291);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_EQ(tok->pad_id(), 0);  // no pad piece: <unk> stands in
  const std::pair<std::string, std::vector<int64_t>> cases[] = {
      {"the router", {261, 265, 280, 262}},  // ▁the ▁rou t er: "er" outranks "te"
      {"hello world", {272, 277}},
      {"  the world ", {278, 278, 261, 277, 278}},  // spaces kept
      {"Zeta \xE6\x97\xA5\xE6\x9C\xAC<sep>hello",   // Z and 日本 as bytes (3 + byte)
       {278, 3 + 0x5A, 279, 280, 289, 278, 3 + 0xE6, 3 + 0x97, 3 + 0xA5, 3 + 0xE6, 3 + 0x9C,
        3 + 0xAC, 290, 260, 271}},
      {"", {}}};
  for (const auto& [text, ids] : cases) {
    EXPECT_EQ(tok->encode(text), ids) << text;
    EXPECT_EQ(tok->decode(ids), text);
    EXPECT_EQ(tok->decode(cat({{1}, ids, {2}})), text);  // control pieces decode to nothing
  }
  EXPECT_EQ(tok->decode({278, 272}), " hello");  // only the dummy prefix is dropped
  EXPECT_EQ(tok->decode({3 + 0xFF, 272}), "\xEF\xBF\xBD hello");  // a stray byte: U+FFFD
  auto by_file = make_tokenizer(dir.file("tokenizer.model"));
  EXPECT_EQ(by_file->encode("hello world"), (std::vector<int64_t>{272, 277}));
  expect_all(error_of([&] { tok->decode({291}); }), {"id 291", "[0, 291)"});
}

TEST(TokenizerSentencePiece, UnknownsWithoutByteFallback) {
  test::TempDir dir;
  test::write_bytes(dir.file("sp.model"), bpe_model(false));
  auto tok = make_tokenizer(dir.file("sp.model"));
  EXPECT_EQ(tok->vocab_size(), 36);
  EXPECT_EQ(tok->pad_id(), 3);
  EXPECT_EQ(tok->encode("  the   world "), (std::vector<int64_t>{6, 22}));
  EXPECT_EQ(tok->decode({6, 22}), "the world");
  const std::vector<int64_t> ids = tok->encode("xyz the  router");  // x y z: one <unk>
  EXPECT_EQ(ids, (std::vector<int64_t>{23, 0, 6, 10, 25, 7}));
  EXPECT_EQ(tok->decode(ids), " \xE2\x81\x87  the router");  // <unk> reads " ⁇ "
}

TEST(TokenizerSentencePiece, AlpacaMasksWithSentencePiece) {
  test::TempDir dir;
  test::write_bytes(dir.file("tokenizer.model"), bpe_model(true));
  auto tok = make_tokenizer(dir.path());
  JsonlFile f({R"({"instruction": "route the tokens", "output": "hello world"})"});
  std::vector<Example> ex = f.load(*tok, "alpaca");
  ASSERT_EQ(ex.size(), 1u);
  std::vector<int64_t> prompt =
      tok->encode("### Instruction:\nroute the tokens\n\n### Response:\n");
  std::vector<int64_t> response = tok->encode("hello world");
  EXPECT_EQ(response, (std::vector<int64_t>{272, 277}));
  EXPECT_EQ(ex[0].input_ids, cat({{1}, prompt, response, {2}}));
  EXPECT_EQ(ex[0].labels, cat({ignored(1 + prompt.size()), response, {2}}));
}

TEST(TokenizerErrors, MissingAndInvalidModelsNameThePath) {
  test::TempDir dir;
  const std::string missing = dir.file("nope.model");
  expect_all(error_of([&] { make_tokenizer(missing); }), {missing, "cannot open"});
  expect_all(error_of([&] { make_tokenizer(dir.path()); }), {dir.path(), "no tokenizer.json or tokenizer.model"});
  test::write_bytes(dir.file("junk.model"), "\x0a\xff not a model");
  expect_all(error_of([&] { make_tokenizer(dir.file("junk.model")); }),
             {dir.file("junk.model"), "not a valid sentencepiece model"});
  test::write_bytes(dir.file("unigram.model"), piece("<unk>", 0, 2) + bytes_field(2, ""));
  expect_all(error_of([&] { make_tokenizer(dir.file("unigram.model")); }),
             {dir.file("unigram.model"), "unigram", "not supported"});
  test::write_bytes(dir.file("nfkc.model"), bpe_model(true) + bytes_field(3, bytes_field(2, "x")));
  expect_all(error_of([&] { make_tokenizer(dir.file("nfkc.model")); }),
             {dir.file("nfkc.model"), "character map"});
}

}  // namespace
}  // namespace mole::launch
