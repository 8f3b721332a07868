// CPU reference grouped LoRA (see grouped_lora.h).
#include "kernels/grouped_lora.h"

#include <ATen/ATen.h>

#include "kernels/check.h"

namespace mole::kernels {

at::Tensor grouped_lora(const at::Tensor& x_NI, const at::Tensor& a_ErI, const at::Tensor& b_EOr,
                        const std::vector<int64_t>& counts, double scale) {
  MOLE_CHECK(a_ErI.dim() == 3 && b_EOr.dim() == 3 && a_ErI.size(0) == b_EOr.size(0) &&
                 a_ErI.size(1) == b_EOr.size(2),
             "grouped_lora: expected A [E, r, I] and B [E, O, r], got ", a_ErI.sizes(), " and ",
             b_EOr.sizes());
  const int64_t num_experts = a_ErI.size(0);
  MOLE_CHECK(static_cast<int64_t>(counts.size()) == num_experts, "grouped_lora: ", counts.size(),
             " counts for ", num_experts, " experts");
  MOLE_CHECK(x_NI.dim() == 2 && x_NI.size(1) == a_ErI.size(2), "grouped_lora: expected x of [N, ",
             a_ErI.size(2), "], got ", x_NI.sizes());
  int64_t total = 0;
  for (int64_t c : counts) {
    MOLE_CHECK(c >= 0, "grouped_lora: negative row count ", c);
    total += c;
  }
  MOLE_CHECK(total == x_NI.size(0), "grouped_lora: counts sum to ", total, " but x has ",
             x_NI.size(0), " rows");

  at::Tensor x = x_NI.to(a_ErI.scalar_type());
  std::vector<at::Tensor> segments;
  segments.reserve(counts.size());
  int64_t begin = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t rows = counts[static_cast<size_t>(e)];
    if (rows == 0) continue;
    at::Tensor x_e = x.narrow(0, begin, rows);
    segments.push_back(at::linear(at::linear(x_e, a_ErI[e]), b_EOr[e]));
    begin += rows;
  }
  if (segments.empty()) {
    // No rows: an empty result that still depends on A and B, so backward reaches them (zeros).
    return (at::zeros({0, b_EOr.size(1)}, x.options()) + (a_ErI.sum() + b_EOr.sum()) * 0.0)
        .to(x_NI.scalar_type());
  }
  return at::cat(segments, 0).mul(scale).to(x_NI.scalar_type());
}

}  // namespace mole::kernels
