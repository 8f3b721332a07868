// Consistency checks of a decoder architecture (see model_config.h).
#include "moe/model_config.h"

#include "kernels/check.h"

namespace mole::moe {

void ModelConfig::validate() const {
  MOLE_CHECK(vocab_size > 0, "vocab_size must be positive, got ", vocab_size);
  MOLE_CHECK(hidden_size > 0, "hidden_size must be positive, got ", hidden_size);
  MOLE_CHECK(intermediate_size > 0, "intermediate_size must be positive, got ", intermediate_size);
  MOLE_CHECK(num_layers > 0, "num_hidden_layers must be positive, got ", num_layers);
  MOLE_CHECK(num_heads > 0, "num_attention_heads must be positive, got ", num_heads);
  MOLE_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "num_attention_heads (", num_heads,
             ") must be a multiple of num_key_value_heads (", num_kv_heads, ")");
  MOLE_CHECK(head_dim > 0 && head_dim % 2 == 0, "head_dim must be positive and even, got ",
             head_dim);
  MOLE_CHECK(rms_norm_eps > 0.0, "rms_norm_eps must be positive, got ", rms_norm_eps);
  MOLE_CHECK(rope.theta > 0.0, "rope_theta must be positive, got ", rope.theta);
  MOLE_CHECK(hidden_act == "silu", "hidden_act '", hidden_act, "' is not supported (only silu)");
  MOLE_CHECK(!sliding_window || *sliding_window > 0, "sliding_window must be positive, got ",
             sliding_window.value_or(0));
}

}  // namespace mole::moe
