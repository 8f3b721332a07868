// Run logs on rank 0: `metrics.jsonl` (one JSON object per logged step) and TensorBoard event
// files (`events.out.tfevents.*`: TFRecord-framed Event protobufs with scalar summaries), written
// without TensorFlow.
#pragma once

#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace mole::ckpt {
class AppendLog;
}  // namespace mole::ckpt

namespace mole::launch {

// TensorBoard event file in `dir` (created if missing): a file_version event first, then scalar
// events. Each record is length + masked CRC32C of the length, payload + masked CRC32C of the
// payload, as TFRecord specifies. Scalars are held until flush(), which appends them whole or not
// at all (a failed write never leaves a cut record).
class TensorBoardWriter {
 public:
  explicit TensorBoardWriter(const std::string& dir);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  void add_scalar(const std::string& tag, int64_t step, double value);
  // A SessionLog START event at `step`: the run continues from a checkpoint here, and TensorBoard
  // drops the events of steps >= `step` that earlier files hold (what the stopped run logged
  // after its checkpoint), so no step is shown twice.
  void add_restart(int64_t step);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& payload);
  std::string path_;
  std::unique_ptr<ckpt::AppendLog> out_;
  std::string pending_;
};

// One scalar event read back from an event file (for tests and `mole inspect`).
struct ScalarEvent {
  std::string tag;
  int64_t step = 0;
  double value = 0.0;
};
// Reads every scalar event of a file, verifying both CRCs of every record; throws mole::Error
// naming the file and the record offset on corruption.
std::vector<ScalarEvent> read_tensorboard_scalars(const std::string& path);
// The same, with the steps of restart events (TensorBoardWriter::add_restart).
struct TensorBoardEvents {
  std::vector<ScalarEvent> scalars;
  std::vector<int64_t> restarts;
};
TensorBoardEvents read_tensorboard_events(const std::string& path);

// TFRecord's masking of a CRC-32C.
uint32_t masked_crc32c(const void* data, size_t size);

}  // namespace mole::launch
