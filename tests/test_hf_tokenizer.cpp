// The tokenizer.json interpreter against Hugging Face's own library: tests/tokenizer_fixtures/
// holds the LLaMA-3 (byte-level BPE, Split regex, ignore_merges) and LLaMA-2 (Prepend/Replace
// normalizer, byte fallback, TemplateProcessing) tokenizer files and the ids the `tokenizers`
// library gives for 68 hard strings (make_reference.js). mole's ids must equal them exactly,
// with and without special tokens, and decoding must give the library's text back.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "launch/data.h"
#include "launch/hf_tokenizer.h"
#include "tests/test_util.h"

namespace mole {
namespace {

const std::string kFixtures = std::string(MOLE_SOURCE_DIR) + "/tests/tokenizer_fixtures";

nlohmann::json reference() {
  std::ifstream in(kFixtures + "/reference.json");
  return nlohmann::json::parse(in);
}

nlohmann::json variants() {
  std::ifstream in(kFixtures + "/variants.json");
  return nlohmann::json::parse(in).at("variants");
}

std::vector<std::string> variant_names() {
  std::vector<std::string> names;
  const nlohmann::json all = variants();
  for (const auto& item : all.items()) names.push_back(item.key());
  return names;
}

class HfTokenizerReference : public ::testing::TestWithParam<std::string> {};

TEST_P(HfTokenizerReference, IdsAndDecodingEqualTheLibrary) {
  const std::string name = GetParam();
  const launch::HfTokenizer tok(kFixtures + "/" + name + "/tokenizer.json");
  const nlohmann::json cases = reference().at("tokenizers").at(name);
  ASSERT_GE(cases.size(), 60u);
  int wrong = 0;
  for (const nlohmann::json& c : cases) {
    const std::string text = c.at("text").get<std::string>();
    const std::vector<int64_t> ids = c.at("ids").get<std::vector<int64_t>>();
    const std::vector<int64_t> got = tok.encode(text);
    EXPECT_EQ(got, ids) << name << ": " << c.at("text").dump();
    EXPECT_EQ(tok.encode_with_special(text), c.at("ids_special").get<std::vector<int64_t>>())
        << name << " (special): " << c.at("text").dump();
    EXPECT_EQ(tok.decode(ids), c.at("decoded").get<std::string>()) << name << " decode: " << c.at("text").dump();
    wrong += got != ids;
  }
  EXPECT_EQ(wrong, 0);
  // Speed, single-threaded: a fresh tokenizer (cold piece cache) on the corpus joined by newlines
  // five times over (one document), then the same again (warm).
  const launch::HfTokenizer fresh(kFixtures + "/" + name + "/tokenizer.json");
  std::string document;
  for (int rep = 0; rep < 5; ++rep) {
    for (const nlohmann::json& c : cases) document += c.at("text").get<std::string>() + "\n";
  }
  for (const char* pass : {"cold", "warm"}) {
    const auto start = std::chrono::steady_clock::now();
    const size_t tokens = fresh.encode(document).size();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    RecordProperty(std::string("tokens_per_s_") + pass, test::sci(static_cast<double>(tokens) / s));
    std::printf("%s %s: %zu tokens of %zu bytes in %.4f s (%.0f tokens/s, one thread)\n", name.c_str(), pass, tokens,
                document.size(), s, static_cast<double>(tokens) / s);
  }
}

INSTANTIATE_TEST_SUITE_P(Files, HfTokenizerReference, ::testing::Values("llama3", "llama2"));

// variants.json: a fixture tokenizer.json with top-level components replaced (Metaspace with each
// prepend scheme and split, Digits, NFC / NFKC / Lowercase, Split behaviours and invert, Strip
// and Metaspace decoders), made here as make_reference.js made it for the library.
class HfTokenizerVariant : public ::testing::TestWithParam<std::string> {};

TEST_P(HfTokenizerVariant, IdsAndDecodingEqualTheLibrary) {
  const std::string name = GetParam();
  const nlohmann::json variant = variants().at(name);
  const std::string base = variant.at("base");
  nlohmann::json file = nlohmann::json::parse(test::read_bytes(kFixtures + "/" + base + "/tokenizer.json"));
  for (const auto& item : variant.at("replace").items()) file[item.key()] = item.value();
  test::TempDir dir;
  test::write_bytes(dir.file("tokenizer.json"), file.dump());
  test::write_bytes(dir.file("tokenizer_config.json"), test::read_bytes(kFixtures + "/" + base + "/tokenizer_config.json"));
  const launch::HfTokenizer tok(dir.file("tokenizer.json"));
  const nlohmann::json cases = reference().at("tokenizers").at(name);
  ASSERT_GE(cases.size(), 60u);
  for (const nlohmann::json& c : cases) {
    const std::string text = c.at("text").get<std::string>();
    const std::vector<int64_t> ids = c.at("ids").get<std::vector<int64_t>>();
    EXPECT_EQ(tok.encode(text), ids) << name << ": " << c.at("text").dump();
    EXPECT_EQ(tok.encode_with_special(text), c.at("ids_special").get<std::vector<int64_t>>())
        << name << " (special): " << c.at("text").dump();
    EXPECT_EQ(tok.decode(ids), c.at("decoded").get<std::string>()) << name << " decode: " << c.at("text").dump();
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, HfTokenizerVariant, ::testing::ValuesIn(variant_names()));

TEST(HfTokenizer, SpecialTokensAndBadFilesAreClear) {
  const launch::HfTokenizer llama2(kFixtures + "/llama2/tokenizer.json");
  EXPECT_EQ(llama2.bos_id(), 1);
  EXPECT_EQ(llama2.eos_id(), 2);
  EXPECT_EQ(llama2.vocab_size(), 32000);
  const launch::HfTokenizer llama3(kFixtures + "/llama3/tokenizer.json");
  EXPECT_EQ(llama3.vocab_size(), 128256);
  EXPECT_EQ(llama3.token_id("<|begin_of_text|>"), 128000);
  test::TempDir dir;
  test::write_bytes(dir.file("bad.json"), "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}");
  EXPECT_NE(test::error_of([&] { launch::HfTokenizer t(dir.file("bad.json")); }).find("unsupported model 'WordPiece'"),
            std::string::npos);
  test::write_bytes(dir.file("bad2.json"),
                    "{\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}, \"normalizer\": {\"type\": \"Strange\"}}");
  EXPECT_NE(test::error_of([&] { launch::HfTokenizer t(dir.file("bad2.json")); }).find("unsupported normalizer 'Strange'"),
            std::string::npos);
  test::write_bytes(dir.file("bad3.json"), "{not json");
  EXPECT_NE(test::error_of([&] { launch::HfTokenizer t(dir.file("bad3.json")); }).find("not valid JSON"),
            std::string::npos);
}

// A model folder with tokenizer.json and tokenizer.model: tokenizer.json is used (the other file,
// junk here, is not even read); the files a written model folder carries are tokenizer.json and
// its tokenizer_config.json.
TEST(HfTokenizer, FolderPrefersTokenizerJson) {
  test::TempDir dir;
  const std::string json_text = test::read_bytes(kFixtures + "/llama2/tokenizer.json");
  test::write_bytes(dir.file("tokenizer.json"), json_text);
  test::write_bytes(dir.file("tokenizer_config.json"), test::read_bytes(kFixtures + "/llama2/tokenizer_config.json"));
  test::write_bytes(dir.file("tokenizer.model"), "\x0a\xff not a model");
  const std::unique_ptr<launch::Tokenizer> tok = launch::make_tokenizer(dir.path());
  EXPECT_EQ(tok->vocab_size(), 32000);
  EXPECT_EQ(tok->encode("Hello world"), (std::vector<int64_t>{22557, 1526}));
  const std::map<std::string, std::string> files = launch::tokenizer_files(dir.path());
  ASSERT_EQ(files.size(), 2u);
  EXPECT_EQ(files.at("tokenizer.json"), json_text);
  EXPECT_TRUE(files.count("tokenizer_config.json"));
}

// `mole tokenize` on a JSONL file: the library's ids (with --special, as its post-processor adds
// them); --decode gives the library's text back; a bad line is an error naming file and line.
TEST(HfTokenizer, TokenizeCommandMatchesTheLibrary) {
  test::TempDir dir;
  const nlohmann::json cases = reference().at("tokenizers").at("llama2");
  {
    std::ofstream in(dir.file("in.jsonl"));
    for (const nlohmann::json& c : cases) in << nlohmann::json{{"text", c.at("text")}}.dump() << "\n";
  }
  const std::string mole = std::string(MOLE_BINARY) + " tokenize --tokenizer " + kFixtures + "/llama2";
  test::CommandResult r = test::run_command(mole + " --input " + dir.file("in.jsonl") + " --special --output " +
                                            dir.file("special.jsonl"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = test::run_command(mole + " --input " + dir.file("in.jsonl") + " --output " + dir.file("ids.jsonl"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = test::run_command(mole + " --input " + dir.file("ids.jsonl") + " --decode --output " + dir.file("back.jsonl"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::ifstream special_file(dir.file("special.jsonl")), ids_file(dir.file("ids.jsonl")), back_file(dir.file("back.jsonl"));
  std::string special_line, ids_line, back_line;
  size_t n = 0;
  for (const nlohmann::json& c : cases) {
    ASSERT_TRUE(std::getline(special_file, special_line) && std::getline(ids_file, ids_line) &&
                std::getline(back_file, back_line));
    EXPECT_EQ(nlohmann::json::parse(special_line).at("ids"), c.at("ids_special")) << c.at("text").dump();
    EXPECT_EQ(nlohmann::json::parse(ids_line).at("ids"), c.at("ids")) << c.at("text").dump();
    EXPECT_EQ(nlohmann::json::parse(back_line).at("text"), c.at("decoded")) << c.at("text").dump();
    ++n;
  }
  EXPECT_EQ(n, cases.size());
  r = test::run_command(mole + " --text 'Hello world'");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("\"ids\":[22557,1526]"), std::string::npos) << r.output;
  test::write_bytes(dir.file("bad.jsonl"), "{\"text\": \"fine\"}\n{\"text\": 3}\n");
  r = test::run_command(mole + " --input " + dir.file("bad.jsonl"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find(dir.file("bad.jsonl") + ":2: no string \"text\""), std::string::npos) << r.output;
  test::write_bytes(dir.file("bad_ids.jsonl"), "{\"ids\": [1, 99999]}\n");
  r = test::run_command(mole + " --input " + dir.file("bad_ids.jsonl") + " --decode");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("id 99999 is outside the vocabulary"), std::string::npos) << r.output;
  // Byte-tokenizer ids that end inside a UTF-8 character (0xE2 alone) cannot be written as JSON
  // text: the error names the line.
  test::write_bytes(dir.file("cut.jsonl"), "{\"ids\": [75]}\n{\"ids\": [229]}\n");
  r = test::run_command(std::string(MOLE_BINARY) + " tokenize --tokenizer byte --input " + dir.file("cut.jsonl") +
                        " --decode");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find(dir.file("cut.jsonl") + ":2: "), std::string::npos) << r.output;
}

}  // namespace
}  // namespace mole
