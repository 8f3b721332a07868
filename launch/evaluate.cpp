// Held-out evaluation (see evaluate.h).
#include "launch/evaluate.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

namespace mole::launch {

EvalResult evaluate(const moe::CausalLM& model, const std::vector<Example>& examples,
                    int64_t micro_batch, int64_t pad_id, const moe::Dispatcher* dispatcher) {
  at::NoGradGuard no_grad;
  double loss_sum = 0.0;
  int64_t correct = 0, tokens = 0;
  for (size_t begin = 0; begin < examples.size(); begin += static_cast<size_t>(micro_batch)) {
    std::vector<const Example*> batch;
    for (size_t i = begin; i < std::min(examples.size(), begin + static_cast<size_t>(micro_batch)); ++i) {
      batch.push_back(&examples[i]);
    }
    MicroBatch mb = collate(batch, pad_id);
    moe::ForwardContext ctx;
    ctx.dispatcher = dispatcher;
    at::Tensor logits = model.forward(mb.input_ids_BS, ctx);
    moe::LossSum ls = moe::causal_lm_loss_sum(logits, mb.labels_BS);
    const int64_t S = logits.size(1);
    at::Tensor targets = mb.labels_BS.narrow(1, 1, S - 1).to(logits.device());
    at::Tensor predicted = logits.narrow(1, 0, S - 1).argmax(-1);
    at::Tensor counted = targets != -100;
    // Device -> host syncs: two scalars per micro-batch.
    correct += (predicted.eq(targets).logical_and(counted)).sum().item<int64_t>();
    loss_sum += ls.sum.item<double>();
    tokens += ls.num_tokens;
  }
  EvalResult r;
  r.tokens = tokens;
  r.loss = tokens > 0 ? loss_sum / static_cast<double>(tokens) : std::nan("");
  r.accuracy = tokens > 0 ? static_cast<double>(correct) / static_cast<double>(tokens) : 0.0;
  return r;
}

}  // namespace mole::launch
