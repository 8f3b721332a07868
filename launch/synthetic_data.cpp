// The built-in "synthetic:multitask" data: string transformations chosen by a task tag, so that a
// router has distinct skills to separate. Random numbers come straight from std::mt19937_64
// (whose output the standard fixes) rather than from distributions, whose output is
// implementation-defined, so every platform generates the same data for a seed.
#include <algorithm>
#include <map>
#include <random>

#include "kernels/check.h"
#include "launch/data.h"

namespace mole::launch {
namespace {

// Uniform in [0, n) without modulo bias: reject the 2^64 mod n lowest raw values.
uint64_t below(std::mt19937_64& rng, uint64_t n) {
  const uint64_t threshold = (0 - n) % n;
  uint64_t r = rng();
  while (r < threshold) r = rng();
  return r % n;
}

std::string reversed(const std::string& s) { return {s.rbegin(), s.rend()}; }

std::string upper(std::string s) {
  for (char& c : s) c = static_cast<char>(c - 'a' + 'A');
  return s;
}

std::string sorted(std::string s) {
  std::sort(s.begin(), s.end());
  return s;
}

std::string caesar(std::string s) {
  for (char& c : s) c = static_cast<char>('a' + (c - 'a' + 1) % 26);
  return s;
}

// "aabac" -> "3a1b1c": the count of every letter, in alphabetical order.
std::string letter_counts(const std::string& s) {
  std::map<char, int> counts;
  for (char c : s) ++counts[c];
  std::string out;
  for (const auto& [c, n] : counts) out += std::to_string(n) + c;
  return out;
}

struct Task {
  const char* tag;
  std::string (*apply)(const std::string&);
};

const Task kTasks[] = {
    {"reverse", [](const std::string& s) { return reversed(s); }},
    {"upper", [](const std::string& s) { return upper(s); }},
    {"sort", [](const std::string& s) { return sorted(s); }},
    {"repeat", [](const std::string& s) { return s + s; }},
    {"caesar", [](const std::string& s) { return caesar(s); }},
    {"count", [](const std::string& s) { return letter_counts(s); }},
};

}  // namespace

std::vector<std::pair<std::string, std::string>> synthetic_multitask(int64_t count, uint64_t seed) {
  MOLE_CHECK(count > 0, "synthetic:multitask: the number of examples must be positive, got ",
             count);
  constexpr int64_t kNumTasks = sizeof(kTasks) / sizeof(kTasks[0]);
  // Short inputs over a small alphabet keep the tasks learnable by a tiny model in minutes.
  constexpr uint64_t kMinLen = 3, kMaxLen = 8, kLetters = 8;
  std::mt19937_64 rng(seed);
  std::vector<std::pair<std::string, std::string>> pairs;
  pairs.reserve(count);
  for (int64_t i = 0; i < count; ++i) {
    const Task& task = kTasks[i % kNumTasks];  // round robin: every task equally often
    const uint64_t len = kMinLen + below(rng, kMaxLen - kMinLen + 1);
    std::string input(len, 'a');
    for (char& c : input) c = static_cast<char>('a' + below(rng, kLetters));
    pairs.emplace_back(std::string(task.tag) + ": " + input + "\n", task.apply(input));
  }
  return pairs;
}

}  // namespace mole::launch
