// Learning-rate schedules: linear warmup, then constant, linear or cosine decay.
#pragma once

#include <cstdint>
#include <string>

namespace mole::launch {

// Learning rate at 0-based `step` of `total` steps: linear warmup over `warmup` steps to `lr`
// (step s < warmup gives lr (s+1)/warmup), then constant, linear decay to 0 at `total`, or cosine
// decay to 0 at `total`.
double learning_rate(const std::string& schedule, double lr, int64_t step, int64_t warmup,
                     int64_t total);

}  // namespace mole::launch
