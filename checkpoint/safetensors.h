// safetensors files as LibTorch tensors: a memory-mapped reader, an atomic writer, and the
// sharded folder layout of Hugging Face (`model.safetensors.index.json`).
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/safetensors_format.h"

namespace mole::st {

// One safetensors file, memory-mapped read-only for the lifetime of the object (and of every
// tensor it handed out: they keep the mapping alive).
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);  // throws mole::Error naming the file
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const Header& header() const { return header_; }
  bool contains(const std::string& name) const { return header_.find(name) != nullptr; }
  std::vector<std::string> names() const;

  // The tensor on CPU with its stored dtype. Zero-copy and read-only when the data is aligned
  // for its dtype (do not write into it), otherwise a copy. Throws naming file and tensor when
  // absent or when the dtype has no LibTorch equivalent.
  at::Tensor tensor(const std::string& name) const;
  // Bytes of the mapping resident in this process (its pages that were read), from
  // /proc/self/smaps; -1 where that is not available.
  int64_t resident_bytes() const;
  uint64_t file_bytes() const;

 private:
  struct Mapping;
  std::string path_;
  std::shared_ptr<Mapping> mapping_;
  Header header_;
};

// Writes `tensors` (any device, contiguous or not; written in the given order) to `path`
// atomically: a temporary file in the same folder, fsync, rename. Names must be unique and
// non-empty.
void save_file(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
               const std::map<std::string, std::string>& metadata = {});

// A Hugging Face checkpoint folder: `model.safetensors`, or the shards listed in
// `model.safetensors.index.json` (its "weight_map": tensor name -> file name). A single file path
// is also accepted.
class CheckpointReader {
 public:
  explicit CheckpointReader(const std::string& path);
  bool contains(const std::string& name) const;
  std::vector<std::string> names() const;  // sorted
  at::Tensor tensor(const std::string& name) const;  // throws naming the tensor and the folder
  const TensorInfo& info(const std::string& name) const;
  const std::string& path() const { return path_; }
  // Over every file: the bytes resident in this process (-1 where unknown) and the bytes mapped.
  int64_t resident_bytes() const;
  uint64_t file_bytes() const;

 private:
  std::string path_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> owner_;
};

// Writes a sharded folder: files `model-00001-of-0000N.safetensors` of at most
// `max_shard_bytes` each (a tensor larger than that gets a file of its own) and the index
// json. With a single shard writes `model.safetensors` and no index.
void save_checkpoint(const std::string& dir, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                     uint64_t max_shard_bytes);

}  // namespace mole::st
