// Writes that leave whole files or none, under real write failures: a full device (/dev/full)
// and the kernel's file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so writes fail with EFBIG).
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <string>

#include "checkpoint/atomic_file.h"
#include "kernels/check.h"
#include "launch/metrics_log.h"
#include "tests/test_util.h"

namespace mole {
namespace {

namespace fs = std::filesystem;

constexpr const char* kNoError = "<no error>";  // what test::error_of gives when nothing throws

// Files written while this lives cannot grow beyond `bytes`.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    getrlimit(RLIMIT_FSIZE, &saved_);
    old_handler_ = std::signal(SIGXFSZ, SIG_IGN);
    rlimit limit = saved_;
    limit.rlim_cur = bytes;
    EXPECT_EQ(setrlimit(RLIMIT_FSIZE, &limit), 0);
  }
  ~FileSizeLimit() {
    setrlimit(RLIMIT_FSIZE, &saved_);
    std::signal(SIGXFSZ, old_handler_);
  }

 private:
  rlimit saved_{};
  void (*old_handler_)(int) = SIG_DFL;
};

std::vector<std::string> lines_of(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

TEST(FileWrites, AppendOnAFullDeviceNamesTheFileAndTheReason) {
  ckpt::AppendLog log("/dev/full");
  const std::string err = test::error_of([&] { log.append_line("{\"step\": 1}"); });
  EXPECT_NE(err.find("cannot append to '/dev/full': No space left on device"), std::string::npos) << err;
}

TEST(FileWrites, AppendLogKeepsWholeLinesWhenTheFileCannotGrow) {
  test::TempDir dir;
  const std::string path = dir.file("metrics.jsonl");
  std::string error = kNoError;
  int written = 0;
  {
    FileSizeLimit limit(1000);
    ckpt::AppendLog log(path);
    const std::string line(45, 'x');  // 46 bytes with the newline: 1000 is not a multiple
    for (int i = 0; i < 100 && error == kNoError; ++i) {
      error = test::error_of([&] { log.append_line(line); });
      if (error == kNoError) ++written;
    }
  }
  EXPECT_NE(error.find("cannot append to '" + path + "': File too large"), std::string::npos) << error;
  EXPECT_EQ(written, 1000 / 46);
  EXPECT_EQ(fs::file_size(path), static_cast<uintmax_t>(written * 46));
  for (const std::string& line : lines_of(path)) EXPECT_EQ(line.size(), 45u);
}

TEST(FileWrites, AtomicFileLeavesTheOldFileWhenTheNewOneFails) {
  test::TempDir dir;
  const std::string path = dir.file("summary.json");
  ckpt::write_file_atomic(path, "{\"old\": true}\n");
  std::string error;
  {
    FileSizeLimit limit(64);
    error = test::error_of([&] { ckpt::write_file_atomic(path, std::string(200, ' ') + "{}"); });
  }
  EXPECT_NE(error.find("cannot write '" + path + "'"), std::string::npos) << error;
  EXPECT_NE(error.find("File too large"), std::string::npos) << error;
  EXPECT_EQ(test::read_bytes(path), "{\"old\": true}\n");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 1)
      << "a temporary file was left behind";
}

TEST(FileWrites, FilesLandTogetherOrNotAtAll) {
  test::TempDir dir;
  const std::string out = dir.file("adapter");
  // A new folder: built aside, renamed into place.
  ckpt::write_files_atomic(out, [](const std::string& tmp) {
    ckpt::write_file_atomic(tmp + "/a", "1");
    ckpt::write_file_atomic(tmp + "/b", "2");
  });
  EXPECT_EQ(test::read_bytes(out + "/a"), "1");
  test::write_bytes(out + "/notes.txt", "mine");
  // A failure half way: nothing of the new set lands, the folder is as it was.
  const std::string err = test::error_of([&] {
    ckpt::write_files_atomic(out, [](const std::string& tmp) {
      ckpt::write_file_atomic(tmp + "/a", "new");
      MOLE_FAIL("disk gone");
    });
  });
  EXPECT_EQ(err, "disk gone");
  EXPECT_EQ(test::read_bytes(out + "/a"), "1");
  EXPECT_EQ(std::distance(fs::directory_iterator(out), fs::directory_iterator()), 3);
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 1);
  // Into an existing folder: the named files are replaced, others kept.
  ckpt::write_files_atomic(out, [](const std::string& tmp) {
    ckpt::write_file_atomic(tmp + "/a", "3");
    ckpt::write_file_atomic(tmp + "/b", "4");
  });
  EXPECT_EQ(test::read_bytes(out + "/a"), "3");
  EXPECT_EQ(test::read_bytes(out + "/b"), "4");
  EXPECT_EQ(test::read_bytes(out + "/notes.txt"), "mine");
  EXPECT_EQ(std::distance(fs::directory_iterator(out), fs::directory_iterator()), 3);
  // A path that is a file is not a folder to write into.
  EXPECT_NE(test::error_of([&] { ckpt::write_files_atomic(out + "/a", [](const std::string&) {}); })
                .find("exists and is not a folder"),
            std::string::npos);
}

// TensorBoard events: a flush that cannot be written whole leaves the file readable (whole
// records only) and says so.
TEST(FileWrites, TensorBoardEventsStayReadableWhenTheFileCannotGrow) {
  test::TempDir dir;
  std::string path, error = kNoError;
  int flushed = 0;
  {
    launch::TensorBoardWriter tb(dir.path());
    path = tb.path();
    FileSizeLimit limit(fs::file_size(path) + 700);
    for (int step = 1; step <= 100 && error == kNoError; ++step) {
      tb.add_scalar("train/loss", step, 1.0 / step);
      tb.add_scalar("train/lr", step, 1e-3);
      error = test::error_of([&] { tb.flush(); });
      if (error == kNoError) ++flushed;
    }
  }
  EXPECT_NE(error.find("File too large"), std::string::npos) << error;
  EXPECT_GT(flushed, 0);
  const std::vector<launch::ScalarEvent> events = launch::read_tensorboard_scalars(path);
  EXPECT_EQ(static_cast<int>(events.size()), 2 * flushed);
}

}  // namespace
}  // namespace mole
