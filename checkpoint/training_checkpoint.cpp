// Training checkpoints on disk (see training_checkpoint.h).
#include "checkpoint/training_checkpoint.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>

#include "checkpoint/atomic_file.h"
#include "checkpoint/checksum.h"
#include "checkpoint/safetensors.h"
#include "kernels/check.h"
#include <spdlog/spdlog.h>

namespace mole::ckpt {
namespace {

namespace fs = std::filesystem;

constexpr char kMagic[8] = {'M', 'O', 'L', 'E', 'C', 'K', 'P', 'T'};
constexpr size_t kTrailer = sizeof(kMagic) + 8 + 4;  // magic, length, CRC-32C

std::string piece_key(const PieceData& p) {
  return p.kind + "/" + p.tensor + "@" + std::to_string(p.begin);
}

std::string read_whole(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MOLE_CHECK(in.good(), "cannot read '", path, "'");
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// The step of a committed checkpoint folder name ("step-000123"), or -1.
int64_t step_of(const std::string& name) {
  if (name.rfind("step-", 0) != 0 || name.size() <= 5) return -1;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
  }
  return std::stoll(name.substr(5));
}

}  // namespace

std::string step_folder_name(int64_t step) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "step-%06lld", static_cast<long long>(step));
  return buffer;
}

std::string rank_file_name(int rank) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "rank-%05d.safetensors", rank);
  return buffer;
}

pb::RankPieces write_rank_file(const std::string& folder, int rank, const std::vector<PieceData>& pieces) {
  const std::string name = rank_file_name(rank);
  const std::string path = folder + "/" + name;
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const PieceData& p : pieces) {
    tensors.emplace_back(piece_key(p), p.values.detach().to(at::kCPU).contiguous().view({-1}));
  }
  st::save_file(path, tensors, {{"format", "mole training checkpoint"}});
  // Offsets and checksums of what is in the file, read back from it.
  st::SafetensorsFile file(path);
  pb::RankPieces out;
  out.set_file(name);
  for (size_t i = 0; i < pieces.size(); ++i) {
    const st::TensorInfo* info = file.header().find(tensors[i].first);
    MOLE_CHECK(info != nullptr, "'", path, "' lacks '", tensors[i].first, "' right after writing it");
    const at::Tensor stored = file.tensor(tensors[i].first);
    pb::Piece* piece = out.add_pieces();
    piece->set_tensor(pieces[i].tensor);
    piece->set_kind(pieces[i].kind);
    piece->set_begin(pieces[i].begin);
    piece->set_numel(stored.numel());
    piece->set_file(name);
    piece->set_key(tensors[i].first);
    piece->set_data_offset(file.header().data_start + info->begin);
    piece->set_nbytes(info->end - info->begin);
    piece->set_crc32c(crc32c(stored.data_ptr(), info->end - info->begin));
  }
  return out;
}

void write_manifest(const std::string& folder, const pb::Manifest& manifest) {
  std::string bytes;
  MOLE_CHECK(manifest.SerializeToString(&bytes), "cannot serialize the checkpoint manifest");
  const uint64_t length = bytes.size();
  const uint32_t crc = crc32c(bytes.data(), bytes.size());
  bytes.append(kMagic, sizeof(kMagic));
  bytes.append(reinterpret_cast<const char*>(&length), 8);
  bytes.append(reinterpret_cast<const char*>(&crc), 4);
  write_file_atomic(folder + "/manifest.pb", bytes);
}

pb::Manifest read_manifest(const std::string& folder) {
  const std::string path = folder + "/manifest.pb";
  MOLE_CHECK(fs::exists(path), "'", folder, "' is not a committed checkpoint: it has no manifest.pb");
  const std::string bytes = read_whole(path);
  uint64_t length = 0;
  uint32_t crc = 0;
  const bool framed = bytes.size() >= kTrailer &&
                      std::memcmp(bytes.data() + bytes.size() - kTrailer, kMagic, sizeof(kMagic)) == 0;
  if (framed) {
    std::memcpy(&length, bytes.data() + bytes.size() - 12, 8);
    std::memcpy(&crc, bytes.data() + bytes.size() - 4, 4);
  }
  MOLE_CHECK(framed && length == bytes.size() - kTrailer && crc32c(bytes.data(), length) == crc,
             "'", path, "' is damaged (", bytes.size(),
             " bytes: truncated, overwritten or not a mole checkpoint manifest); the checkpoint "
             "cannot be used");
  pb::Manifest manifest;
  MOLE_CHECK(manifest.ParseFromArray(bytes.data(), static_cast<int>(length)), "'", path,
             "' passes its checksum but does not parse as a manifest");
  MOLE_CHECK(manifest.format_version() == kCheckpointFormat, "'", path, "' has format version ",
             manifest.format_version(), "; this mole reads version ", kCheckpointFormat);
  return manifest;
}

void commit_checkpoint(const std::string& dir, const std::string& name, int64_t keep) {
  const fs::path root(dir);
  const fs::path tmp = root / (name + ".tmp"), final_path = root / name;
  const int64_t this_step = step_of(name);
  sync_folder(tmp.string());
  std::error_code ec;
  fs::path replaced;
  if (fs::exists(final_path)) {
    // A save of the same step from an earlier attempt (a run resumed from an older checkpoint).
    // Until the new folder is in place, `latest` may still name it: find_checkpoint falls back
    // to the `.replaced` copy.
    replaced = root / (name + ".replaced");
    fs::remove_all(replaced, ec);
    fs::rename(final_path, replaced, ec);
    MOLE_CHECK(!ec, "cannot move the older '", final_path.string(), "' aside: ", ec.message());
  }
  fs::rename(tmp, final_path, ec);
  if (ec) {
    const std::string reason = ec.message();
    if (!replaced.empty()) fs::rename(replaced, final_path, ec);
    MOLE_FAIL("cannot rename '", tmp.string(), "' to '", final_path.string(), "': ", reason);
  }
  sync_folder(dir);
  // Committed. What follows only tidies up: its failures are warnings, never errors (the run
  // goes on; a stale `latest` still names a loadable checkpoint).
  try {
    write_file_atomic((root / "latest").string(), name + "\n");
  } catch (const std::exception& e) {
    spdlog::warn("checkpoint {} is committed but 'latest' still names the one before: {}", final_path.string(), e.what());
    return;
  }
  if (!replaced.empty()) fs::remove_all(replaced, ec);
  // Checkpoints beyond `keep` (and every later-numbered one: it belongs to a run that was
  // continued from an earlier checkpoint, which this one supersedes), and what interrupted saves
  // and prunes left. A folder is renamed before it is removed, so a crash never leaves a half
  // removed folder that looks committed.
  std::vector<std::pair<int64_t, fs::path>> committed;
  std::vector<fs::path> remove;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string n = it->path().filename().string();
    if (!it->is_directory(ec)) continue;
    const auto ends_with = [&](const std::string& suffix) {
      return n.size() > suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    if (n.rfind("step-", 0) == 0 && (ends_with(".tmp") || ends_with(".deleting") || ends_with(".replaced"))) {
      remove.push_back(it->path());
      continue;
    }
    const int64_t step = step_of(n);
    if (step < 0 || n == name || !fs::exists(it->path() / "manifest.pb", ec)) continue;
    if (step > this_step) remove.push_back(it->path());
    else committed.emplace_back(step, it->path());
  }
  std::sort(committed.begin(), committed.end());
  const int64_t surplus = static_cast<int64_t>(committed.size()) - (keep - 1);
  for (int64_t i = 0; i < surplus; ++i) remove.push_back(committed[static_cast<size_t>(i)].second);
  for (const fs::path& p : remove) {
    fs::path doomed = p;
    const std::string n = p.filename().string();
    if (n.find(".deleting") == std::string::npos) {
      doomed = root / (n + ".deleting");
      fs::rename(p, doomed, ec);
      if (ec) doomed = p;
    }
    fs::remove_all(doomed, ec);
    if (ec) spdlog::warn("cannot remove the old checkpoint folder '{}': {}", doomed.string(), ec.message());
  }
  sync_folder(dir);
}

std::string find_checkpoint(const std::string& dir, const std::string& resume) {
  if (resume == "never") return "";
  if (resume != "auto") {
    MOLE_CHECK(fs::exists(fs::path(resume) / "manifest.pb"), "checkpoint.resume = '", resume,
               "' is not a committed checkpoint folder (no manifest.pb there)");
    return resume;
  }
  const fs::path latest = fs::path(dir) / "latest";
  if (!fs::exists(latest)) return "";
  std::string name = read_whole(latest.string());
  while (!name.empty() && (name.back() == '\n' || name.back() == '\r' || name.back() == ' ')) name.pop_back();
  fs::path folder = fs::path(dir) / name;
  // A commit that replaced this step's folder and was interrupted between its two renames.
  const fs::path replaced = fs::path(dir) / (name + ".replaced");
  if (!fs::exists(folder / "manifest.pb") && fs::exists(replaced / "manifest.pb")) folder = replaced;
  MOLE_CHECK(step_of(name) >= 0 && fs::exists(folder / "manifest.pb"), "'", latest.string(),
             "' names '", name, "', which is not a committed checkpoint there (no manifest.pb); "
             "set checkpoint.resume to a checkpoint folder, or to never to start afresh");
  return folder.string();
}

StoredCheckpoint::StoredCheckpoint(std::string folder)
    : folder_(std::move(folder)), manifest_(read_manifest(folder_)) {
  for (const std::string& f : manifest_.files()) {
    MOLE_CHECK(fs::exists(fs::path(folder_) / f), "checkpoint '", folder_, "' lacks its file '", f,
               "' (", manifest_.files_size(), " files listed in its manifest)");
  }
  for (const pb::Piece& p : manifest_.pieces()) pieces_[{p.tensor(), p.kind()}].push_back(&p);
  for (auto& [key, list] : pieces_) {
    std::sort(list.begin(), list.end(), [](const pb::Piece* a, const pb::Piece* b) { return a->begin() < b->begin(); });
  }
}

StoredCheckpoint::~StoredCheckpoint() = default;

const st::SafetensorsFile& StoredCheckpoint::file(const std::string& name) const {
  auto it = files_.find(name);
  if (it == files_.end()) {
    it = files_.emplace(name, std::make_unique<st::SafetensorsFile>(folder_ + "/" + name)).first;
  }
  return *it->second;
}

at::Tensor StoredCheckpoint::piece_values(const pb::Piece& piece) const {
  const st::SafetensorsFile& f = file(piece.file());
  const st::TensorInfo* info = f.header().find(piece.key());
  MOLE_CHECK(info != nullptr && f.header().data_start + info->begin == piece.data_offset() &&
                 info->end - info->begin == piece.nbytes(),
             "checkpoint file '", f.path(), "' does not hold '", piece.key(), "' where its manifest says");
  at::Tensor t = f.tensor(piece.key());
  bool& done = verified_[&piece];
  if (!done) {
    MOLE_CHECK(t.numel() == piece.numel() && crc32c(t.data_ptr(), piece.nbytes()) == piece.crc32c(),
               "checksum mismatch in checkpoint file '", f.path(), "', tensor '", piece.key(),
               "' (", piece.kind(), " of ", piece.tensor(), "): the file is damaged");
    done = true;
  }
  return t;
}

at::Tensor StoredCheckpoint::read(const std::string& tensor, const std::string& kind, int64_t begin,
                                  int64_t count) const {
  const auto it = pieces_.find({tensor, kind});
  MOLE_CHECK(it != pieces_.end(), "checkpoint '", folder_, "' holds no ", kind, " of '", tensor, "'");
  at::Tensor out;
  int64_t covered = begin;  // pieces do not overlap; walk them in order
  for (const pb::Piece* p : it->second) {
    const int64_t lo = std::max(begin, p->begin()), hi = std::min(begin + count, p->begin() + p->numel());
    if (lo >= hi) continue;
    MOLE_CHECK(lo <= covered, "checkpoint '", folder_, "' lacks elements [", covered, ", ", lo,
               ") of ", kind, " of '", tensor, "'");
    MOLE_CHECK(lo == covered, "checkpoint '", folder_, "' has overlapping pieces of ", kind, " of '", tensor,
               "' at element ", lo);
    const at::Tensor values = piece_values(*p);
    if (!out.defined()) out = at::empty({count}, values.options());
    out.narrow(0, lo - begin, hi - lo).copy_(values.narrow(0, lo - p->begin(), hi - lo));
    covered = hi;
  }
  MOLE_CHECK(covered == begin + count, "checkpoint '", folder_, "' lacks elements [", covered, ", ",
             begin + count, ") of ", kind, " of '", tensor, "'");
  if (!out.defined()) out = at::empty({0}, at::kFloat);
  return out;
}

uint64_t StoredCheckpoint::verify_all() const {
  // Every element of every tensor's parameters and moments is stored exactly once.
  for (const pb::TensorSpec& t : manifest_.tensors()) {
    int64_t numel = 1;
    for (int64_t d : t.shape()) numel *= d;
    for (const char* kind : {"param", "exp_avg", "exp_avg_sq"}) {
      const auto it = pieces_.find({t.name(), kind});
      int64_t covered = 0;
      if (it != pieces_.end()) {
        for (const pb::Piece* p : it->second) {
          MOLE_CHECK(p->begin() == covered, "checkpoint '", folder_, "': ", kind, " of '", t.name(), "' has ",
                     p->begin() < covered ? "overlapping pieces at element " : "no piece for elements from ",
                     p->begin() < covered ? p->begin() : covered);
          covered += p->numel();
        }
      }
      MOLE_CHECK(covered == numel, "checkpoint '", folder_, "': ", kind, " of '", t.name(), "' covers ", covered,
                 " of its ", numel, " elements");
    }
  }
  uint64_t bytes = 0;
  for (const pb::Piece& p : manifest_.pieces()) {
    verified_[&p] = false;
    piece_values(p);
    bytes += p.nbytes();
  }
  return bytes;
}

}  // namespace mole::ckpt
