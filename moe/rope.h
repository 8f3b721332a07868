// Rotary position embeddings as transformers computes them (default, linear and llama3
// frequency scaling; rotate-half layout).
//
// Legend: B batch, H heads, S sequence, d head_dim.
#pragma once

#include <ATen/core/Tensor.h>

#include "moe/model_config.h"

namespace mole::moe {

// inv_freq [d/2]: 1 / theta^(2i/d), then scaled per `rope.type`. float32 as transformers
// computes it, or float64 (the fp64 exactness mode, which computes everything in float64 so that
// its results do not depend on the CPU's float32 kernels).
at::Tensor rope_inv_freq(const RopeConfig& rope, int64_t head_dim,
                         at::ScalarType dtype = at::kFloat);

struct RopeTables {
  at::Tensor cos_Sd;  // inv_freq's dtype
  at::Tensor sin_Sd;
};

// cos/sin tables for positions 0..seq_len-1 on `device`, in inv_freq's dtype.
RopeTables rope_tables(const at::Tensor& inv_freq, int64_t seq_len, const at::Device& device);

// x * cos + rotate_half(x) * sin for x [B, H, S, d]; tables are cast to x's dtype.
at::Tensor apply_rope(const at::Tensor& x_BHSd, const RopeTables& tables);

}  // namespace mole::moe
