// MoLA layer-wise expert allocation: how many experts each decoder layer gets.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mole::moe {

// The same count for every layer.
std::vector<int64_t> uniform_allocation(int64_t experts, int64_t num_layers);
// A pattern over equal layer groups: "2,4,6,8" over 32 layers gives layers 0-7 two experts,
// 8-15 four, 16-23 six, 24-31 eight. The layer count must be divisible by the group count.
std::vector<int64_t> pattern_allocation(const std::string& pattern, int64_t num_layers);
// An explicit per-layer list; its length must equal the layer count.
std::vector<int64_t> list_allocation(const std::vector<int64_t>& per_layer, int64_t num_layers);

// The parts that need no layer count (checked where the config is read): a pattern's group
// values, and counts that must each be at least 1. Errors start with the pattern or `what`.
std::vector<int64_t> expert_pattern_groups(const std::string& pattern);
void check_expert_counts(const std::vector<int64_t>& counts, const std::string& what);

}  // namespace mole::moe
