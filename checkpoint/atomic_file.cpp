// Whole-file and whole-line writes (see atomic_file.h).
#include "checkpoint/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "kernels/check.h"

namespace mole::ckpt {
namespace {

namespace fs = std::filesystem;

std::string errno_text() { return std::strerror(errno); }

std::string pid_suffix() { return ".tmp." + std::to_string(::getpid()); }

}  // namespace

void sync_folder(const std::string& dir) {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)), tmp_(path_ + pid_suffix()) {
  file_ = std::fopen(tmp_.c_str(), "wb");
  MOLE_CHECK(file_ != nullptr, "cannot create '", tmp_, "' to write '", path_, "': ", errno_text());
}

AtomicFile::~AtomicFile() {
  if (file_) std::fclose(file_);
  if (!committed_) std::remove(tmp_.c_str());
}

void AtomicFile::write(const void* data, size_t size) {
  if (size == 0) return;
  MOLE_CHECK(std::fwrite(data, 1, size, file_) == size, "cannot write '", path_, "' (via '", tmp_,
             "'): ", errno_text());
}

void AtomicFile::commit() {
  MOLE_CHECK(std::fflush(file_) == 0 && ::fsync(::fileno(file_)) == 0, "cannot write '", path_,
             "' (via '", tmp_, "'): ", errno_text());
  const int closed = std::fclose(file_);
  file_ = nullptr;
  MOLE_CHECK(closed == 0, "cannot write '", path_, "' (via '", tmp_, "'): ", errno_text());
  MOLE_CHECK(std::rename(tmp_.c_str(), path_.c_str()) == 0, "cannot rename '", tmp_, "' to '",
             path_, "': ", errno_text());
  committed_ = true;
  sync_folder(fs::path(path_).parent_path().string());
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  AtomicFile out(path);
  out.write(bytes.data(), bytes.size());
  out.commit();
}

void write_files_atomic(const std::string& dir, const std::function<void(const std::string&)>& write) {
  const fs::path target = fs::path(dir).lexically_normal();
  std::error_code ec;
  const bool exists = fs::is_directory(target, ec);
  MOLE_CHECK(exists || !fs::exists(target, ec), "'", dir, "' exists and is not a folder");
  const fs::path tmp = exists ? target / (".mole" + pid_suffix())
                              : fs::path(target.string() + pid_suffix());
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  MOLE_CHECK(!ec, "cannot create '", tmp.string(), "' to write '", dir, "': ", ec.message());
  try {
    write(tmp.string());
    if (!exists) {
      fs::rename(tmp, target, ec);
      MOLE_CHECK(!ec, "cannot rename '", tmp.string(), "' to '", dir, "': ", ec.message());
    } else {
      for (const fs::directory_entry& entry : fs::directory_iterator(tmp)) {
        fs::rename(entry.path(), target / entry.path().filename(), ec);
        MOLE_CHECK(!ec, "cannot move '", entry.path().string(), "' into '", dir, "': ", ec.message());
      }
      fs::remove_all(tmp, ec);
    }
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);
    throw;
  }
  sync_folder(exists ? target.string() : target.parent_path().string());
}

AppendLog::AppendLog(std::string path) : path_(std::move(path)) {
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  MOLE_CHECK(fd_ >= 0, "cannot open '", path_, "' for appending: ", errno_text());
}

AppendLog::~AppendLog() {
  if (fd_ >= 0) ::close(fd_);
}

void AppendLog::append(const std::string& bytes) {
  struct stat st {};
  const off_t before = ::fstat(fd_, &st) == 0 ? st.st_size : -1;
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd_, bytes.data() + done, bytes.size() - done);
    if (n > 0) {
      done += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    const std::string reason = n < 0 ? errno_text() : "nothing written";
    // Cut the partial entry back off, so the file holds whole entries only.
    if (done > 0 && before >= 0 && ::ftruncate(fd_, before) != 0) {
      MOLE_FAIL("cannot append to '", path_, "': ", reason, "; removing the partial entry also "
                "failed (", errno_text(), "): its end is cut");
    }
    MOLE_FAIL("cannot append to '", path_, "': ", reason);
  }
}

}  // namespace mole::ckpt
