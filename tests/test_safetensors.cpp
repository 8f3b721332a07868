// Tests of the safetensors reader/writer, the sharded folder layout, and header validation.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <memory>

#include "checkpoint/safetensors.h"
#include "kernels/check.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using mole::st::CheckpointReader;
using mole::st::SafetensorsFile;
using mole::test::read_bytes;
using mole::test::TempDir;
using mole::test::write_bytes;
using Named = std::vector<std::pair<std::string, at::Tensor>>;

namespace {

std::string le64(uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(v >> (8 * i));
  return out;
}

// A file image: header length, `header` verbatim, then `data`.
std::string image(const std::string& header, const std::string& data = "") {
  return le64(header.size()) + header + data;
}

std::string write_image(const TempDir& dir, const std::string& name, const std::string& header,
                        const std::string& data = "") {
  const std::string path = dir.file(name);
  write_bytes(path, image(header, data));
  return path;
}

// Passes when `fn` throws mole::Error whose message contains every one of `parts`.
::testing::AssertionResult fails_with(const std::function<void()>& fn,
                                      std::initializer_list<std::string> parts) {
  try {
    fn();
  } catch (const mole::Error& e) {
    const std::string message = e.what();
    for (const std::string& part : parts) {
      if (message.find(part) == std::string::npos) {
        return ::testing::AssertionFailure() << "message lacks '" << part << "': " << message;
      }
    }
    return ::testing::AssertionSuccess() << message;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-mole exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

std::string bytes_of(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
}

void expect_same(const at::Tensor& got, const at::Tensor& want, const std::string& name) {
  EXPECT_EQ(got.scalar_type(), want.scalar_type()) << name;
  EXPECT_EQ(got.sizes(), want.sizes()) << name;
  EXPECT_TRUE(bytes_of(got) == bytes_of(want)) << name << " differs bitwise";
}

Named mixed_tensors() {
  at::manual_seed(7);
  return {
      {"f64", at::randn({3, 2}, at::kDouble)},
      {"f32", at::randn({4, 5})},
      {"f16", at::randn({7}).to(at::kHalf)},  // 14 bytes: misaligns what follows
      {"bf16", at::randn({2, 3, 2}).to(at::kBFloat16)},
      {"i64", at::randint(-1000000, 1000000, {5}, at::kLong)},
      {"i32", at::randint(-1000, 1000, {2, 2}, at::kInt)},
      {"i16", at::randint(-300, 300, {3}, at::kShort)},
      {"i8", at::randint(-128, 127, {9}, at::kChar)},
      {"u8", at::randint(0, 255, {1, 3}, at::kByte)},
      {"bool", at::randn({5}) > 0},
      {"scalar", at::scalar_tensor(3.5, at::kFloat)},
      {"empty", at::empty({0, 3})},
      {"transposed", at::randn({3, 4}).t()},
  };
}

const char* kTwoTensors = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                          R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})";

}  // namespace

TEST(Safetensors, RoundTripEveryDtype) {
  TempDir dir;
  const Named tensors = mixed_tensors();
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "round trip"}};
  const std::string path = dir.file("mixed.safetensors");
  mole::st::save_file(path, tensors, metadata);

  SafetensorsFile file(path);
  EXPECT_EQ(file.header().metadata, metadata);
  EXPECT_EQ(file.header().data_start % 8, 0u);
  ASSERT_EQ(file.header().tensors.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, want] = tensors[i];
    EXPECT_EQ(file.header().tensors[i].name, name);  // written in the given order
    ASSERT_TRUE(file.contains(name));
    expect_same(file.tensor(name), want, name);
  }
  EXPECT_EQ(file.tensor("scalar").dim(), 0);
  EXPECT_FLOAT_EQ(file.tensor("scalar").item<float>(), 3.5f);
  EXPECT_EQ(file.tensor("empty").sizes(), (std::vector<int64_t>{0, 3}));
  EXPECT_EQ(mole::st::dtype_name(file.header().find("bf16")->dtype), std::string("BF16"));
  EXPECT_EQ(mole::st::dtype_name(file.header().find("bool")->dtype), std::string("BOOL"));
}

TEST(Safetensors, NoMetadataWritesNoMetadataKey) {
  TempDir dir;
  const std::string path = dir.file("plain.safetensors");
  mole::st::save_file(path, {{"w", at::ones({2})}});
  EXPECT_EQ(read_bytes(path).find("__metadata__"), std::string::npos);
  EXPECT_TRUE(SafetensorsFile(path).header().metadata.empty());
}

TEST(Safetensors, HeaderIsPaddedToEightBytes) {
  TempDir dir;
  for (int len = 1; len <= 17; ++len) {
    const std::string path = dir.file("pad" + std::to_string(len) + ".safetensors");
    mole::st::save_file(path, {{std::string(len, 'x'), at::arange(3, at::kFloat)}});
    const std::string bytes = read_bytes(path);
    uint64_t n = 0;
    std::memcpy(&n, bytes.data(), 8);
    EXPECT_EQ((8 + n) % 8, 0u) << "name length " << len;
    EXPECT_EQ(bytes.size(), 8 + n + 12);
    EXPECT_EQ(SafetensorsFile(path).header().data_start, 8 + n);
  }
}

TEST(Safetensors, AlignedTensorsAreZeroCopyAndOutliveTheFile) {
  TempDir dir;
  const std::string path = dir.file("w.safetensors");
  const at::Tensor want = at::randn({16, 8});
  mole::st::save_file(path, {{"w", want}});
  auto file = std::make_unique<SafetensorsFile>(path);
  at::Tensor a = file->tensor("w");
  EXPECT_EQ(a.data_ptr(), file->tensor("w").data_ptr());  // both views of the mapping
  file.reset();
  expect_same(a, want, "w after the file object is gone");
}

TEST(Safetensors, UnalignedDataIsCopied) {
  TempDir dir;
  std::string header = R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})";
  while ((8 + header.size()) % 4 != 1) header += ' ';  // data starts at an odd offset
  const float values[3] = {1.5f, -2.25f, 1e30f};
  const std::string path = write_image(dir, "odd.safetensors", header,
                                       std::string(reinterpret_cast<const char*>(values), 12));
  SafetensorsFile file(path);
  EXPECT_EQ(file.header().data_start % 4, 1u);
  const at::Tensor t = file.tensor("a");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data_ptr()) % alignof(float), 0u);
  EXPECT_EQ(t[0].item<float>(), 1.5f);
  EXPECT_EQ(t[1].item<float>(), -2.25f);
  EXPECT_EQ(t[2].item<float>(), 1e30f);
}

TEST(Safetensors, ShardedRoundTrip) {
  TempDir dir;
  const std::string ckpt = dir.file("ckpt");               // created by save_checkpoint
  const Named tensors = {{"layers.0.w", at::randn({16})},  // 64 bytes
                         {"layers.0.b", at::randn({16})},
                         {"big", at::randn({100})},  // 400 bytes: over the limit, alone
                         {"layers.1.w", at::randn({4, 4}).to(at::kBFloat16)},
                         {"layers.1.b", at::randn({16})}};
  mole::st::save_checkpoint(ckpt, tensors, 150);

  EXPECT_FALSE(fs::exists(ckpt + "/model.safetensors"));
  for (const char* shard : {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                            "model-00003-of-00003.safetensors"}) {
    EXPECT_TRUE(fs::exists(ckpt + "/" + shard)) << shard;
  }
  const auto index = nlohmann::json::parse(read_bytes(ckpt + "/model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), 64u * 3 + 400 + 32);
  EXPECT_EQ(index["weight_map"].size(), tensors.size());
  EXPECT_EQ(index["weight_map"]["layers.0.b"], "model-00001-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["big"], "model-00002-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["layers.1.b"], "model-00003-of-00003.safetensors");
  EXPECT_EQ(
      SafetensorsFile(ckpt + "/model-00002-of-00003.safetensors").header().metadata.at("format"),
      "pt");

  CheckpointReader reader(ckpt);
  std::vector<std::string> names;
  for (const auto& entry : tensors) names.push_back(entry.first);
  std::sort(names.begin(), names.end());
  EXPECT_EQ(reader.names(), names);
  for (const auto& [name, want] : tensors) {
    EXPECT_TRUE(reader.contains(name));
    expect_same(reader.tensor(name), want, name);
  }
  EXPECT_EQ(reader.info("big").shape, (std::vector<int64_t>{100}));
}

TEST(Safetensors, SingleShardCheckpointReplacesStaleIndex) {
  TempDir dir;
  mole::st::save_checkpoint(dir.path(), {{"a", at::randn({40})}, {"b", at::randn({40})}}, 200);
  EXPECT_TRUE(fs::exists(dir.file("model.safetensors.index.json")));
  const Named tensors = {{"a", at::randn({4})}, {"b", at::randn({4})}};
  mole::st::save_checkpoint(dir.path(), tensors, 1 << 20);
  EXPECT_TRUE(fs::exists(dir.file("model.safetensors")));
  EXPECT_FALSE(fs::exists(dir.file("model.safetensors.index.json")));
  CheckpointReader reader(dir.path());
  expect_same(reader.tensor("a"), tensors[0].second, "a");
  expect_same(reader.tensor("b"), tensors[1].second, "b");
}

TEST(Safetensors, ReaderAcceptsAFilePath) {
  TempDir dir;
  const std::string path = dir.file("single.safetensors");
  mole::st::save_file(path, {{"z", at::zeros({2, 2})}});
  CheckpointReader reader(path);
  EXPECT_EQ(reader.names(), std::vector<std::string>{"z"});
  EXPECT_EQ(reader.tensor("z").sum().item<float>(), 0.0f);
}

TEST(Safetensors, ReadsTinyLlamaFixture) {
  const std::string base = mole::test::tiny_llama_dir() + "/base";
  SafetensorsFile file(base + "/model.safetensors");
  EXPECT_EQ(file.header().metadata.at("format"), "pt");
  const mole::st::TensorInfo* embed = file.header().find("model.embed_tokens.weight");
  ASSERT_NE(embed, nullptr);
  EXPECT_EQ(embed->dtype, mole::st::Dtype::F32);
  EXPECT_EQ(embed->shape, (std::vector<int64_t>{256, 64}));

  CheckpointReader reader(base);
  const at::Tensor t = reader.tensor("model.embed_tokens.weight");
  EXPECT_EQ(t.scalar_type(), at::kFloat);
  EXPECT_EQ(t.sizes(), (std::vector<int64_t>{256, 64}));
  EXPECT_TRUE(t.isfinite().all().item<bool>());
  EXPECT_GT(t.abs().sum().item<float>(), 0.0f);
  for (const std::string& name : reader.names()) {
    EXPECT_EQ(reader.tensor(name).numel(), reader.info(name).numel()) << name;
  }
}

TEST(Safetensors, ReadsEveryFixtureFile) {
  const std::string root = mole::test::tiny_llama_dir();
  for (const char* rel : {"/mixlora/adapter_model.safetensors",
                          "/peft_lora/adapter_model.safetensors", "/reference.safetensors"}) {
    SafetensorsFile file(root + rel);
    EXPECT_FALSE(file.names().empty()) << rel;
    for (const std::string& name : file.names()) {
      EXPECT_EQ(file.tensor(name).numel(), file.header().find(name)->numel()) << rel << " " << name;
    }
  }
}

// ---- malformed files: every error names the file and what was wrong ----

TEST(SafetensorsBad, EmptyFile) {
  TempDir dir;
  const std::string path = dir.file("empty.safetensors");
  write_bytes(path, "");
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(path); }, {path, "empty"}));
}

TEST(SafetensorsBad, ShorterThanEightBytes) {
  TempDir dir;
  const std::string path = dir.file("short.safetensors");
  write_bytes(path, "abc");
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(path); }, {path, "3 bytes", "too short"}));
}

TEST(SafetensorsBad, HeaderLengthPastEndOfFile) {
  TempDir dir;
  const std::string path = dir.file("past.safetensors");
  write_bytes(path, le64(1000) + "{}");
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(path); },
                         {path, "header length 1000", "past the end of the file", "10 bytes"}));
}

TEST(SafetensorsBad, HeaderLongerThanLimit) {
  TempDir dir;
  const std::string path = dir.file("huge.safetensors");
  write_bytes(path, le64(200ull << 20) + "{}");
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(path); }, {path, "209715200", "104857600"}));
  // The parser checks before it reads: a length of 2^64-1 must not wrap around.
  const std::string max = le64(~0ull) + "{}";
  EXPECT_TRUE(fails_with(
      [&] {
        mole::st::parse_header(reinterpret_cast<const uint8_t*>(max.data()), max.size(), "m");
      },
      {"m: header length 18446744073709551615"}));
}

TEST(SafetensorsBad, HeaderNotJson) {
  TempDir dir;
  const std::string a = write_image(dir, "garbage.safetensors", "{not json at all");
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(a); }, {a, "not valid JSON"}));
  const std::string b = write_image(dir, "trailing.safetensors", "{} x");
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(b); }, {b, "not valid JSON"}));
  const std::string c = write_image(dir, "latin1.safetensors", "{\"\xe9\":1}");
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(c); }, {c, "not valid JSON"}));
}

TEST(SafetensorsBad, HeaderIsNotAnObject) {
  TempDir dir;
  const std::string a = write_image(dir, "array.safetensors", "[1,2,3]");
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(a); }, {a, "not a JSON object"}));
  const std::string b = write_image(dir, "zero.safetensors", "");
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(b); }, {b, "not a JSON object"}));
}

TEST(SafetensorsBad, UnknownDtype) {
  TempDir dir;
  const std::string path = write_image(dir, "dtype.safetensors",
                                       R"({"w":{"dtype":"F31","shape":[1],"data_offsets":[0,4]}})",
                                       std::string(4, '\0'));
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(path); }, {path, "'w'", "unknown dtype 'F31'"}));
}

TEST(SafetensorsBad, NegativeDimension) {
  TempDir dir;
  const std::string path = write_image(
      dir, "neg.safetensors", R"({"w":{"dtype":"F32","shape":[-1,2],"data_offsets":[0,8]}})",
      std::string(8, '\0'));
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(path); }, {path, "'w'", "non-negative", "-1"}));
}

TEST(SafetensorsBad, WrongJsonTypes) {
  TempDir dir;
  const std::pair<std::string, std::string> cases[] = {
      {R"({"w":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", "\"2\""},
      {R"({"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", "2.0"},
      {R"({"w":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", "shape must be an array"},
      {R"({"w":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", "dtype must be a string"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":"0,8"}})", "data_offsets"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8,9]}})", "data_offsets"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,-8]}})", "-8"},
      {R"({"w":{"dtype":"F32","shape":[2]}})", "missing \"data_offsets\""},
      {R"({"w":[1,2]})", "must be an object"},
      {R"({"__metadata__":{"k":1}})", "'k'"},
      {R"({"__metadata__":["a"]})", "__metadata__ must be an object"},
  };
  int i = 0;
  for (const auto& [header, expect] : cases) {
    const std::string path = write_image(dir, "types" + std::to_string(i++) + ".safetensors",
                                         header, std::string(8, '\0'));
    EXPECT_TRUE(fails_with([&] { SafetensorsFile f(path); }, {path, expect})) << header;
  }
}

TEST(SafetensorsBad, DeeplyNestedJsonIsAnErrorNotACrash) {
  // Found by the fuzzer: describing a nested value in the message must not recurse.
  TempDir dir;
  const size_t depth = 1000000;
  const std::string header =
      R"({"w":{"dtype":"F32","shape":)" + std::string(depth, '[') + std::string(depth, ']') + "}}";
  const std::string path = write_image(dir, "deep.safetensors", header);
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(path); }, {path, "'w'", "an array of 1"}));
}

TEST(SafetensorsBad, ShapeDisagreesWithByteRange) {
  TempDir dir;
  const std::string path = write_image(
      dir, "model.safetensors",
      R"({"a.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", std::string(20, '\0'));
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(path); },
                         {path, "'a.weight'", "[2, 3]", "6 x F32 = 24 bytes", "span 20 bytes"}));
}

TEST(SafetensorsBad, ShapeOverflow) {
  TempDir dir;
  const std::string path = write_image(
      dir, "overflow.safetensors",
      R"({"w":{"dtype":"F64","shape":[4294967296,4294967296,2],"data_offsets":[0,0]}})");
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(path); }, {path, "'w'", "overflow"}));
}

TEST(SafetensorsBad, OffsetsPastEndOfData) {
  TempDir dir;
  const std::string path = write_image(dir, "short-data.safetensors",
                                       R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                                       std::string(4, '\0'));
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(path); }, {path, "'w'", "[0, 8]", "(4 bytes)"}));
}

TEST(SafetensorsBad, OverlappingRanges) {
  TempDir dir;
  const std::string path = write_image(dir, "overlap.safetensors",
                                       R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                       std::string(12, '\0'));
  EXPECT_TRUE(
      fails_with([&] { SafetensorsFile f(path); }, {path, "'b'", "[4, 12]", "overlap", "'a'"}));
}

TEST(SafetensorsBad, HoleBetweenTensors) {
  TempDir dir;
  const std::string path = write_image(dir, "hole.safetensors",
                                       R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                       R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                                       std::string(12, '\0'));
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(path); }, {path, "hole", "[4, 8)", "'b'"}));
}

TEST(SafetensorsBad, TrailingUnusedData) {
  TempDir dir;
  const std::string path = write_image(dir, "trailing.safetensors",
                                       R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                                       std::string(9, '\0'));
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(path); },
                         {path, "9 bytes", "cover only 4", "5 trailing"}));
}

TEST(SafetensorsBad, BeginAfterEnd) {
  TempDir dir;
  const std::string path = write_image(dir, "reversed.safetensors",
                                       R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})",
                                       std::string(8, '\0'));
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(path); }, {path, "'w'", "[8, 4]"}));
}

TEST(SafetensorsBad, TruncatedFile) {
  TempDir dir;
  const std::string good = dir.file("good.safetensors");
  mole::st::save_file(good, {{"first", at::randn({8})}, {"last", at::randn({8})}});
  const std::string bytes = read_bytes(good);

  const std::string cut = dir.file("cut.safetensors");
  write_bytes(cut, bytes.substr(0, bytes.size() - 5));
  EXPECT_TRUE(fails_with([&] { SafetensorsFile f(cut); }, {cut, "'last'", "past the end"}));

  const std::string cut_header = dir.file("cut-header.safetensors");
  write_bytes(cut_header, bytes.substr(0, 20));
  EXPECT_TRUE(
      fails_with([&] { SafetensorsFile f(cut_header); }, {cut_header, "past the end of the file"}));
}

TEST(SafetensorsBad, UnsupportedDtypeParsesButCannotLoad) {
  TempDir dir;
  const std::string path = write_image(dir, "u16.safetensors",
                                       R"({"u":{"dtype":"U16","shape":[2],"data_offsets":[0,4]}})",
                                       std::string(4, '\0'));
  SafetensorsFile file(path);
  ASSERT_TRUE(file.contains("u"));
  EXPECT_EQ(file.header().find("u")->dtype, mole::st::Dtype::U16);
  EXPECT_TRUE(fails_with([&] { file.tensor("u"); }, {"dtype U16", "'u'", path, "not supported"}));
}

TEST(SafetensorsBad, MissingTensor) {
  TempDir dir;
  const std::string path =
      write_image(dir, "model.safetensors", kTwoTensors, std::string(16, '\0'));
  EXPECT_TRUE(fails_with([&] { SafetensorsFile(path).tensor("nope"); }, {"'nope'", path}));
  CheckpointReader reader(dir.path());
  EXPECT_TRUE(fails_with([&] { reader.tensor("model.layers.9.w"); },
                         {"tensor 'model.layers.9.w' not found in checkpoint", dir.path()}));
  EXPECT_TRUE(fails_with([&] { reader.info("ghost"); }, {"'ghost'", dir.path()}));
}

TEST(SafetensorsBad, FolderWithoutCheckpoint) {
  TempDir dir;
  EXPECT_TRUE(fails_with([&] { CheckpointReader r(dir.path()); },
                         {"no model.safetensors or model.safetensors.index.json in", dir.path()}));
  EXPECT_TRUE(fails_with([&] { CheckpointReader r(dir.file("absent")); },
                         {dir.file("absent"), "does not exist"}));
}

TEST(SafetensorsBad, IndexPointsToMissingShard) {
  TempDir dir;
  write_image(dir, "s1.safetensors", kTwoTensors, std::string(16, '\0'));
  const std::string index = dir.file("model.safetensors.index.json");
  write_bytes(index, R"({"weight_map":{"a":"s1.safetensors","b":"s1.safetensors",)"
                     R"("c":"model-00002-of-00002.safetensors"}})");
  EXPECT_TRUE(fails_with([&] { CheckpointReader r(dir.path()); },
                         {"model-00002-of-00002.safetensors", "'c'", index, "does not exist"}));
}

TEST(SafetensorsBad, IndexNamesTensorTheShardLacks) {
  TempDir dir;
  write_image(dir, "s1.safetensors", kTwoTensors, std::string(16, '\0'));
  const std::string index = dir.file("model.safetensors.index.json");
  write_bytes(index, R"({"weight_map":{"a":"s1.safetensors","ghost":"s1.safetensors"}})");
  EXPECT_TRUE(fails_with([&] { CheckpointReader r(dir.path()); },
                         {"'ghost'", "s1.safetensors", index, "does not contain"}));
}

TEST(SafetensorsBad, TensorInTwoShards) {
  TempDir dir;
  write_image(dir, "s1.safetensors", kTwoTensors, std::string(16, '\0'));
  mole::st::save_file(dir.file("s2.safetensors"), {{"b", at::ones({2})}, {"c", at::ones({1})}});
  write_bytes(dir.file("model.safetensors.index.json"),
              R"({"weight_map":{"a":"s1.safetensors","c":"s2.safetensors"}})");
  EXPECT_TRUE(fails_with([&] { CheckpointReader r(dir.path()); },
                         {"'b'", "two shards", "s1.safetensors", "s2.safetensors"}));
}

TEST(SafetensorsBad, MalformedIndex) {
  TempDir dir;
  const std::string index = dir.file("model.safetensors.index.json");
  write_bytes(index, R"({"weight_map": )");
  EXPECT_TRUE(fails_with([&] { CheckpointReader r(dir.path()); }, {index, "not valid JSON"}));
  write_bytes(index, R"({"metadata": {}})");
  EXPECT_TRUE(fails_with([&] { CheckpointReader r(dir.path()); }, {index, "weight_map"}));
  write_bytes(index, R"({"weight_map": {"a": 3}})");
  EXPECT_TRUE(fails_with([&] { CheckpointReader r(dir.path()); }, {index, "'a'"}));
}

TEST(SafetensorsBad, SaveRejectsBadNamesAndDtypes) {
  TempDir dir;
  const std::string path = dir.file("out.safetensors");
  const at::Tensor t = at::ones({2});
  EXPECT_TRUE(fails_with(
      [&] {
        mole::st::save_file(path, {{"a", t}, {"a", t}});
      },
      {path, "'a'", "twice"}));
  EXPECT_TRUE(fails_with([&] { mole::st::save_file(path, {{"", t}}); }, {path, "empty"}));
  EXPECT_TRUE(fails_with(
      [&] {
        mole::st::save_file(path, {{"__metadata__", t}});
      },
      {path, "reserved"}));
  EXPECT_TRUE(fails_with(
      [&] {
        mole::st::save_file(path, {{"c", at::ones({2}, at::kComplexFloat)}});
      },
      {path, "'c'", "cannot store"}));
  EXPECT_TRUE(fails_with(
      [&] {
        mole::st::save_checkpoint(dir.file("ck"), {{"x", t}, {"x", t}}, 4);
      },
      {"'x'", "twice"}));
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

TEST(SafetensorsBad, SaveIntoMissingFolder) {
  TempDir dir;
  const std::string path = dir.file("no/such/folder/out.safetensors");
  EXPECT_TRUE(fails_with(
      [&] {
        mole::st::save_file(path, {{"a", at::ones({2})}});
      },
      {path, "No such file or directory"}));
}

TEST(Safetensors, SaveLeavesNoTemporaryFiles) {
  TempDir dir;
  mole::st::save_file(dir.file("a.safetensors"), {{"a", at::ones({3})}});
  mole::st::save_file(dir.file("a.safetensors"), {{"a", at::zeros({3})}});  // overwrite
  std::vector<std::string> entries;
  for (const auto& e : fs::directory_iterator(dir.path())) entries.push_back(e.path().filename());
  EXPECT_EQ(entries, std::vector<std::string>{"a.safetensors"});
  EXPECT_EQ(SafetensorsFile(dir.file("a.safetensors")).tensor("a").sum().item<float>(), 0.0f);
}
