// Rotary position embeddings (see rope.h).
#include "moe/rope.h"

#include <ATen/ATen.h>

#include <cmath>

#include "kernels/check.h"

namespace mole::moe {
namespace {

// Llama 3.1 frequency scaling: long wavelengths are divided by `factor`, short ones kept, and
// the band between interpolated smoothly.
at::Tensor llama3_scale(const at::Tensor& inv_freq, const RopeConfig& rope) {
  const double old_ctx = static_cast<double>(rope.original_max_position_embeddings);
  const double low_freq_wavelen = old_ctx / rope.low_freq_factor;
  const double high_freq_wavelen = old_ctx / rope.high_freq_factor;
  at::Tensor wavelen = (2.0 * M_PI) / inv_freq;
  at::Tensor scaled = at::where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq);
  at::Tensor smooth = (old_ctx / wavelen - rope.low_freq_factor) /
                      (rope.high_freq_factor - rope.low_freq_factor);
  at::Tensor smoothed = (1.0 - smooth) * scaled / rope.factor + smooth * scaled;
  at::Tensor is_medium = (wavelen >= high_freq_wavelen).logical_and(wavelen <= low_freq_wavelen);
  return at::where(is_medium, smoothed, scaled);
}

}  // namespace

at::Tensor rope_inv_freq(const RopeConfig& rope, int64_t head_dim, at::ScalarType dtype) {
  MOLE_CHECK(head_dim > 0 && head_dim % 2 == 0, "RoPE needs an even head_dim, got ", head_dim);
  MOLE_CHECK(dtype == at::kFloat || dtype == at::kDouble, "RoPE tables are float32 or float64, got ",
             dtype);
  at::Tensor exponents = at::arange(0, head_dim, 2, at::kLong).to(dtype) / head_dim;
  at::Tensor inv_freq = at::pow(rope.theta, exponents).reciprocal();
  if (rope.type == "default") return inv_freq;
  if (rope.type == "linear") return inv_freq / rope.factor;
  if (rope.type == "llama3") return llama3_scale(inv_freq, rope);
  MOLE_FAIL("unsupported rope type '", rope.type, "' (supported: default, linear, llama3)");
}

RopeTables rope_tables(const at::Tensor& inv_freq, int64_t seq_len, const at::Device& device) {
  at::Tensor positions =
      at::arange(seq_len, at::TensorOptions(inv_freq.scalar_type()).device(device));
  at::Tensor freqs_Sh = at::outer(positions, inv_freq.to(device));
  at::Tensor emb_Sd = at::cat({freqs_Sh, freqs_Sh}, -1);
  return {emb_Sd.cos(), emb_Sd.sin()};
}

at::Tensor apply_rope(const at::Tensor& x_BHSd, const RopeTables& tables) {
  const int64_t half = x_BHSd.size(-1) / 2;
  at::Tensor x1 = x_BHSd.narrow(-1, 0, half);
  at::Tensor x2 = x_BHSd.narrow(-1, half, half);
  at::Tensor rotated = at::cat({x2.neg(), x1}, -1);
  at::Tensor cos = tables.cos_Sd.to(x_BHSd.scalar_type());
  at::Tensor sin = tables.sin_Sd.to(x_BHSd.scalar_type());
  return x_BHSd * cos + rotated * sin;
}

}  // namespace mole::moe
