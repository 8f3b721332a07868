// The grouped LoRA kernels against their references. On the CPU: the plain-loop references of
// kernels/grouped_lora_reference.h (the contract of the CUDA launchers), forward and backward,
// against the ATen path of kernels/grouped_lora.h and its autograd. On a GPU: the CUDA twin
// (reached through grouped_lora on CUDA tensors) against the plain-loop references, forward and
// backward, plus determinism and the routing to the CUDA path.
//
// Legend: N rows (grouped by expert), I in features, O out features, E experts, r LoRA rank.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/function.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/grouped_lora_ops.h"
#include "kernels/grouped_lora.h"
#include "kernels/grouped_lora_reference.h"
#include "tests/test_util.h"

namespace mole {
namespace {

// One problem: rows grouped by expert with `counts` rows each, on the host.
struct Inputs {
  at::Tensor x_NI, a_ErI, b_EOr, gy_NO;
  std::vector<int64_t> counts;
  double scale = 0.75;
};

// Forward and backward results; xa_Nr only where the path exposes it.
struct Outputs {
  at::Tensor xa_Nr, y_NO, gx_NI, ga_ErI, gb_EOr;
};

struct Case {
  std::string name;
  std::vector<int64_t> counts;
  int64_t in_features, out_features, rank;
};

std::vector<Case> cases() {
  return {
      {"uneven, expert 1 empty, I = 13", {3, 0, 5, 1}, 13, 11, 8},
      {"single expert", {7}, 16, 24, 16},
      {"no rows", {0, 0, 0}, 9, 5, 4},
      {"rank 1, odd sizes", {2, 3}, 10, 7, 1},
      {"rank 64", {5, 4}, 40, 33, 64},
      {"last expert empty, many rows", {37, 70, 0}, 264, 48, 16},
  };
}

// Random data of the case in the given dtypes (weights in `weights`, rows and gy in `rows`).
Inputs make_inputs(const Case& c, at::ScalarType rows, at::ScalarType weights, uint64_t seed) {
  at::manual_seed(seed);
  int64_t num_rows = 0;
  for (int64_t n : c.counts) num_rows += n;
  const auto num_experts = static_cast<int64_t>(c.counts.size());
  Inputs in;
  in.x_NI = at::randn({num_rows, c.in_features}, at::kDouble).to(rows);
  in.a_ErI = (at::randn({num_experts, c.rank, c.in_features}, at::kDouble) * 0.1).to(weights);
  in.b_EOr = (at::randn({num_experts, c.out_features, c.rank}, at::kDouble) * 0.1).to(weights);
  in.gy_NO = at::randn({num_rows, c.out_features}, at::kDouble).to(rows);
  in.counts = c.counts;
  return in;
}

at::ScalarType acc_dtype(at::ScalarType rows) {
  return rows == at::kDouble ? at::kDouble : at::kFloat;
}

// The raw pointer of a contiguous CPU tensor as the reference's element type (bfloat16 tensors
// as their uint16 storage).
template <typename T>
T* ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

template <typename T, typename W>
Outputs run_reference_typed(const Inputs& in) {
  const int64_t N = in.x_NI.size(0), I = in.x_NI.size(1), O = in.b_EOr.size(1);
  const int64_t r = in.a_ErI.size(1), E = in.a_ErI.size(0);
  std::vector<int64_t> offsets(in.counts.size() + 1, 0);
  for (size_t e = 0; e < in.counts.size(); ++e) offsets[e + 1] = offsets[e] + in.counts[e];
  const at::Tensor x = in.x_NI.contiguous(), a = in.a_ErI.contiguous(), b = in.b_EOr.contiguous();
  const at::Tensor gy = in.gy_NO.contiguous();
  Outputs out;
  out.xa_Nr = at::empty({N, r}, x.options().dtype(acc_dtype(x.scalar_type())));
  out.y_NO = at::empty({N, O}, x.options());
  out.gx_NI = at::empty_like(x);
  out.ga_ErI = at::empty_like(a);
  out.gb_EOr = at::empty_like(b);
  using Acc = kernels::reference::ReferenceAcc<T>;
  kernels::reference::grouped_lora_shrink(ptr<T>(x), ptr<W>(a), offsets.data(), ptr<Acc>(out.xa_Nr),
                                          N, I, r, E);
  kernels::reference::grouped_lora_expand(ptr<Acc>(out.xa_Nr), ptr<W>(b), offsets.data(), in.scale,
                                          ptr<T>(out.y_NO), N, O, r, E);
  kernels::reference::grouped_lora_backward(ptr<T>(gy), ptr<T>(x), ptr<W>(a), ptr<W>(b),
                                            ptr<Acc>(out.xa_Nr), offsets.data(), in.scale,
                                            ptr<T>(out.gx_NI), ptr<W>(out.ga_ErI),
                                            ptr<W>(out.gb_EOr), N, I, O, r, E);
  return out;
}

Outputs run_reference(const Inputs& in) {
  const at::ScalarType rows = in.x_NI.scalar_type(), weights = in.a_ErI.scalar_type();
  if (rows == at::kFloat && weights == at::kFloat) return run_reference_typed<float, float>(in);
  if (rows == at::kDouble && weights == at::kDouble) return run_reference_typed<double, double>(in);
  if (rows == at::kBFloat16 && weights == at::kFloat) {
    return run_reference_typed<uint16_t, float>(in);
  }
  if (rows == at::kBFloat16 && weights == at::kBFloat16) {
    return run_reference_typed<uint16_t, uint16_t>(in);
  }
  ADD_FAILURE() << "no reference for rows " << rows << " with weights " << weights;
  return {};
}

// Gradient of a leaf, zeros when autograd left it undefined.
at::Tensor grad_of(const at::Tensor& t) {
  return t.grad().defined() ? t.grad() : at::zeros_like(t);
}

// grouped_lora and its autograd on `device`; results on the host. `grad_fn` gets the name of the
// output's autograd node.
Outputs run_grouped_lora(const Inputs& in, at::Device device, std::string* grad_fn = nullptr) {
  at::Tensor x = in.x_NI.to(device).requires_grad_(true);
  at::Tensor a = in.a_ErI.to(device).requires_grad_(true);
  at::Tensor b = in.b_EOr.to(device).requires_grad_(true);
  at::Tensor y = kernels::grouped_lora(x, a, b, in.counts, in.scale);
  if (grad_fn != nullptr) *grad_fn = y.grad_fn() ? y.grad_fn()->name() : "<none>";
  (y * in.gy_NO.to(device)).sum().backward();
  return {at::Tensor(), y.detach().cpu(), grad_of(x).cpu(), grad_of(a).cpu(), grad_of(b).cpu()};
}

// xa = x_e A_e^T per segment in float64, from ATen.
at::Tensor aten_xa(const Inputs& in) {
  at::Tensor x = in.x_NI.to(at::kDouble), a = in.a_ErI.to(at::kDouble);
  std::vector<at::Tensor> parts;
  int64_t begin = 0;
  for (size_t e = 0; e < in.counts.size(); ++e) {
    parts.push_back(at::mm(x.narrow(0, begin, in.counts[e]), a[static_cast<int64_t>(e)].t()));
    begin += in.counts[e];
  }
  return parts.empty() ? at::empty({0, in.a_ErI.size(1)}, at::kDouble) : at::cat(parts);
}

using test::expect_close;

// Tolerances (relative, whole tensor): output rows in the row dtype (y, gx), weight gradients in
// the weights' dtype (gA, gB).
struct Precision {
  at::ScalarType rows, weights;
  double row_tol, weight_tol;
};

void expect_outputs_close(const Outputs& got, const Outputs& want, const Precision& p) {
  expect_close(got.y_NO, want.y_NO, p.row_tol, "y");
  expect_close(got.gx_NI, want.gx_NI, p.row_tol, "grad x");
  expect_close(got.ga_ErI, want.ga_ErI, p.weight_tol, "grad A");
  expect_close(got.gb_EOr, want.gb_EOr, p.weight_tol, "grad B");
}

std::string trace(const Precision& p, const Case& c) {
  return std::string("rows ") + c10::toString(p.rows) + ", weights " + c10::toString(p.weights) +
         ": " + c.name;
}

// Rounding one bfloat16 value differently moves it by one unit in the last place, at most 2^-7
// of its size; so a bfloat16 output whose float32 sums merely ran in another order is within
// 2^-7 < 8e-3 of the other, as a whole tensor too.
constexpr double kBFloat16Tol = 8e-3;

// Worst errors of the references against ATen measured over these cases (x86-64, Debian's
// LibTorch 1.13): float64 7e-16; float32 3.1e-7 (xa, y, gx, gA, gB); bfloat16 rows with float32
// weights: y and gx 1.8e-6 (mostly bit-equal; one element rounded the other way), xa, gA and gB
// 3.1e-7. Tolerances: 1e-12, 2e-6, and kBFloat16Tol for bfloat16 outputs.
TEST(GroupedLoraKernelReference, MatchesAtenForwardAndBackward) {
  for (const Precision& p : {Precision{at::kDouble, at::kDouble, 1e-12, 1e-12},
                             Precision{at::kFloat, at::kFloat, 2e-6, 2e-6},
                             Precision{at::kBFloat16, at::kFloat, kBFloat16Tol, 2e-6}}) {
    for (const Case& c : cases()) {
      SCOPED_TRACE(trace(p, c));
      const Inputs in = make_inputs(c, p.rows, p.weights, /*seed=*/c.counts.size() + c.rank);
      const Outputs ref = run_reference(in);
      expect_outputs_close(ref, run_grouped_lora(in, at::kCPU), p);
      // xa in acc against float64 products of the same (exactly widened) inputs.
      expect_close(ref.xa_Nr.to(at::kDouble), aten_xa(in),
                   p.rows == at::kDouble ? 1e-12 : 2e-6, "xa");
    }
  }
}

// The reference's weight gradients of an expert without rows are zeros, whatever was in the
// output buffers before.
TEST(GroupedLoraKernelReference, EmptyExpertsGetZeroWeightGradients) {
  const Case c{"expert 1 empty", {3, 0, 2}, 6, 5, 4};
  const Inputs in = make_inputs(c, at::kFloat, at::kFloat, 7);
  const Outputs ref = run_reference(in);
  EXPECT_TRUE(at::equal(ref.ga_ErI[1], at::zeros_like(ref.ga_ErI[1])));
  EXPECT_TRUE(at::equal(ref.gb_EOr[1], at::zeros_like(ref.gb_EOr[1])));
  EXPECT_GT(ref.ga_ErI[0].abs().sum().item<double>(), 0.0);
}

bool skip_without_cuda_kernels(std::string* why) {
  if (!at::hasCUDA()) {
    *why = "no CUDA device";
    return true;
  }
  if (!kernels::cuda_grouped_lora_kernels_built()) {
    *why = "CUDA grouped LoRA kernels not built (MOLE_HAVE_CUDA_KERNELS off): CUDA tensors take "
           "the ATen path";
    return true;
  }
  return false;
}

// The CUDA twin against the plain-loop reference (same contract, same rounding points; only the
// summation order differs). Tolerances: float64 1e-12 and float32 1e-5 (order only, sums of up to
// 4096 terms); bfloat16 outputs kBFloat16Tol.
TEST(GroupedLoraKernelCuda, MatchesReferenceForwardAndBackward) {
  std::string why;
  if (skip_without_cuda_kernels(&why)) GTEST_SKIP() << why;
  std::vector<Case> all = cases();
  all.push_back({"LLaMA-7B-like: N = 4096, I = O = 4096, r = 16, E = 8, one expert empty",
                 {700, 0, 512, 613, 400, 901, 470, 500},
                 4096,
                 4096,
                 16});
  for (const Precision& p : {Precision{at::kDouble, at::kDouble, 1e-12, 1e-12},
                             Precision{at::kFloat, at::kFloat, 1e-5, 1e-5},
                             Precision{at::kBFloat16, at::kFloat, kBFloat16Tol, 1e-5},
                             Precision{at::kBFloat16, at::kBFloat16, kBFloat16Tol, kBFloat16Tol}}) {
    for (const Case& c : all) {
      SCOPED_TRACE(trace(p, c));
      const Inputs in = make_inputs(c, p.rows, p.weights, /*seed=*/c.rank);
      std::string grad_fn;
      const Outputs got = run_grouped_lora(in, at::kCUDA, &grad_fn);
      // The CUDA twin ran, not the ATen path (whose node is GroupedLoraFunction or ToCopyBackward).
      EXPECT_NE(grad_fn.find("GroupedLoraCudaFunction"), std::string::npos) << grad_fn;
      expect_outputs_close(got, run_reference(in), p);
    }
  }
}

// Repeated calls give identical bits (no atomics, a fixed summation order); misaligned row
// pointers (the element-wise fallback) agree with the vectorised path.
TEST(GroupedLoraKernelCuda, DeterministicAndAlignmentIndependent) {
  std::string why;
  if (skip_without_cuda_kernels(&why)) GTEST_SKIP() << why;
  const Case c{"N = 1000, I = 1024, O = 512", {300, 0, 450, 250}, 1024, 512, 16};
  const Inputs in = make_inputs(c, at::kBFloat16, at::kFloat, 3);
  const Outputs first = run_grouped_lora(in, at::kCUDA), second = run_grouped_lora(in, at::kCUDA);
  EXPECT_TRUE(at::equal(first.y_NO, second.y_NO));
  EXPECT_TRUE(at::equal(first.gx_NI, second.gx_NI));
  EXPECT_TRUE(at::equal(first.ga_ErI, second.ga_ErI));
  EXPECT_TRUE(at::equal(first.gb_EOr, second.gb_EOr));

  // x one element past a 16-byte boundary: contiguous, so used in place, but not vectorisable.
  at::Tensor storage = at::empty({in.x_NI.numel() + 1}, in.x_NI.options().device(at::kCUDA));
  at::Tensor x = storage.narrow(0, 1, in.x_NI.numel()).view(in.x_NI.sizes());
  x.copy_(in.x_NI);
  ASSERT_NE(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16, 0u);
  at::Tensor y = kernels::grouped_lora(x, in.a_ErI.cuda(), in.b_EOr.cuda(), in.counts, in.scale);
  expect_close(y.cpu(), first.y_NO, kBFloat16Tol, "y from misaligned x");
}

// float16 rows and float64 rows with float32 weights keep the ATen path on CUDA tensors.
TEST(GroupedLoraKernelCuda, UnsupportedDtypesTakeAten) {
  std::string why;
  if (skip_without_cuda_kernels(&why)) GTEST_SKIP() << why;
  const Case c{"small", {2, 3}, 8, 8, 4};
  for (const auto& [rows, weights] : {std::pair{at::kHalf, at::kFloat},
                                      std::pair{at::kDouble, at::kFloat}}) {
    const Inputs in = make_inputs(c, rows, weights, 5);
    std::string grad_fn;
    const Outputs got = run_grouped_lora(in, at::kCUDA, &grad_fn);
    EXPECT_EQ(grad_fn.find("GroupedLoraCudaFunction"), std::string::npos) << grad_fn;
    expect_close(got.y_NO, run_grouped_lora(in, at::kCPU).y_NO, 1e-2, "y");  // float16 rounding
  }
}

}  // namespace
}  // namespace mole
