// safetensors files as LibTorch tensors: mmap reader, atomic writer, sharded HF folders.
#include "checkpoint/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <set>

#include "checkpoint/atomic_file.h"
#include "kernels/check.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors data is little-endian; this reader maps it without byte swapping");

namespace fs = std::filesystem;

namespace mole::st {
namespace {

constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";

std::string errno_text() { return std::strerror(errno); }

// Closes a file descriptor on scope exit.
struct FdGuard {
  int fd;
  ~FdGuard() {
    if (fd >= 0) ::close(fd);
  }
};

std::optional<at::ScalarType> to_scalar_type(Dtype dtype) {
  switch (dtype) {
    case Dtype::F64:
      return at::kDouble;
    case Dtype::F32:
      return at::kFloat;
    case Dtype::F16:
      return at::kHalf;
    case Dtype::BF16:
      return at::kBFloat16;
    case Dtype::I64:
      return at::kLong;
    case Dtype::I32:
      return at::kInt;
    case Dtype::I16:
      return at::kShort;
    case Dtype::I8:
      return at::kChar;
    case Dtype::U8:
      return at::kByte;
    case Dtype::BOOL:
      return at::kBool;
    default:
      return std::nullopt;  // F8_*, U16, U32, U64: no LibTorch 1.13 equivalent
  }
}

std::optional<Dtype> from_scalar_type(at::ScalarType type) {
  switch (type) {
    case at::kDouble:
      return Dtype::F64;
    case at::kFloat:
      return Dtype::F32;
    case at::kHalf:
      return Dtype::F16;
    case at::kBFloat16:
      return Dtype::BF16;
    case at::kLong:
      return Dtype::I64;
    case at::kInt:
      return Dtype::I32;
    case at::kShort:
      return Dtype::I16;
    case at::kChar:
      return Dtype::I8;
    case at::kByte:
      return Dtype::U8;
    case at::kBool:
      return Dtype::BOOL;
    default:
      return std::nullopt;
  }
}

void check_names(const std::string& path,
                 const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  std::set<std::string> seen;
  for (const auto& [name, tensor] : tensors) {
    MOLE_CHECK(!name.empty(), path, ": tensor names must not be empty");
    MOLE_CHECK(name != "__metadata__", path, ": '__metadata__' is reserved, not a tensor name");
    MOLE_CHECK(seen.insert(name).second, path, ": tensor '", name, "' is listed twice");
    MOLE_CHECK(tensor.defined(), path, ": tensor '", name, "' is undefined");
    MOLE_CHECK(from_scalar_type(tensor.scalar_type()), path, ": tensor '", name, "' has dtype ",
               tensor.scalar_type(), ", which safetensors cannot store");
  }
}

uint64_t byte_size(const at::Tensor& tensor) {
  return static_cast<uint64_t>(tensor.numel()) * tensor.element_size();
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MOLE_CHECK(in.good(), "cannot open '", path, "': ", errno_text());
  std::string text(std::istreambuf_iterator<char>(in), {});
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    MOLE_FAIL(path, ": not valid JSON: ", e.what());
  }
}

}  // namespace

// The read-only mapping of a whole file; tensors handed out hold a shared_ptr to it.
struct SafetensorsFile::Mapping {
  const uint8_t* data = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (data) ::munmap(const_cast<uint8_t*>(data), size);
  }
};

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  FdGuard fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  MOLE_CHECK(fd.fd >= 0, "cannot open safetensors file '", path, "': ", errno_text());
  struct stat st {};
  MOLE_CHECK(::fstat(fd.fd, &st) == 0, "cannot stat '", path, "': ", errno_text());
  MOLE_CHECK(S_ISREG(st.st_mode), path, ": not a regular file");
  MOLE_CHECK(st.st_size > 0, path, ": file is empty (0 bytes), not a safetensors file");
  mapping_ = std::make_shared<Mapping>();
  void* addr = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd.fd, 0);
  MOLE_CHECK(addr != MAP_FAILED, "cannot mmap '", path, "' (", st.st_size,
             " bytes): ", errno_text());
  mapping_->data = static_cast<const uint8_t*>(addr);
  mapping_->size = static_cast<size_t>(st.st_size);
  header_ = parse_header(mapping_->data, mapping_->size, path);
}

SafetensorsFile::~SafetensorsFile() = default;

uint64_t SafetensorsFile::file_bytes() const { return mapping_->size; }

int64_t SafetensorsFile::resident_bytes() const {
  // The mapping's entry starts with "<start>-<end> "; its "Rss:" line follows.
  std::ifstream smaps("/proc/self/smaps");
  if (!smaps) return -1;
  char start[32];
  std::snprintf(start, sizeof(start), "%lx-", reinterpret_cast<unsigned long>(mapping_->data));
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    if (!inside) {
      inside = line.rfind(start, 0) == 0;
    } else if (line.rfind("Rss:", 0) == 0) {
      return std::stoll(line.substr(4)) * 1024;  // "Rss:   1234 kB"
    }
  }
  return -1;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(header_.tensors.size());
  for (const TensorInfo& t : header_.tensors) out.push_back(t.name);
  return out;
}

at::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const TensorInfo* info = header_.find(name);
  MOLE_CHECK(info != nullptr, "tensor '", name, "' not found in file ", path_);
  const std::optional<at::ScalarType> type = to_scalar_type(info->dtype);
  MOLE_CHECK(type, "dtype ", dtype_name(info->dtype), " of tensor '", name, "' in file ", path_,
             " is not supported by this LibTorch");
  const auto options = at::TensorOptions().dtype(*type).device(at::kCPU);
  if (info->numel() == 0) return at::empty(info->shape, options);

  const uint8_t* ptr = mapping_->data + header_.data_start + info->begin;
  if (reinterpret_cast<uintptr_t>(ptr) % dtype_size(info->dtype) != 0) {
    at::Tensor copy = at::empty(info->shape, options);
    std::memcpy(copy.data_ptr(), ptr, info->end - info->begin);
    return copy;
  }
  std::shared_ptr<Mapping> keep = mapping_;
  return at::from_blob(
      const_cast<uint8_t*>(ptr), info->shape, [keep](void*) mutable { keep.reset(); }, options);
}

void save_file(const std::string& path,
               const std::vector<std::pair<std::string, at::Tensor>>& tensors,
               const std::map<std::string, std::string>& metadata) {
  check_names(path, tensors);
  std::string text;
  try {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata.empty()) header["__metadata__"] = metadata;
    uint64_t offset = 0;
    for (const auto& [name, tensor] : tensors) {
      const uint64_t end = offset + byte_size(tensor);
      header[name] = {{"dtype", dtype_name(*from_scalar_type(tensor.scalar_type()))},
                      {"shape", tensor.sizes().vec()},
                      {"data_offsets", {offset, end}}};
      offset = end;
    }
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    MOLE_FAIL(path, ": cannot encode the header (names and metadata must be UTF-8): ", e.what());
  }
  // Pad with spaces so the data buffer starts 8-byte aligned.
  text.append((8 - text.size() % 8) % 8, ' ');
  uint8_t length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<uint8_t>(uint64_t{text.size()} >> (8 * i));

  ckpt::AtomicFile out(path);
  out.write(length, sizeof length);
  out.write(text.data(), text.size());
  for (const auto& [name, tensor] : tensors) {
    // One tensor at a time, so a device-resident checkpoint is never copied to CPU whole.
    const at::Tensor cpu = tensor.detach().to(at::kCPU).contiguous();
    out.write(cpu.data_ptr(), byte_size(cpu));
  }
  out.commit();
}

CheckpointReader::CheckpointReader(const std::string& path) : path_(path) {
  std::error_code ec;
  MOLE_CHECK(fs::exists(path, ec), "checkpoint path '", path, "' does not exist");
  if (!fs::is_directory(path, ec)) {
    files_.push_back(std::make_unique<SafetensorsFile>(path));
  } else if (fs::exists(fs::path(path) / kIndexFile, ec)) {
    const std::string index_path = (fs::path(path) / kIndexFile).string();
    const nlohmann::json index = read_json(index_path);
    auto map = index.is_object() ? index.find("weight_map") : index.end();
    MOLE_CHECK(map != index.end() && map->is_object(), index_path,
               ": missing the \"weight_map\" object (tensor name -> shard file)");
    MOLE_CHECK(!map->empty(), index_path, ": \"weight_map\" lists no tensors");
    std::map<std::string, const SafetensorsFile*> shards;
    for (const auto& [name, file] : map->items()) {
      MOLE_CHECK(file.is_string(), index_path, ": weight_map entry for tensor '", name,
                 "' must be a file name string");
      const std::string shard = file.get<std::string>();
      auto it = shards.find(shard);
      if (it == shards.end()) {
        const std::string shard_path = (fs::path(path) / shard).string();
        MOLE_CHECK(fs::is_regular_file(shard_path, ec), "shard '", shard, "' (tensor '", name,
                   "') listed in ", index_path, " does not exist");
        files_.push_back(std::make_unique<SafetensorsFile>(shard_path));
        it = shards.emplace(shard, files_.back().get()).first;
      }
      MOLE_CHECK(it->second->contains(name), "tensor '", name, "' is mapped to shard '", shard,
                 "' by ", index_path, " but that shard does not contain it");
    }
  } else if (fs::exists(fs::path(path) / kSingleFile, ec)) {
    files_.push_back(std::make_unique<SafetensorsFile>((fs::path(path) / kSingleFile).string()));
  } else {
    MOLE_FAIL("no ", kSingleFile, " or ", kIndexFile, " in ", path);
  }
  for (const auto& file : files_) {
    for (const TensorInfo& t : file->header().tensors) {
      auto [it, fresh] = owner_.emplace(t.name, file.get());
      MOLE_CHECK(fresh, "tensor '", t.name, "' appears in two shards: ", it->second->path(),
                 " and ", file->path());
    }
  }
}

bool CheckpointReader::contains(const std::string& name) const { return owner_.count(name) > 0; }

int64_t CheckpointReader::resident_bytes() const {
  int64_t total = 0;
  for (const auto& file : files_) {
    const int64_t bytes = file->resident_bytes();
    if (bytes < 0) return -1;
    total += bytes;
  }
  return total;
}

uint64_t CheckpointReader::file_bytes() const {
  uint64_t total = 0;
  for (const auto& file : files_) total += file->file_bytes();
  return total;
}

std::vector<std::string> CheckpointReader::names() const {
  std::vector<std::string> out;
  out.reserve(owner_.size());
  for (const auto& entry : owner_) out.push_back(entry.first);
  return out;
}

at::Tensor CheckpointReader::tensor(const std::string& name) const {
  auto it = owner_.find(name);
  MOLE_CHECK(it != owner_.end(), "tensor '", name, "' not found in checkpoint ", path_);
  return it->second->tensor(name);
}

const TensorInfo& CheckpointReader::info(const std::string& name) const {
  auto it = owner_.find(name);
  MOLE_CHECK(it != owner_.end(), "tensor '", name, "' not found in checkpoint ", path_);
  return *it->second->header().find(name);
}

void save_checkpoint(const std::string& dir,
                     const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                     uint64_t max_shard_bytes) {
  check_names(dir, tensors);
  std::error_code ec;
  fs::create_directories(dir, ec);
  MOLE_CHECK(!ec && fs::is_directory(dir), "cannot create checkpoint folder '", dir,
             "': ", ec ? ec.message() : "a file of that name exists");

  // Greedy in the given order; a tensor larger than the limit gets a shard of its own.
  std::vector<std::vector<std::pair<std::string, at::Tensor>>> shards(1);
  uint64_t shard_bytes = 0;
  uint64_t total = 0;
  for (const auto& entry : tensors) {
    const uint64_t bytes = byte_size(entry.second);
    if (!shards.back().empty() && shard_bytes + bytes > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(entry);
    shard_bytes += bytes;
    total += bytes;
  }

  // transformers refuses safetensors files whose metadata lacks a known "format".
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  const fs::path folder(dir);
  if (shards.size() == 1) {
    save_file((folder / kSingleFile).string(), shards[0], metadata);
    fs::remove(folder / kIndexFile, ec);  // a stale index would shadow the new file
    return;
  }
  nlohmann::json weight_map = nlohmann::json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    save_file((folder / name).string(), shards[i], metadata);
    for (const auto& entry : shards[i]) weight_map[entry.first] = name;
  }
  const nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  const std::string text = index.dump(2) + "\n";
  ckpt::AtomicFile out((folder / kIndexFile).string());
  out.write(text.data(), text.size());
  out.commit();
  fs::remove(folder / kSingleFile, ec);  // transformers would prefer a stale single file
}

}  // namespace mole::st
