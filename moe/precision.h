// The dtype of adapters (LoRA, experts, routers) and of router and loss math: float32 whatever the
// model dtype (bf16 included), or float64 when the model itself runs in float64 (the exactness
// checks of the test suite, where float32 rounding would otherwise be amplified by AdamW).
#pragma once

#include <c10/core/ScalarType.h>

namespace mole::moe {

inline c10::ScalarType adapter_dtype(c10::ScalarType model_dtype) {
  return model_dtype == c10::ScalarType::Double ? c10::ScalarType::Double
                                                : c10::ScalarType::Float;
}

// The dtype LoRA products run in when activations of `activation_dtype` meet adapter weights of
// `weight_dtype`: reduced-precision activations (bf16 on CUDA) keep their dtype and the float32
// master weights are cast to it (as autocast does: tensor-core products with float32
// accumulation, no float32 copy of the activations); otherwise the weights' dtype.
inline c10::ScalarType lora_compute_dtype(c10::ScalarType activation_dtype,
                                          c10::ScalarType weight_dtype) {
  const bool reduced = activation_dtype == c10::ScalarType::BFloat16 ||
                       activation_dtype == c10::ScalarType::Half;
  return reduced ? activation_dtype : weight_dtype;
}

}  // namespace mole::moe
