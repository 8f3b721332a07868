// Writes that leave whole files or none: a file written through a temporary and a rename, a
// folder built aside and moved into place, and a log that grows by whole lines only. Every write
// is checked; a failure (a full disk, a file-size limit) is a mole::Error naming the file and the
// system's reason, and leaves what was there before untouched.
#pragma once

#include <cstdio>
#include <functional>
#include <string>

namespace mole::ckpt {

// `<path>.tmp.<pid>` in the same folder, fsync, rename over `path`. The temporary file is removed
// if anything fails before the rename.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t size);
  void commit();

 private:
  std::string path_;
  std::string tmp_;
  std::FILE* file_ = nullptr;
  bool committed_ = false;
};

// Makes renames and new entries in folder `dir` durable (fsync of the folder; best effort).
void sync_folder(const std::string& dir);

// `bytes` to `path` through an AtomicFile.
void write_file_atomic(const std::string& path, const std::string& bytes);

// Writes a set of files into `dir` all or nothing: `write` fills a fresh temporary folder next to
// (or, when `dir` exists, inside) `dir`; only when it returns are the files moved into place — the
// whole folder renamed when `dir` is new, else each file renamed over its namesake in `dir`
// (other files there are left alone). On failure the temporary folder is removed and `dir` is as
// it was.
void write_files_atomic(const std::string& dir, const std::function<void(const std::string&)>& write);

// An append-only log (metrics.jsonl, TensorBoard events) that only ever holds whole entries: an
// entry that cannot be written whole is cut back off the file and reported.
class AppendLog {
 public:
  explicit AppendLog(std::string path);  // created if missing; appended to otherwise
  ~AppendLog();
  AppendLog(const AppendLog&) = delete;
  AppendLog& operator=(const AppendLog&) = delete;

  // Appends `bytes` whole, or throws naming the file and leaves it as it was.
  void append(const std::string& bytes);
  void append_line(const std::string& line) { append(line + "\n"); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
};

}  // namespace mole::ckpt
