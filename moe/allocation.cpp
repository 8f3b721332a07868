// MoLA layer-wise expert allocation (see allocation.h).
#include "moe/allocation.h"

#include <sstream>

#include "kernels/check.h"

namespace mole::moe {
void check_expert_counts(const std::vector<int64_t>& counts, const std::string& what) {
  for (size_t i = 0; i < counts.size(); ++i) {
    MOLE_CHECK(counts[i] >= 1, what, ": expert count ", counts[i], " at position ", i,
               " must be at least 1");
  }
}

std::vector<int64_t> uniform_allocation(int64_t experts, int64_t num_layers) {
  MOLE_CHECK(experts >= 1, "expert count must be at least 1, got ", experts);
  return std::vector<int64_t>(static_cast<size_t>(num_layers), experts);
}

std::vector<int64_t> expert_pattern_groups(const std::string& pattern) {
  std::vector<int64_t> groups;
  std::stringstream in(pattern);
  std::string item;
  while (std::getline(in, item, ',')) {
    size_t used = 0;
    int64_t value = 0;
    try {
      value = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    while (used < item.size() && item[used] == ' ') ++used;
    MOLE_CHECK(used == item.size() && !item.empty(), "expert pattern '", pattern,
               "': '", item, "' is not an integer (expected e.g. \"2,4,6,8\")");
    groups.push_back(value);
  }
  MOLE_CHECK(!groups.empty(), "expert pattern '", pattern, "' is empty");
  check_expert_counts(groups, "expert pattern '" + pattern + "'");
  return groups;
}

std::vector<int64_t> pattern_allocation(const std::string& pattern, int64_t num_layers) {
  const std::vector<int64_t> groups = expert_pattern_groups(pattern);
  const int64_t num_groups = static_cast<int64_t>(groups.size());
  MOLE_CHECK(num_layers % num_groups == 0, "expert pattern '", pattern, "' has ", num_groups,
             " groups, which do not divide the model's ", num_layers, " layers");
  std::vector<int64_t> counts;
  const int64_t per_group = num_layers / num_groups;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    counts.push_back(groups[static_cast<size_t>(layer / per_group)]);
  }
  return counts;
}

std::vector<int64_t> list_allocation(const std::vector<int64_t>& per_layer, int64_t num_layers) {
  MOLE_CHECK(static_cast<int64_t>(per_layer.size()) == num_layers, "per-layer expert list has ",
             per_layer.size(), " entries but the model has ", num_layers, " layers");
  check_expert_counts(per_layer, "per-layer expert list");
  return per_layer;
}

}  // namespace mole::moe
