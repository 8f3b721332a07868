// The shared helpers of test_util.h.
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>
#include <sys/wait.h>

#include "kernels/check.h"

namespace fs = std::filesystem;

namespace mole::test {

std::string fixtures_dir() {
  const char* env = std::getenv("MOLE_FIXTURES");
  std::string dir = env && *env ? env : MOLE_FIXTURES_DIR;
  if (!fs::is_directory(dir)) {
    ADD_FAILURE() << "reference fixtures not found at '" << dir
                  << "'; set MOLE_FIXTURES to the fixtures folder";
  }
  return dir;
}

std::string tiny_llama_dir() { return fixtures_dir() + "/hf-tiny-llama"; }

std::string sci(double value) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3e", value);
  return buf;
}

double rel_error(const at::Tensor& x, const at::Tensor& ref) {
  at::Tensor a = x.detach().to(at::kCPU, at::kDouble);
  at::Tensor b = ref.detach().to(at::kCPU, at::kDouble);
  EXPECT_EQ(a.sizes(), b.sizes());
  if (a.sizes() != b.sizes()) return 1e30;
  double denom = b.norm().item<double>();
  double num = (a - b).norm().item<double>();
  return denom == 0.0 ? num : num / denom;
}

double expect_close(const at::Tensor& got, const at::Tensor& want, double tol,
                    const std::string& what) {
  EXPECT_EQ(got.scalar_type(), want.scalar_type()) << what;
  const double err = rel_error(got, want);
  if (err < tol) return err;
  at::Tensor a = got.detach().to(at::kCPU, at::kDouble).flatten();
  at::Tensor b = want.detach().to(at::kCPU, at::kDouble).flatten();
  const int64_t worst = a.numel() > 0 ? (a - b).abs().argmax().item<int64_t>() : -1;
  ADD_FAILURE() << what << ": rel error " << sci(err) << " >= " << sci(tol) << "; worst element "
                << worst << ": got " << (worst >= 0 ? a[worst].item<double>() : 0.0) << ", want "
                << (worst >= 0 ? b[worst].item<double>() : 0.0);
  return err;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

TempDir::TempDir() {
  std::random_device rd;
  fs::path base = fs::temp_directory_path();
  for (int attempt = 0; attempt < 100; ++attempt) {
    fs::path candidate = base / ("mole-test-" + std::to_string(rd()));
    if (fs::create_directory(candidate)) {
      path_ = candidate.string();
      return;
    }
  }
  throw std::runtime_error("could not create a temporary directory");
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

CommandResult run_command(const std::string& command) {
  CommandResult result;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (!pipe) return result;
  std::array<char, 4096> buffer;
  size_t n;
  while ((n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0) result.output.append(buffer.data(), n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

}  // namespace mole::test
