// Small helpers for the JSON files of checkpoints and adapters: read one whole, typed fields with
// errors that name the file and the key, atomic writes.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

#include "kernels/check.h"

namespace mole::ckpt {

// Parses the JSON file at `path`; a missing file or invalid JSON is a mole::Error naming it.
nlohmann::json read_json_file(const std::string& path);

// Writes `value` (indented) to `path` through a temporary file and a rename.
void write_json_file(const std::string& path, const nlohmann::json& value);

// obj[key] as T; `fallback` when absent or null; a wrong type is an error naming `file` and `key`.
template <typename T>
T json_field(const nlohmann::json& obj, const std::string& key, const T& fallback,
             const std::string& file) {
  if (!obj.contains(key) || obj[key].is_null()) return fallback;
  try {
    return obj[key].get<T>();
  } catch (const nlohmann::json::exception&) {
    MOLE_FAIL(file, ": field '", key, "' has the wrong type: ", obj[key].dump());
  }
}

}  // namespace mole::ckpt
