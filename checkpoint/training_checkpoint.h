// Training checkpoints on disk (DESIGN.md §5): `<checkpoint.dir>/step-000123/` holds one
// safetensors file per rank (`rank-00003.safetensors`, only what that rank owns) and
// `manifest.pb` (training_checkpoint.proto), written last; `<checkpoint.dir>/latest` names the
// newest committed one. Every stored tensor is a piece of a whole trainable tensor in global terms
// (a flat element range of the tensor with every expert), with its CRC-32C, so a run of any layout
// reads the ranges it needs. This file is the format and the file operations; the collective save
// and the resume are in launch/checkpointing.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/proto/training_checkpoint.pb.h"

namespace mole::st {
class SafetensorsFile;
}

namespace mole::ckpt {

constexpr int kCheckpointFormat = 1;

// "step-000123".
std::string step_folder_name(int64_t step);
// "rank-00003.safetensors".
std::string rank_file_name(int rank);

// Elements [begin, begin + values.numel()) of the flattened whole tensor `tensor`, of `kind`
// ("param", "exp_avg", "exp_avg_sq").
struct PieceData {
  std::string tensor;
  std::string kind;
  int64_t begin = 0;
  at::Tensor values;  // 1-D
};

// Writes `pieces` to `<folder>/rank_file_name(rank)` (through a temporary file, fsync'd) and
// returns their descriptions: file, key, byte range and CRC-32C of each, read back from the file.
pb::RankPieces write_rank_file(const std::string& folder, int rank, const std::vector<PieceData>& pieces);

// manifest.pb: the serialized Manifest followed by a trailer (magic, length, CRC-32C), so that a
// truncated or damaged manifest is refused instead of half-read. Written through a temporary
// file and fsync'd.
void write_manifest(const std::string& folder, const pb::Manifest& manifest);
pb::Manifest read_manifest(const std::string& folder);  // throws naming the file and the problem

// Rank 0, after every rank file and the manifest are in `<dir>/<name>.tmp`: fsyncs that folder,
// renames it to `<dir>/<name>` (replacing an older save of the same step), fsyncs `dir`, points
// `<dir>/latest` at it (atomically), then removes committed checkpoints beyond the newest `keep`
// and folders of interrupted saves. Only the last steps can leave anything half done, and none
// touches the previous checkpoint.
void commit_checkpoint(const std::string& dir, const std::string& name, int64_t keep);

// The checkpoint a run should resume from: `resume` "never": none; "auto": the one
// `<dir>/latest` names, none when there is no `latest`; else `resume` is a checkpoint folder.
// Returns "" for none; throws when the folder named lacks a manifest.
std::string find_checkpoint(const std::string& dir, const std::string& resume);

// A committed checkpoint, opened for reading: the manifest checked, every file it lists present.
class StoredCheckpoint {
 public:
  explicit StoredCheckpoint(std::string folder);
  ~StoredCheckpoint();

  const std::string& folder() const { return folder_; }
  const pb::Manifest& manifest() const { return manifest_; }
  // Elements [begin, begin + count) of `kind` of the flattened whole tensor `tensor`, assembled
  // from the pieces that hold them, each piece's checksum verified on first use. Throws naming
  // the tensor and the missing range, or the file and tensor whose checksum fails.
  at::Tensor read(const std::string& tensor, const std::string& kind, int64_t begin, int64_t count) const;
  // Recomputes every piece's checksum; returns how many bytes were checked.
  uint64_t verify_all() const;

 private:
  const st::SafetensorsFile& file(const std::string& name) const;
  at::Tensor piece_values(const pb::Piece& piece) const;  // verified

  std::string folder_;
  pb::Manifest manifest_;
  std::map<std::pair<std::string, std::string>, std::vector<const pb::Piece*>> pieces_;  // by begin
  mutable std::map<std::string, std::unique_ptr<st::SafetensorsFile>> files_;
  mutable std::map<const pb::Piece*, bool> verified_;
};

}  // namespace mole::ckpt
