// The random draws of the model: generators seeded from a number, on a device, and dropout drawn
// from one of them (never from ATen's global default generator), so that a run is reproducible
// from its seed and a generator's state can be saved and restored.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace mole::moe {

// A new generator on `device` (CPU or CUDA) seeded with `seed`; independent of the global one.
at::Generator make_generator(uint64_t seed, const at::Device& device);

// Inverted dropout: x * mask / (1 - p) with mask ~ Bernoulli(1 - p) drawn from `gen` (on x's
// device). p in [0, 1); p = 0 returns x.
at::Tensor dropout(const at::Tensor& x, double p, const at::Generator& gen);

// The generator a training pass draws from, or an error naming `what` needs it.
const at::Generator& require_generator(const std::optional<at::Generator>& gen, const char* what);

}  // namespace mole::moe
