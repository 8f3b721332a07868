// Held-out evaluation: loss and next-token accuracy on the response tokens of a set of examples.
#pragma once

#include <cstdint>
#include <vector>

#include "launch/data.h"
#include "launch/metrics_sink.h"
#include "moe/llama.h"

namespace mole::launch {

// Loss and next-token accuracy on response tokens (labels != -100) of `examples`, in
// micro-batches of `micro_batch`. With a dispatcher (expert parallelism) the call is collective
// over its EP group.
EvalResult evaluate(const moe::CausalLM& model, const std::vector<Example>& examples,
                    int64_t micro_batch, int64_t pad_id,
                    const moe::Dispatcher* dispatcher = nullptr);

}  // namespace mole::launch
