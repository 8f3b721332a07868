// JSON file helpers (see json_file.h).
#include "checkpoint/json_file.h"

#include <filesystem>
#include <fstream>
#include <iterator>

#include "checkpoint/atomic_file.h"

namespace mole::ckpt {

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path);
  MOLE_CHECK(in.good(), "cannot open '", path, "'");
  try {
    return nlohmann::json::parse(std::string(std::istreambuf_iterator<char>(in), {}));
  } catch (const nlohmann::json::exception& e) {
    MOLE_FAIL(path, ": not valid JSON (", e.what(), ")");
  }
}

void write_json_file(const std::string& path, const nlohmann::json& value) {
  write_file_atomic(path, value.dump(2) + "\n");
}

}  // namespace mole::ckpt
