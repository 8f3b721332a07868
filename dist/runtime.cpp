// Rank detection from the launcher's environment (Open MPI, PMI, SLURM). No MPI calls here; the
// MPI-owning half of runtime.h lives in mpi_runtime.cpp.
#include "dist/runtime.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "kernels/check.h"

namespace mole::dist {
namespace {

std::optional<std::string> env(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr) return std::nullopt;
  return std::string(value);
}

// Strict: decimal digits only, no sign, no spaces, fits in int.
std::optional<int> parse_count(const std::string& text) {
  if (text.empty() || text.size() > 10) return std::nullopt;
  long long value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + (c - '0');
  }
  if (value > std::numeric_limits<int>::max()) return std::nullopt;
  return static_cast<int>(value);
}

int parse_var(const char* name, const std::string& text) {
  std::optional<int> value = parse_count(text);
  MOLE_CHECK(value.has_value(), "environment variable ", name, "='", text,
             "' is not a non-negative integer");
  return *value;
}

std::optional<int> read_var(const char* name) {
  std::optional<std::string> text = env(name);
  if (!text) return std::nullopt;
  return parse_var(name, *text);
}

// A (rank, size) pair of variables: both or neither.
std::optional<std::pair<int, int>> read_pair(const char* rank_name, const char* size_name) {
  std::optional<int> rank = read_var(rank_name);
  std::optional<int> size = read_var(size_name);
  if (!rank && !size) return std::nullopt;
  MOLE_CHECK(rank.has_value(), "environment variable ", size_name, " is set but ", rank_name,
             " is not");
  MOLE_CHECK(size.has_value(), "environment variable ", rank_name, " is set but ", size_name,
             " is not");
  MOLE_CHECK(*size >= 1, "environment variable ", size_name, "=", *size, " must be at least 1");
  MOLE_CHECK(*rank < *size, "environment variable ", rank_name, "=", *rank, " is not below ",
             size_name, "=", *size);
  return std::make_pair(*rank, *size);
}

// SLURM's compressed tasks-per-node list: "2(x3),1" means 2, 2, 2, 1.
std::vector<int> parse_tasks_per_node(const char* name, const std::string& text) {
  std::vector<int> counts;
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t comma = std::min(text.find(',', pos), text.size());
    const std::string item = text.substr(pos, comma - pos);
    const size_t paren = item.find('(');
    std::optional<int> count = parse_count(item.substr(0, paren));
    std::optional<int> repeat = 1;
    if (paren != std::string::npos) {
      const bool framed = item.size() > paren + 3 && item[paren + 1] == 'x' && item.back() == ')';
      repeat = framed ? parse_count(item.substr(paren + 2, item.size() - paren - 3)) : std::nullopt;
    }
    MOLE_CHECK(count && repeat && *count >= 1 && *repeat >= 1 && *repeat <= (1 << 20),
               "environment variable ", name, "='", text, "' is not a tasks-per-node list like ",
               "'2(x3),1' (bad item '", item, "')");
    counts.insert(counts.end(), static_cast<size_t>(*repeat), *count);
    pos = comma + 1;
  }
  return counts;
}

RankInfo make_info(std::pair<int, int> world, std::optional<std::pair<int, int>> local) {
  RankInfo info;
  info.rank = world.first;
  info.world = world.second;
  // Without node-local variables: one node holds the whole world.
  info.local_rank = local ? local->first : world.first;
  info.local_world = local ? local->second : world.second;
  return info;
}

std::optional<RankInfo> from_open_mpi() {
  auto world = read_pair("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE");
  if (!world) return std::nullopt;
  return make_info(*world, read_pair("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"));
}

std::optional<RankInfo> from_pmi() {
  auto world = read_pair("PMI_RANK", "PMI_SIZE");
  if (!world) return std::nullopt;
  return make_info(*world, read_pair("MPI_LOCALRANKID", "MPI_LOCALNRANKS"));
}

std::optional<RankInfo> from_slurm() {
  auto world = read_pair("SLURM_PROCID", "SLURM_NTASKS");
  if (!world) return std::nullopt;
  std::optional<int> local_rank = read_var("SLURM_LOCALID");
  if (!local_rank) return make_info(*world, std::nullopt);

  const char* list_name = "SLURM_STEP_TASKS_PER_NODE";
  std::optional<std::string> list = env(list_name);
  if (!list) {
    list_name = "SLURM_TASKS_PER_NODE";
    list = env(list_name);
  }
  int local_world = world->second;
  if (list) {
    std::vector<int> counts = parse_tasks_per_node(list_name, *list);
    const int node = read_var("SLURM_NODEID").value_or(0);
    MOLE_CHECK(node < static_cast<int>(counts.size()), "environment variable SLURM_NODEID=", node,
               " is not below the ", counts.size(), " nodes of ", list_name, "='", *list, "'");
    local_world = counts[static_cast<size_t>(node)];
  }
  MOLE_CHECK(*local_rank < local_world, "environment variable SLURM_LOCALID=", *local_rank,
             " is not below the ", local_world, " tasks on this node");
  return make_info(*world, std::make_pair(*local_rank, local_world));
}

}  // namespace

RankInfo detect_rank_info() {
  if (auto info = from_open_mpi()) return *info;
  if (auto info = from_pmi()) return *info;
  if (auto info = from_slurm()) return *info;
  return RankInfo{};
}

const char* to_string(ThreadLevel level) {
  switch (level) {
    case ThreadLevel::kSingle:
      return "MPI_THREAD_SINGLE";
    case ThreadLevel::kFunneled:
      return "MPI_THREAD_FUNNELED";
    case ThreadLevel::kSerialized:
      return "MPI_THREAD_SERIALIZED";
    case ThreadLevel::kMultiple:
      return "MPI_THREAD_MULTIPLE";
  }
  return "unknown thread level";
}

std::string host_name() {
  char name[256] = {};
  return ::gethostname(name, sizeof name - 1) == 0 ? std::string(name) : std::string("?");
}

}  // namespace mole::dist
