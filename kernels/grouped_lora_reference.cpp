// Plain-loop CPU references of the CUDA grouped LoRA launchers (see grouped_lora_reference.h).
//
// Legend: N rows (grouped by expert), I in features, O out features, E experts, r LoRA rank.
#include "kernels/grouped_lora_reference.h"

#include <cstring>
#include <vector>

namespace mole::kernels::reference {
namespace {

// Element conversions to and from acc; bfloat16 (uint16 storage) as the CUDA kernels do it.
float to_acc(float v) { return v; }
double to_acc(double v) { return v; }
float to_acc(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
T from_acc(ReferenceAcc<T> a) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    uint32_t bits;
    std::memcpy(&bits, &a, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
    return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  } else {
    return static_cast<T>(a);
  }
}

// Rows [begin, end) of expert e.
struct Segment {
  int64_t begin, end;
};

Segment segment(const int64_t* offsets_E1, int64_t e) { return {offsets_E1[e], offsets_E1[e + 1]}; }

}  // namespace

template <typename T, typename W>
void grouped_lora_shrink(const T* x_NI, const W* a_ErI, const int64_t* offsets_E1,
                         ReferenceAcc<T>* xa_Nr, int64_t num_rows, int64_t in_features,
                         int64_t rank, int64_t num_experts) {
  for (int64_t e = 0; e < num_experts; ++e) {
    const W* a_rI = a_ErI + e * rank * in_features;
    const Segment seg = segment(offsets_E1, e);
    for (int64_t n = seg.begin; n < seg.end; ++n) {
      for (int64_t j = 0; j < rank; ++j) {
        ReferenceAcc<T> acc = 0;
        for (int64_t i = 0; i < in_features; ++i) {
          acc += to_acc(x_NI[n * in_features + i]) * to_acc(a_rI[j * in_features + i]);
        }
        xa_Nr[n * rank + j] = acc;
      }
    }
  }
}

template <typename T, typename W>
void grouped_lora_expand(const ReferenceAcc<T>* xa_Nr, const W* b_EOr, const int64_t* offsets_E1,
                         double scale, T* y_NO, int64_t num_rows, int64_t out_features,
                         int64_t rank, int64_t num_experts) {
  const auto s = static_cast<ReferenceAcc<T>>(scale);
  for (int64_t e = 0; e < num_experts; ++e) {
    const W* b_Or = b_EOr + e * out_features * rank;
    const Segment seg = segment(offsets_E1, e);
    for (int64_t n = seg.begin; n < seg.end; ++n) {
      for (int64_t o = 0; o < out_features; ++o) {
        ReferenceAcc<T> acc = 0;
        for (int64_t j = 0; j < rank; ++j) acc += xa_Nr[n * rank + j] * to_acc(b_Or[o * rank + j]);
        y_NO[n * out_features + o] = from_acc<T>(s * acc);
      }
    }
  }
}

template <typename T, typename W>
void grouped_lora_backward(const T* gy_NO, const T* x_NI, const W* a_ErI, const W* b_EOr,
                           const ReferenceAcc<T>* xa_Nr, const int64_t* offsets_E1, double scale,
                           T* gx_NI, W* ga_ErI, W* gb_EOr, int64_t num_rows, int64_t in_features,
                           int64_t out_features, int64_t rank, int64_t num_experts) {
  using Acc = ReferenceAcc<T>;
  const auto s = static_cast<Acc>(scale);
  const int64_t I = in_features, O = out_features;
  std::vector<Acc> gxa_Nr(static_cast<size_t>(num_rows * rank));
  for (int64_t e = 0; e < num_experts; ++e) {
    const W* a_rI = a_ErI + e * rank * I;
    const W* b_Or = b_EOr + e * O * rank;
    const Segment seg = segment(offsets_E1, e);
    for (int64_t n = seg.begin; n < seg.end; ++n) {
      for (int64_t j = 0; j < rank; ++j) {  // gxa = scale * gy · B_e
        Acc acc = 0;
        for (int64_t o = 0; o < O; ++o) acc += to_acc(gy_NO[n * O + o]) * to_acc(b_Or[o * rank + j]);
        gxa_Nr[static_cast<size_t>(n * rank + j)] = s * acc;
      }
      for (int64_t i = 0; i < I; ++i) {  // gx = gxa · A_e
        Acc acc = 0;
        for (int64_t j = 0; j < rank; ++j) {
          acc += gxa_Nr[static_cast<size_t>(n * rank + j)] * to_acc(a_rI[j * I + i]);
        }
        gx_NI[n * I + i] = from_acc<T>(acc);
      }
    }
    for (int64_t o = 0; o < O; ++o) {  // gB_e = scale * gy_e^T · xa_e
      for (int64_t j = 0; j < rank; ++j) {
        Acc acc = 0;
        for (int64_t n = seg.begin; n < seg.end; ++n) {
          acc += to_acc(gy_NO[n * O + o]) * xa_Nr[n * rank + j];
        }
        gb_EOr[(e * O + o) * rank + j] = from_acc<W>(s * acc);
      }
    }
    for (int64_t j = 0; j < rank; ++j) {  // gA_e = gxa_e^T · x_e
      for (int64_t i = 0; i < I; ++i) {
        Acc acc = 0;
        for (int64_t n = seg.begin; n < seg.end; ++n) {
          acc += gxa_Nr[static_cast<size_t>(n * rank + j)] * to_acc(x_NI[n * I + i]);
        }
        ga_ErI[(e * rank + j) * I + i] = from_acc<W>(acc);
      }
    }
  }
}

// The supported (row, weight) type pairs.
#define MOLE_GROUPED_LORA_REFERENCE(T, W)                                                       \
  template void grouped_lora_shrink<T, W>(const T*, const W*, const int64_t*, ReferenceAcc<T>*, \
                                          int64_t, int64_t, int64_t, int64_t);                  \
  template void grouped_lora_expand<T, W>(const ReferenceAcc<T>*, const W*, const int64_t*,     \
                                          double, T*, int64_t, int64_t, int64_t, int64_t);      \
  template void grouped_lora_backward<T, W>(const T*, const T*, const W*, const W*,             \
                                            const ReferenceAcc<T>*, const int64_t*, double, T*, \
                                            W*, W*, int64_t, int64_t, int64_t, int64_t, int64_t);
MOLE_GROUPED_LORA_REFERENCE(float, float)
MOLE_GROUPED_LORA_REFERENCE(double, double)
MOLE_GROUPED_LORA_REFERENCE(uint16_t, float)
MOLE_GROUPED_LORA_REFERENCE(uint16_t, uint16_t)
#undef MOLE_GROUPED_LORA_REFERENCE

}  // namespace mole::kernels::reference
