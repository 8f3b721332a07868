// Shared helpers for the test suite: fixture location, temporary folders, error metrics.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <string>

namespace mole::test {

// The reference fixtures folder (MOLE_FIXTURES env var, else the configured default). Fails the
// calling test with a clear message when it does not exist.
std::string fixtures_dir();
std::string tiny_llama_dir();  // fixtures_dir() + "/hf-tiny-llama"

// A number in scientific notation, for RecordProperty.
std::string sci(double value);

// ||x - ref|| / ||ref|| in float64.
double rel_error(const at::Tensor& x, const at::Tensor& ref);

// rel_error(got, want) below `tol` (and the same dtype), else a test failure naming `what` and the
// worst element; returns the error.
double expect_close(const at::Tensor& got, const at::Tensor& want, double tol, const std::string& what);

// The message of the mole::Error that `fn` throws, or "<no error>".
std::string error_of(const std::function<void()>& fn);

// A fresh temporary folder, removed with everything in it on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Runs a shell command; its exit code (-1 if it did not exit normally) and its stdout and stderr
// together.
struct CommandResult {
  int exit_code = -1;
  std::string output;
};
CommandResult run_command(const std::string& command);

// Writes `bytes` to `path` (binary).
void write_bytes(const std::string& path, const std::string& bytes);
std::string read_bytes(const std::string& path);

}  // namespace mole::test
