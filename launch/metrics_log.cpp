// TensorBoard event files without TensorFlow: Event protobufs in TFRecord framing (masked
// CRC-32C record checksums).
#include "launch/metrics_log.h"

#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <limits>
#include <system_error>
#include <vector>

#include "checkpoint/atomic_file.h"
#include "checkpoint/checksum.h"
#include "kernels/check.h"
#include "proto/tensorboard_event.pb.h"

namespace mole::launch {
namespace {

constexpr uint32_t kMaskDelta = 0xa282ead8u;
constexpr size_t kHeaderBytes = 8 + 4;  // length + masked CRC of the length
constexpr size_t kFooterBytes = 4;      // masked CRC of the payload

double unix_seconds_now() {
  const auto since_epoch = std::chrono::system_clock::now().time_since_epoch();
  return std::chrono::duration<double>(since_epoch).count();
}

std::string host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof(buf) - 1) != 0 || buf[0] == '\0') return "localhost";
  return buf;
}

void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xffu));
}

uint64_t get_le(const std::string& in, size_t offset, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) {
    v |= static_cast<uint64_t>(static_cast<unsigned char>(in[offset + i])) << (8 * i);
  }
  return v;
}

}  // namespace

uint32_t masked_crc32c(const void* data, size_t size) {
  const uint32_t crc = ckpt::crc32c(data, size);
  return ((crc >> 15) | (crc << 17)) + kMaskDelta;
}

TensorBoardWriter::TensorBoardWriter(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  MOLE_CHECK(!ec && std::filesystem::is_directory(dir), "cannot create TensorBoard log folder ",
             dir, (ec ? ": " + ec.message() : std::string()));
  const double now = unix_seconds_now();
  path_ = (std::filesystem::path(dir) /
           ("events.out.tfevents." + std::to_string(static_cast<int64_t>(now)) + "." +
            host_name() + "." + std::to_string(::getpid()) + ".mole"))
              .string();
  out_ = std::make_unique<ckpt::AppendLog>(path_);

  tb::Event event;
  event.set_wall_time(now);
  event.set_file_version("brain.Event:2");
  std::string payload;
  MOLE_CHECK(event.SerializeToString(&payload), "cannot serialize the file_version event for ",
             path_);
  write_record(payload);
  flush();
}

TensorBoardWriter::~TensorBoardWriter() {
  try {
    flush();
  } catch (const Error&) {
    // Reported by the flush the owner made; a destructor cannot report it again.
  }
}

void TensorBoardWriter::add_scalar(const std::string& tag, int64_t step, double value) {
  tb::Event event;
  event.set_wall_time(unix_seconds_now());
  event.set_step(step);
  tb::SummaryValue* v = event.mutable_summary()->add_value();
  v->set_tag(tag);
  v->set_simple_value(static_cast<float>(value));
  std::string payload;
  MOLE_CHECK(event.SerializeToString(&payload), "cannot serialize scalar '", tag, "' for ", path_);
  write_record(payload);
}

void TensorBoardWriter::add_restart(int64_t step) {
  tb::Event event;
  event.set_wall_time(unix_seconds_now());
  event.set_step(step);
  event.mutable_session_log()->set_status(tb::SessionLog::START);
  std::string payload;
  MOLE_CHECK(event.SerializeToString(&payload), "cannot serialize the restart event for ", path_);
  write_record(payload);
}

void TensorBoardWriter::flush() {
  if (pending_.empty()) return;
  std::string records;
  records.swap(pending_);
  out_->append(records);
}

void TensorBoardWriter::write_record(const std::string& payload) {
  std::string length;
  put_le(length, payload.size(), 8);
  std::string record = length;
  record.reserve(kHeaderBytes + payload.size() + kFooterBytes);
  put_le(record, masked_crc32c(length.data(), length.size()), 4);
  record += payload;
  put_le(record, masked_crc32c(payload.data(), payload.size()), 4);
  pending_ += record;
}

TensorBoardEvents read_tensorboard_events(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MOLE_CHECK(in.is_open(), "cannot open TensorBoard event file ", path);
  const std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  MOLE_CHECK(!in.bad(), "cannot read TensorBoard event file ", path);

  TensorBoardEvents events;
  size_t offset = 0;
  while (offset < bytes.size()) {
    const size_t left = bytes.size() - offset;
    MOLE_CHECK(left >= kHeaderBytes, path, ": truncated record header at byte offset ", offset,
               " (", left, " bytes left, need ", kHeaderBytes, ")");
    const uint64_t length = get_le(bytes, offset, 8);
    const uint32_t length_crc = static_cast<uint32_t>(get_le(bytes, offset + 8, 4));
    MOLE_CHECK(length_crc == masked_crc32c(bytes.data() + offset, 8), path,
               ": length CRC mismatch in record at byte offset ", offset);
    MOLE_CHECK(length <= left - kHeaderBytes && left - kHeaderBytes - length >= kFooterBytes,
               path, ": truncated record at byte offset ", offset, " (payload of ", length,
               " bytes, ", left, " bytes left in the file)");
    const size_t payload_at = offset + kHeaderBytes;
    const size_t payload_size = static_cast<size_t>(length);
    const uint32_t payload_crc =
        static_cast<uint32_t>(get_le(bytes, payload_at + payload_size, 4));
    MOLE_CHECK(payload_crc == masked_crc32c(bytes.data() + payload_at, payload_size), path,
               ": payload CRC mismatch in record at byte offset ", offset);

    MOLE_CHECK(payload_size <= static_cast<size_t>(std::numeric_limits<int>::max()), path,
               ": record at byte offset ", offset, " is too large (", payload_size, " bytes)");
    tb::Event event;
    MOLE_CHECK(event.ParseFromArray(bytes.data() + payload_at, static_cast<int>(payload_size)),
               path, ": record at byte offset ", offset, " is not a valid Event protobuf");
    if (event.what_case() == tb::Event::kSummary) {
      for (const tb::SummaryValue& v : event.summary().value()) {
        events.scalars.push_back({v.tag(), event.step(), static_cast<double>(v.simple_value())});
      }
    } else if (event.what_case() == tb::Event::kSessionLog &&
               event.session_log().status() == tb::SessionLog::START) {
      events.restarts.push_back(event.step());
    }
    offset = payload_at + payload_size + kFooterBytes;
  }
  return events;
}

std::vector<ScalarEvent> read_tensorboard_scalars(const std::string& path) {
  return read_tensorboard_events(path).scalars;
}

}  // namespace mole::launch
