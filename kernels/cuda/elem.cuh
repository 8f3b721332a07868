// Element access of the CUDA kernels (device code; included by .cu files only): a row or weight
// element loaded into its accumulation type and an accumulator stored back, per element type.
// bfloat16 travels as its uint16 storage.
#pragma once

#include <cstdint>

namespace mole::kernels::cuda {

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Acc = float;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float a) { return a; }
};

template <>
struct Elem<double> {
  using Acc = double;
  __device__ static double load(double v) { return v; }
  __device__ static double store(double a) { return a; }
};

// bfloat16 as uint16 storage: the high half of a float32. Stores round to nearest even, as
// c10::BFloat16 does, and keep NaNs quiet.
template <>
struct Elem<uint16_t> {
  using Acc = float;
  __device__ static float load(uint16_t v) {
    return __uint_as_float(static_cast<uint32_t>(v) << 16);
  }
  __device__ static uint16_t store(float a) {
    const uint32_t bits = __float_as_uint(a);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
    return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
};

}  // namespace mole::kernels::cuda
