// Tests of the TensorBoard event writer/reader: CRC32C vectors, TFRecord framing checked on raw
// bytes, scalar round trips, and corruption / truncation / unwritable-path errors.
#include <gtest/gtest.h>

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/checksum.h"
#include "kernels/check.h"
#include "launch/metrics_log.h"
#include "proto/tensorboard_event.pb.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using mole::launch::masked_crc32c;
using mole::launch::read_tensorboard_scalars;
using mole::launch::ScalarEvent;
using mole::launch::TensorBoardWriter;
using mole::test::read_bytes;
using mole::test::TempDir;
using mole::test::write_bytes;

namespace {

uint32_t crc_of(const std::string& s) { return mole::ckpt::crc32c(s.data(), s.size()); }

uint64_t le(const std::string& bytes, size_t offset, int width) {
  uint64_t v = 0;
  for (int i = 0; i < width; ++i) {
    v |= static_cast<uint64_t>(static_cast<unsigned char>(bytes.at(offset + i))) << (8 * i);
  }
  return v;
}

// One record located in a raw file image.
struct RawRecord {
  size_t offset = 0;  // of the length field
  std::string length_bytes;
  uint32_t length_crc = 0;
  std::string payload;
  uint32_t payload_crc = 0;
};

// Splits a file image into records by the framing alone (no CRC checks, no protobuf).
std::vector<RawRecord> split_records(const std::string& bytes) {
  std::vector<RawRecord> records;
  size_t offset = 0;
  while (offset < bytes.size()) {
    RawRecord r;
    r.offset = offset;
    r.length_bytes = bytes.substr(offset, 8);
    const uint64_t length = le(bytes, offset, 8);
    r.length_crc = static_cast<uint32_t>(le(bytes, offset + 8, 4));
    r.payload = bytes.substr(offset + 12, length);
    r.payload_crc = static_cast<uint32_t>(le(bytes, offset + 12 + length, 4));
    records.push_back(r);
    offset += 12 + length + 4;
  }
  EXPECT_EQ(offset, bytes.size()) << "records do not tile the file";
  return records;
}

// The message of the mole::Error that `fn` throws ("" and a test failure if none).
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const mole::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected mole::Error";
  return "";
}

double as_float(double v) { return static_cast<double>(static_cast<float>(v)); }

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

const std::vector<ScalarEvent> kScalars = {
    {"train/loss", 0, 2.718281828459045},
    {"train/lr", 0, 3e-4},
    {"train/loss", 1, 2.5},
    {"train/aux_loss", 1, -0.125},
    {"train/grad_norm", 2, -1.0e-7},
    {"train/tokens", 7, 1.0e12},
    {"eval/loss", 1000000000000LL, 0.1},
    {"train/loss", -3, 0.0},
};

// Writes kScalars into a fresh event file in `dir` and returns its path.
std::string write_sample(const std::string& dir) {
  TensorBoardWriter writer(dir);
  for (const auto& s : kScalars) writer.add_scalar(s.tag, s.step, s.value);
  return writer.path();
}

}  // namespace

TEST(Crc32c, StandardCheckValue) {
  EXPECT_EQ(crc_of("123456789"), 0xE3069283u);
  EXPECT_EQ(mole::ckpt::crc32c(nullptr, 0), 0u);
}

TEST(Crc32c, Rfc3720Vectors) {
  EXPECT_EQ(crc_of(std::string(32, '\0')), 0x8A9136AAu);
  EXPECT_EQ(crc_of(std::string(32, '\xff')), 0x62A8AB43u);
  std::string ascending(32, '\0');
  for (int i = 0; i < 32; ++i) ascending[i] = static_cast<char>(i);
  EXPECT_EQ(crc_of(ascending), 0x46DD794Eu);
}

TEST(Crc32c, MaskedFollowsTfRecordFormula) {
  for (const std::string& s : {std::string(), std::string("123456789"), std::string(32, '\0'),
                              std::string("brain.Event:2")}) {
    const uint32_t crc = crc_of(s);
    const uint32_t expected = ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
    EXPECT_EQ(masked_crc32c(s.data(), s.size()), expected) << "input '" << s << "'";
  }
  // 0xE3069283 rotated right by 15 is 0x2507C60D; plus the delta (mod 2^32).
  EXPECT_EQ(masked_crc32c("123456789", 9), 0xC78AB0E5u);
}

TEST(TensorBoard, ScalarsRoundTripAtFloatPrecision) {
  TempDir tmp;
  const std::string path = write_sample(tmp.path());
  const auto read = read_tensorboard_scalars(path);
  ASSERT_EQ(read.size(), kScalars.size());
  for (size_t i = 0; i < kScalars.size(); ++i) {
    EXPECT_EQ(read[i].tag, kScalars[i].tag) << i;
    EXPECT_EQ(read[i].step, kScalars[i].step) << i;
    EXPECT_EQ(read[i].value, as_float(kScalars[i].value)) << i;
  }
}

// A restart event reads back at its step, between the scalars around it; TensorBoard parses it
// as SessionLog START (field 7 of Event, status 1).
TEST(TensorBoard, RestartEventRoundTrips) {
  TempDir tmp;
  std::string path;
  {
    TensorBoardWriter writer(tmp.path());
    writer.add_scalar("train/loss", 6, 1.5);
    writer.add_restart(7);
    writer.add_scalar("train/loss", 7, 1.25);
    path = writer.path();
  }
  const mole::launch::TensorBoardEvents events = mole::launch::read_tensorboard_events(path);
  EXPECT_EQ(events.restarts, std::vector<int64_t>{7});
  ASSERT_EQ(events.scalars.size(), 2u);
  EXPECT_EQ(events.scalars[1].step, 7);
  const std::string bytes = read_bytes(path);
  // The third record's payload (after file_version and one scalar) is an Event with session_log.
  EXPECT_NE(bytes.find(std::string("\x3a\x02\x08\x01", 4)), std::string::npos)
      << "SessionLog{status: START} is field 7 of Event (tag 0x3a), status field 1 = 1";
}

TEST(TensorBoard, FileNameFollowsPattern) {
  TempDir tmp;
  const double before = now_seconds();
  std::string path;
  {
    TensorBoardWriter writer(tmp.path());
    path = writer.path();
  }
  const double after = now_seconds();
  EXPECT_EQ(fs::path(path).parent_path(), fs::path(tmp.path()));
  EXPECT_TRUE(fs::is_regular_file(path));
  const std::string name = fs::path(path).filename().string();
  std::smatch m;
  const std::regex pattern(R"(events\.out\.tfevents\.(\d+)\.(.+)\.(\d+)\.mole)");
  ASSERT_TRUE(std::regex_match(name, m, pattern)) << name;
  const double stamp = std::stod(m[1].str());
  EXPECT_GE(stamp, static_cast<double>(static_cast<int64_t>(before)));
  EXPECT_LE(stamp, after);
  EXPECT_FALSE(m[2].str().empty());
  EXPECT_EQ(std::stol(m[3].str()), static_cast<long>(::getpid()));
}

TEST(TensorBoard, CreatesMissingNestedFolders) {
  TempDir tmp;
  const std::string dir = tmp.file("runs/a/b/tb");
  std::string path;
  {
    TensorBoardWriter writer(dir);
    writer.add_scalar("x", 1, 1.5);
    path = writer.path();
  }
  EXPECT_TRUE(fs::is_directory(dir));
  const auto read = read_tensorboard_scalars(path);
  ASSERT_EQ(read.size(), 1u);
  EXPECT_EQ(read[0].tag, "x");
  EXPECT_EQ(read[0].value, 1.5);
}

TEST(TensorBoard, FirstRecordIsFileVersion) {
  TempDir tmp;
  const double before = now_seconds();
  const std::string path = write_sample(tmp.path());
  const auto records = split_records(read_bytes(path));
  ASSERT_FALSE(records.empty());
  mole::tb::Event event;
  ASSERT_TRUE(event.ParseFromString(records[0].payload));
  EXPECT_EQ(event.what_case(), mole::tb::Event::kFileVersion);
  EXPECT_EQ(event.file_version(), "brain.Event:2");
  EXPECT_EQ(event.step(), 0);
  EXPECT_GE(event.wall_time(), before - 1.0);
  EXPECT_LE(event.wall_time(), now_seconds() + 1.0);
}

TEST(TensorBoard, RawFramingOfEveryRecord) {
  TempDir tmp;
  const std::string path = write_sample(tmp.path());
  const std::string bytes = read_bytes(path);
  const auto records = split_records(bytes);
  ASSERT_EQ(records.size(), 1 + kScalars.size());
  for (size_t i = 0; i < records.size(); ++i) {
    const RawRecord& r = records[i];
    EXPECT_EQ(le(r.length_bytes, 0, 8), r.payload.size()) << "record " << i;
    EXPECT_EQ(r.length_crc, masked_crc32c(r.length_bytes.data(), 8)) << "record " << i;
    EXPECT_EQ(r.payload_crc, masked_crc32c(r.payload.data(), r.payload.size())) << "record " << i;
    mole::tb::Event event;
    ASSERT_TRUE(event.ParseFromString(r.payload)) << "record " << i;
    if (i == 0) continue;
    const ScalarEvent& want = kScalars[i - 1];
    ASSERT_EQ(event.what_case(), mole::tb::Event::kSummary) << "record " << i;
    ASSERT_EQ(event.summary().value_size(), 1);
    EXPECT_EQ(event.step(), want.step);
    EXPECT_EQ(event.summary().value(0).tag(), want.tag);
    EXPECT_EQ(event.summary().value(0).simple_value(), static_cast<float>(want.value));
    EXPECT_GT(event.wall_time(), 0.0);
  }
}

TEST(TensorBoard, FlushMakesScalarsReadableWhileOpen) {
  TempDir tmp;
  TensorBoardWriter writer(tmp.path());
  writer.add_scalar("a", 1, 1.0);
  writer.flush();
  EXPECT_EQ(read_tensorboard_scalars(writer.path()).size(), 1u);
  writer.add_scalar("a", 2, 2.0);
  writer.add_scalar("b", 2, 3.0);
  writer.flush();
  const auto read = read_tensorboard_scalars(writer.path());
  ASSERT_EQ(read.size(), 3u);
  EXPECT_EQ(read[2].tag, "b");
  EXPECT_EQ(read[2].value, 3.0);
}

TEST(TensorBoard, OnlyFileVersionReadsAsNoScalars) {
  TempDir tmp;
  std::string path;
  { path = TensorBoardWriter(tmp.path()).path(); }
  EXPECT_TRUE(read_tensorboard_scalars(path).empty());
  const std::string empty = tmp.file("empty");
  write_bytes(empty, "");
  EXPECT_TRUE(read_tensorboard_scalars(empty).empty());
}

TEST(TensorBoard, CorruptPayloadByteNamesCrcAndOffset) {
  TempDir tmp;
  const std::string path = write_sample(tmp.path());
  std::string bytes = read_bytes(path);
  const auto records = split_records(bytes);
  ASSERT_GE(records.size(), 3u);
  const RawRecord& victim = records[2];
  bytes[victim.offset + 12 + victim.payload.size() / 2] ^= 0x01;
  const std::string bad = tmp.file("corrupt.tfevents");
  write_bytes(bad, bytes);
  const std::string msg = error_of([&] { read_tensorboard_scalars(bad); });
  EXPECT_NE(msg.find("CRC"), std::string::npos) << msg;
  EXPECT_NE(msg.find("offset " + std::to_string(victim.offset)), std::string::npos) << msg;
  EXPECT_NE(msg.find(bad), std::string::npos) << msg;
}

TEST(TensorBoard, CorruptLengthOrChecksumIsDetected) {
  TempDir tmp;
  const std::string path = write_sample(tmp.path());
  const std::string good = read_bytes(path);
  const auto records = split_records(good);
  ASSERT_GE(records.size(), 2u);
  const size_t at = records[1].offset;
  // Flip a bit in the length, the length CRC, and the payload CRC in turn.
  for (const size_t pos : {at + 0, at + 9, at + 12 + records[1].payload.size() + 2}) {
    std::string bytes = good;
    bytes[pos] ^= 0x10;
    const std::string bad = tmp.file("bad-" + std::to_string(pos));
    write_bytes(bad, bytes);
    const std::string msg = error_of([&] { read_tensorboard_scalars(bad); });
    EXPECT_NE(msg.find("CRC"), std::string::npos) << "byte " << pos << ": " << msg;
    EXPECT_NE(msg.find("offset " + std::to_string(at)), std::string::npos) << msg;
  }
}

TEST(TensorBoard, TruncatedFileThrows) {
  TempDir tmp;
  const std::string path = write_sample(tmp.path());
  const std::string good = read_bytes(path);
  const auto records = split_records(good);
  const RawRecord& last = records.back();
  const size_t end = good.size();
  // Cut inside the header, inside the payload, and inside the trailing CRC.
  for (const size_t cut : {last.offset + 5, last.offset + 12 + last.payload.size() / 2, end - 1}) {
    const std::string bad = tmp.file("cut-" + std::to_string(cut));
    write_bytes(bad, good.substr(0, cut));
    const std::string msg = error_of([&] { read_tensorboard_scalars(bad); });
    EXPECT_NE(msg.find("truncated"), std::string::npos) << "cut " << cut << ": " << msg;
    EXPECT_NE(msg.find("offset " + std::to_string(last.offset)), std::string::npos) << msg;
  }
}

TEST(TensorBoard, MissingFileThrows) {
  TempDir tmp;
  const std::string missing = tmp.file("nope.tfevents");
  const std::string msg = error_of([&] { read_tensorboard_scalars(missing); });
  EXPECT_NE(msg.find(missing), std::string::npos) << msg;
}

TEST(TensorBoard, UncreatableFolderThrows) {
  TempDir tmp;
  const std::string file = tmp.file("plain-file");
  write_bytes(file, "not a folder");
  const std::string dir = file + "/tb";
  const std::string msg = error_of([&] { TensorBoardWriter writer(dir); });
  EXPECT_NE(msg.find(dir), std::string::npos) << msg;
  EXPECT_THROW(TensorBoardWriter{file}, mole::Error);
}
