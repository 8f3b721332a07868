// Learning-rate schedules (see schedule.h).
#include "launch/schedule.h"

#include <algorithm>
#include <cmath>

#include "kernels/check.h"

namespace mole::launch {

double learning_rate(const std::string& schedule, double lr, int64_t step, int64_t warmup,
                     int64_t total) {
  if (step < warmup) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  if (schedule == "constant") return lr;
  const double span = static_cast<double>(std::max<int64_t>(1, total - warmup));
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / span);
  if (schedule == "linear") return lr * (1.0 - progress);
  if (schedule == "cosine") return lr * 0.5 * (1.0 + std::cos(M_PI * progress));
  MOLE_FAIL("unknown schedule '", schedule, "' (allowed: constant, linear, cosine)");
}

}  // namespace mole::launch
