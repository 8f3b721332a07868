// Tensor-facing fused CUDA router (see router_ops.h): validation, then the launchers of
// router_kernels.h inside an autograd function whose backward is the closed-form route_backward.
//
// Stream: as in permute_ops.cpp (which explains why), everything is launched on the legacy
// default stream (stream 0), PyTorch's default stream; this file includes no c10/cuda header so
// that it compiles against a CPU-only LibTorch too.
//
// Legend: T tokens, E experts, C columns (K for top-k, else E), N routed pairs.
#include "kernels/cuda/router_ops.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "kernels/check.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops_util.h"
#include "kernels/cuda/router_kernels.h"

namespace mole::kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// logits_TE -> (probs_TE, weight_N, token_N, expert_N, count_E); the last three are not
// differentiable. Backward: route_backward from the saved probabilities and pairs.
class RouterFunction : public torch::autograd::Function<RouterFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits_TE,
                               const RouterSelect& select) {
    const int64_t num_tokens = logits_TE.size(0), num_experts = logits_TE.size(1);
    const int64_t num_columns = router_columns(select, num_experts);
    const at::Device device = logits_TE.device();
    const at::TensorOptions float_options = logits_TE.options();
    const at::TensorOptions long_options = float_options.dtype(at::kLong);
    at::Tensor probs_TE = at::empty({num_tokens, num_experts}, float_options);
    at::Tensor count_T = at::empty({num_tokens}, long_options);
    at::Tensor count_E = at::empty({num_experts}, long_options);
    at::Tensor token_N, expert_N, weight_N, offsets_T1;
    cuda::CurrentDevice current(device, "router");
    if (router_fixed_count(select.rule)) {
      // The [T, C] selection is the pair list: N = T*C, no host sync.
      token_N = at::empty({num_tokens * num_columns}, long_options);
      expert_N = at::empty({num_tokens * num_columns}, long_options);
      weight_N = at::empty({num_tokens * num_columns}, float_options);
      MOLE_CUDA_CHECK(cuda::route_forward(logits_TE.data_ptr<float>(), select,
                                          probs_TE.data_ptr<float>(), expert_N.data_ptr<int64_t>(),
                                          weight_N.data_ptr<float>(), token_N.data_ptr<int64_t>(),
                                          count_T.data_ptr<int64_t>(), count_E.data_ptr<int64_t>(),
                                          num_tokens, num_experts, cuda::kDefaultStream),
                      ::mole::detail::cat("route_forward on ", device));
    } else {
      at::Tensor expert_TC = at::empty({num_tokens, num_columns}, long_options);
      at::Tensor weight_TC = at::empty({num_tokens, num_columns}, float_options);
      offsets_T1 = at::empty({num_tokens + 1}, long_options);
      MOLE_CUDA_CHECK(
          cuda::route_forward(logits_TE.data_ptr<float>(), select, probs_TE.data_ptr<float>(),
                              expert_TC.data_ptr<int64_t>(), weight_TC.data_ptr<float>(),
                              /*token_TC=*/nullptr, count_T.data_ptr<int64_t>(),
                              count_E.data_ptr<int64_t>(), num_tokens, num_experts,
                              cuda::kDefaultStream),
          ::mole::detail::cat("route_forward on ", device));
      MOLE_CUDA_CHECK(cuda::routing_offsets(count_T.data_ptr<int64_t>(), num_tokens,
                                            offsets_T1.data_ptr<int64_t>(), cuda::kDefaultStream),
                      ::mole::detail::cat("routing_offsets on ", device));
      // Sync point: the pair count, to size the pair tensors.
      const int64_t num_pairs = offsets_T1[num_tokens].item<int64_t>();
      token_N = at::empty({num_pairs}, long_options);
      expert_N = at::empty({num_pairs}, long_options);
      weight_N = at::empty({num_pairs}, float_options);
      MOLE_CUDA_CHECK(
          cuda::compact_routing(expert_TC.data_ptr<int64_t>(), weight_TC.data_ptr<float>(),
                                offsets_T1.data_ptr<int64_t>(), num_tokens, num_columns,
                                token_N.data_ptr<int64_t>(), expert_N.data_ptr<int64_t>(),
                                weight_N.data_ptr<float>(), cuda::kDefaultStream),
          ::mole::detail::cat("compact_routing on ", device));
    }
    ctx->mark_non_differentiable({token_N, expert_N, count_E});
    ctx->save_for_backward({probs_TE, expert_N, weight_N, offsets_T1});
    ctx->saved_data["rule"] = static_cast<int64_t>(select.rule);
    ctx->saved_data["top_k"] = select.top_k;
    ctx->saved_data["top_p"] = select.top_p;
    ctx->saved_data["entropy_q"] = select.entropy_q;
    ctx->saved_data["entropy_threshold"] = select.entropy_threshold;
    ctx->saved_data["keep_top_k"] = select.keep_top_k;
    return {probs_TE, weight_N, token_N, expert_N, count_E};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &probs_TE = saved[0], &expert_N = saved[1], &weight_N = saved[2],
                     &offsets_T1 = saved[3];
    RouterSelect select;
    select.rule = static_cast<RouterRule>(ctx->saved_data["rule"].toInt());
    select.top_k = ctx->saved_data["top_k"].toInt();
    select.top_p = ctx->saved_data["top_p"].toDouble();
    select.entropy_q = ctx->saved_data["entropy_q"].toDouble();
    select.entropy_threshold = ctx->saved_data["entropy_threshold"].toDouble();
    select.keep_top_k = ctx->saved_data["keep_top_k"].toInt();
    // Undefined output gradients arrive as zeros (autograd materialises them).
    const at::Tensor grad_probs_TE = grad_outputs[0].contiguous();
    const at::Tensor grad_weight_N = grad_outputs[1].contiguous();
    at::Tensor grad_logits_TE = at::empty_like(probs_TE);
    const at::Device device = probs_TE.device();
    cuda::CurrentDevice current(device, "router");
    MOLE_CUDA_CHECK(
        cuda::route_backward(select, probs_TE.data_ptr<float>(), grad_probs_TE.data_ptr<float>(),
                             expert_N.data_ptr<int64_t>(), weight_N.data_ptr<float>(),
                             grad_weight_N.data_ptr<float>(), ptr_or_null<int64_t>(offsets_T1),
                             grad_logits_TE.data_ptr<float>(), probs_TE.size(0), probs_TE.size(1),
                             cuda::kDefaultStream),
        ::mole::detail::cat("route_backward on ", device));
    return {grad_logits_TE, at::Tensor()};
  }
};

}  // namespace

FusedRouting route_cuda(const at::Tensor& logits_TE, const RouterSelect& select) {
  MOLE_CHECK(
      cuda_router_supports(logits_TE),
      "route_cuda: logits must be a CUDA float32 tensor [T, E] with 1 <= E <= ", kMaxRouterExperts,
      ", got ", logits_TE.scalar_type(), " of ", logits_TE.sizes(), " on ", logits_TE.device());
  const char* error = router_select_error(select, logits_TE.size(1));
  MOLE_CHECK(error == nullptr, "route_cuda: ", error, " (E = ", logits_TE.size(1),
             ", top_k = ", select.top_k, ", top_p = ", select.top_p,
             ", entropy_q = ", select.entropy_q, ", entropy_threshold = ", select.entropy_threshold,
             ", keep_top_k = ", select.keep_top_k, ")");
  const variable_list out = RouterFunction::apply(logits_TE.contiguous(), select);
  return {out[0], out[2], out[3], out[1], out[4]};
}

}  // namespace mole::kernels
