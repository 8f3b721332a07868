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

}  // namespace mole::moe
