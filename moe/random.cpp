// Generators and dropout (see random.h).
#include "moe/random.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <mutex>
#include <optional>

#include "kernels/check.h"

namespace mole::moe {

at::Generator make_generator(uint64_t seed, const at::Device& device) {
  if (device.is_cpu()) return at::make_generator<at::CPUGeneratorImpl>(seed);
  // A copy of the device's default generator (its type is only known to the CUDA library),
  // then reseeded: the global one is not touched.
  at::Generator global = at::globalContext().defaultGenerator(device);
  at::Generator gen;
  {
    std::lock_guard<std::mutex> lock(global.mutex());
    gen = global.clone();
  }
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_current_seed(seed);
  return gen;
}

at::Tensor dropout(const at::Tensor& x, double p, const at::Generator& gen) {
  MOLE_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1), got ", p);
  if (p == 0.0) return x;
  // A bool mask: what autograd keeps for the backward is one byte per element.
  at::Tensor mask = at::empty_like(x, x.options().dtype(at::kBool)).bernoulli_(1.0 - p, gen);
  return x * mask * (1.0 / (1.0 - p));
}

const at::Generator& require_generator(const std::optional<at::Generator>& gen, const char* what) {
  MOLE_CHECK(gen.has_value(), what,
             " draws random numbers in training but no generator was given (set "
             "ForwardContext::generator; mole never draws from the global default generator)");
  return *gen;
}

}  // namespace mole::moe
