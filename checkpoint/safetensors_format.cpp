// Parsing and validation of the safetensors header (torch-free; see safetensors_format.h).
#include "checkpoint/safetensors_format.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <limits>
#include <sstream>

#include "kernels/check.h"

namespace mole::st {
namespace {

using nlohmann::json;

struct DtypeRow {
  Dtype dtype;
  const char* name;
  size_t size;
};

constexpr DtypeRow kDtypes[] = {
    {Dtype::F64, "F64", 8},   {Dtype::F32, "F32", 4},         {Dtype::F16, "F16", 2},
    {Dtype::BF16, "BF16", 2}, {Dtype::I64, "I64", 8},         {Dtype::I32, "I32", 4},
    {Dtype::I16, "I16", 2},   {Dtype::I8, "I8", 1},           {Dtype::U8, "U8", 1},
    {Dtype::BOOL, "BOOL", 1}, {Dtype::F8_E4M3, "F8_E4M3", 1}, {Dtype::F8_E5M2, "F8_E5M2", 1},
    {Dtype::U16, "U16", 2},   {Dtype::U32, "U32", 4},         {Dtype::U64, "U64", 8},
};

const DtypeRow& row(Dtype dtype) {
  for (const DtypeRow& r : kDtypes) {
    if (r.dtype == dtype) return r;
  }
  MOLE_FAIL("invalid safetensors dtype enum value ", static_cast<int>(dtype));
}

// A JSON value for an error message, cut short so a hostile header cannot flood the terminal.
// Nested containers are only described: dump() recurses, and a header of a million '[' would
// overflow the stack.
std::string preview(const json& value) {
  if (value.is_structured()) {
    bool flat = value.size() <= 16;
    for (const json& element : value) flat = flat && !element.is_structured();
    if (!flat) {
      return detail::cat(value.is_array() ? "an array of " : "an object of ", value.size(),
                         " elements");
    }
  }
  std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return text;
}

// A tensor name for an error message; names are unbounded in the format.
std::string quoted(const std::string& name) {
  return "'" + (name.size() > 200 ? name.substr(0, 197) + "..." : name) + "'";
}

// A non-negative integer that fits in int64 (shape dims and offsets alike).
uint64_t non_negative(const json& value, const std::string& where, const char* what) {
  MOLE_CHECK(value.is_number_integer(), where, ": ", what,
             " must be a non-negative integer, found ", preview(value));
  MOLE_CHECK(value.is_number_unsigned(), where, ": ", what, " must be non-negative, found ",
             preview(value));
  const uint64_t v = value.get<uint64_t>();
  MOLE_CHECK(v <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), where, ": ", what,
             " ", v, " is too large");
  return v;
}

TensorInfo parse_entry(const std::string& name, const json& entry, const std::string& source,
                       uint64_t data_size) {
  const std::string where = source + ": tensor " + quoted(name);
  MOLE_CHECK(entry.is_object(), where,
             ": entry must be an object with dtype, shape and "
             "data_offsets, found ",
             preview(entry));
  TensorInfo info;
  info.name = name;

  auto dtype = entry.find("dtype");
  MOLE_CHECK(dtype != entry.end(), where, ": missing \"dtype\"");
  MOLE_CHECK(dtype->is_string(), where, ": dtype must be a string, found ", preview(*dtype));
  info.dtype = parse_dtype(dtype->get<std::string>(), where);

  auto shape = entry.find("shape");
  MOLE_CHECK(shape != entry.end(), where, ": missing \"shape\"");
  MOLE_CHECK(shape->is_array(), where, ": shape must be an array, found ", preview(*shape));
  uint64_t numel = 1;
  bool numel_overflow = false;
  for (const json& dim : *shape) {
    const uint64_t d = non_negative(dim, where, "shape dimension");
    info.shape.push_back(static_cast<int64_t>(d));
    numel_overflow = numel_overflow || __builtin_mul_overflow(numel, d, &numel);
  }
  uint64_t nbytes = 0;
  const size_t elem = dtype_size(info.dtype);
  MOLE_CHECK(!numel_overflow &&
                 numel <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) &&
                 !__builtin_mul_overflow(numel, elem, &nbytes),
             where, ": shape ", shape_text(info.shape), " of ", dtype_name(info.dtype),
             " overflows 64-bit byte counts");

  auto offsets = entry.find("data_offsets");
  MOLE_CHECK(offsets != entry.end(), where, ": missing \"data_offsets\"");
  MOLE_CHECK(offsets->is_array() && offsets->size() == 2, where,
             ": data_offsets must be an array [begin, end], found ", preview(*offsets));
  info.begin = non_negative((*offsets)[0], where, "data_offsets begin");
  info.end = non_negative((*offsets)[1], where, "data_offsets end");
  MOLE_CHECK(info.begin <= info.end, where, ": data_offsets [", info.begin, ", ", info.end,
             "] begin is past end");
  MOLE_CHECK(info.end <= data_size, where, ": data_offsets [", info.begin, ", ", info.end,
             "] run past the end of the data buffer (", data_size, " bytes)");
  MOLE_CHECK(nbytes == info.end - info.begin, where, " has shape ", shape_text(info.shape), " (",
             numel, " x ", dtype_name(info.dtype), " = ", nbytes, " bytes) but data_offsets [",
             info.begin, ", ", info.end, "] span ", info.end - info.begin, " bytes");
  return info;
}

void parse_metadata(const json& value, const std::string& source, Header& header) {
  MOLE_CHECK(value.is_object(), source, ": __metadata__ must be an object of strings, found ",
             preview(value));
  for (const auto& [key, text] : value.items()) {
    MOLE_CHECK(text.is_string(), source, ": __metadata__ value for ", quoted(key),
               " must be a string, found ", preview(text));
    header.metadata[key] = text.get<std::string>();
  }
}

// Entries must tile the data buffer exactly: sorted by offset, each starts where the previous
// ended, and the last ends at the buffer's end.
void check_layout(std::vector<TensorInfo>& tensors, uint64_t data_size, const std::string& source) {
  std::stable_sort(tensors.begin(), tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo& t : tensors) {
    if (t.begin < expected) {
      MOLE_FAIL(source, ": tensor ", quoted(t.name), " data_offsets [", t.begin, ", ", t.end,
                "] overlap tensor ", quoted(previous->name), " [", previous->begin, ", ",
                previous->end, "]");
    }
    if (t.begin > expected) {
      MOLE_FAIL(source, ": hole in the data buffer: bytes [", expected, ", ", t.begin,
                ") belong to no tensor (before tensor ", quoted(t.name), ")");
    }
    expected = t.end;
    previous = &t;
  }
  MOLE_CHECK(expected == data_size, source, ": the data buffer is ", data_size,
             " bytes but the tensors cover only ", expected, " (", data_size - expected,
             " trailing bytes unused)");
}

}  // namespace

Dtype parse_dtype(const std::string& text, const std::string& where) {
  for (const DtypeRow& r : kDtypes) {
    if (text == r.name) return r.dtype;
  }
  std::string known;
  for (const DtypeRow& r : kDtypes) known += (known.empty() ? "" : " ") + std::string(r.name);
  MOLE_FAIL(where, ": unknown dtype '", text.size() > 40 ? text.substr(0, 40) + "..." : text,
            "' (known: ", known, ")");
}

const char* dtype_name(Dtype dtype) { return row(dtype).name; }
std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

size_t dtype_size(Dtype dtype) { return row(dtype).size; }

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const TensorInfo* Header::find(const std::string& name) const {
  for (const TensorInfo& t : tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

Header parse_header(const uint8_t* bytes, size_t size, const std::string& source) {
  MOLE_CHECK(size >= 8, source, ": file is ", size,
             " bytes, too short for a safetensors file (needs at least the 8-byte header length)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  MOLE_CHECK(n <= kMaxHeaderBytes, source, ": header length ", n, " exceeds the limit of ",
             kMaxHeaderBytes, " bytes (not a safetensors file?)");
  MOLE_CHECK(n <= size - 8, source, ": header length ", n, " runs past the end of the file (", size,
             " bytes, so at most ", size - 8, " header bytes)");
  MOLE_CHECK(n > 0 && bytes[8] == '{', source,
             ": header is not a JSON object (it must start with '{')");

  Header header;
  header.data_start = 8 + n;
  header.data_size = size - header.data_start;
  try {
    const char* text = reinterpret_cast<const char*>(bytes + 8);
    json root = json::parse(text, text + n);
    MOLE_CHECK(root.is_object(), source, ": header is not a JSON object");
    for (const auto& [key, value] : root.items()) {
      if (key == "__metadata__") {
        parse_metadata(value, source, header);
      } else {
        header.tensors.push_back(parse_entry(key, value, source, header.data_size));
      }
    }
  } catch (const json::exception& e) {
    std::string what = e.what();
    if (what.size() > 300) what = what.substr(0, 297) + "...";
    MOLE_FAIL(source, ": header is not valid JSON: ", what);
  }
  check_layout(header.tensors, header.data_size, source);
  return header;
}

}  // namespace mole::st
