// JSON file helpers (see json_file.h).
#include "checkpoint/json_file.h"

#include <filesystem>
#include <fstream>
#include <iterator>

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
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    MOLE_CHECK(out.good(), "cannot write '", path, "'");
    out << value.dump(2) << "\n";
    MOLE_CHECK(out.good(), "cannot write '", path, "'");
  }
  std::filesystem::rename(tmp, path);
}

}  // namespace mole::ckpt
