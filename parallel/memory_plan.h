// What one rank of a training run holds and moves, from the run's shapes alone (`mole plan`,
// DESIGN.md §4): nothing is allocated and no weight is read, so a 70B layout can be planned on a
// laptop. Each category is what the trainer reports as measured in summary.json "memory", so a
// plan and a run can be held side by side.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "moe/adapter.h"
#include "moe/model_config.h"
#include "parallel/dispatch_plan.h"

namespace mole::parallel {

struct PlanInput {
  moe::ModelConfig model;    // with its decoder layers already cut to model.layers
  moe::AdapterSpec adapter;  // the expert allocation resolved
  int world = 1;
  int ep = 1;
  int zero = 0;
  int base_shard = 0;
  int64_t element_bytes = 4;  // of the frozen base: 2 (bf16), 4 (fp32), 8 (fp64)
  bool cuda = false;
  // LibTorch's fused scaled-dot-product attention keeps q, k, v, the output and the row
  // log-sum-exp; the explicit form keeps the S x S probabilities of every head.
  bool fused_attention = false;
  bool activation_checkpointing = false;
  int64_t micro_batch = 1;
  int64_t global_batch = 1;
  int64_t seq_len = 512;
  int64_t zero_bucket_bytes = 32 << 20;
  std::string dispatch = "auto";
};

// Bytes per rank. Every micro-batch of a step runs forward and backward in turn, so activations
// are those of one micro-batch.
struct MemoryPlan {
  int64_t base_bytes = 0;       // frozen tensors kept between uses (this rank's shard)
  int64_t gathered_bytes = 0;   // gathered and prefetched layers at the peak (+ the host pool)
  int64_t trainable_bytes = 0;
  int64_t grad_bytes = 0;       // at their peak (ZeRO: slices plus what backward holds)
  int64_t optimizer_bytes = 0;  // AdamW moments (ZeRO: this rank's slices)
  int64_t activation_bytes = 0;  // peak of the step's other tensors: kept for backward + working
  int64_t total_bytes = 0;       // the sum of the above: the step's peak

  // The parts of activation_bytes.
  int64_t layer_kept_bytes = 0;    // what one decoder layer keeps for its backward
  int64_t layers_kept_bytes = 0;   // all layers (with checkpointing: their inputs only)
  int64_t head_bytes = 0;          // final norm, logits and log-softmax kept for the loss
  int64_t working_bytes = 0;       // transient at the peak (gradients in flight, attention scores)
  int64_t micro_batches = 1;       // per step on each rank
  int64_t tokens = 0;              // per micro-batch on this rank

  // Bytes this rank sends per step, by collective (ring algorithms: an all-reduce of n bytes over
  // P ranks sends 2 n (P - 1)/P, an all-gather or reduce-scatter n (P - 1)/P).
  std::map<std::string, int64_t> comm;
  std::vector<SiteDispatch> dispatch;  // per MoE site under expert parallelism
};

// Throws mole::Error naming what does not fit the layout (ep, base_shard or the batch not
// dividing the world, expert counts ep cannot split).
MemoryPlan plan_memory(const PlanInput& input);

}  // namespace mole::parallel
