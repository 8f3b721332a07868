// Rotary position embeddings as transformers computes them (default, linear and llama3
// frequency scaling; rotate-half layout).
//
// Legend: B batch, H heads, S sequence, d head_dim.
#pragma once

#include <ATen/core/Tensor.h>

#include "moe/model_config.h"

namespace mole::moe {

// inv_freq [d/2], float32: 1 / theta^(2i/d), then scaled per `rope.type`.
at::Tensor rope_inv_freq(const RopeConfig& rope, int64_t head_dim);

struct RopeTables {
  at::Tensor cos_Sd;  // float32
  at::Tensor sin_Sd;
};

// cos/sin tables for positions 0..seq_len-1 on `device`.
RopeTables rope_tables(const at::Tensor& inv_freq, int64_t seq_len, const at::Device& device);

// x * cos + rotate_half(x) * sin for x [B, H, S, d]; tables are cast to x's dtype.
at::Tensor apply_rope(const at::Tensor& x_BHSd, const RopeTables& tables);

}  // namespace mole::moe
