// The autograd of stabilize, in C++ for every device: the forward and backward ops below the
// autograd key are the per-device kernels (cpu/, or ops.cpp's device-agnostic bodies elsewhere),
// so a training step crosses from the autograd engine to a kernel without a Python frame. The
// fake kernels that torch.compile traces these with live in neurosens/registration.py.
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <string>

namespace neurosens {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_stabilize(const at::Tensor& a, const at::Tensor& b,
                                                              const std::optional<at::Tensor>& indices, int64_t k,
                                                              c10::string_view metric, c10::string_view select_metric,
                                                              int64_t channel_dim) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("neurosens::stabilize", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                           c10::string_view, c10::string_view, int64_t)>();
  return op.call(a, b, indices, k, metric, select_metric, channel_dim);
}

std::tuple<at::Tensor, at::Tensor> call_stabilize_backward(const at::Tensor& grad, const at::Tensor& a,
                                                           const at::Tensor& b, const at::Tensor& indices,
                                                           const at::Tensor& stats, c10::string_view metric,
                                                           int64_t channel_dim) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("neurosens::_stabilize_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&, c10::string_view,
                                                                 int64_t)>();
  return op.call(grad, a, b, indices, stats, metric, channel_dim);
}

// The fused backward is not differentiable: a graph built through it fails when it is used.
class StabilizeBackward : public torch::autograd::Function<StabilizeBackward> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
                               const at::Tensor& indices, const at::Tensor& stats, const std::string& metric,
                               int64_t channel_dim) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [grad_a, grad_b] = call_stabilize_backward(grad, a, b, indices, stats, metric, channel_dim);
    return {grad_a, grad_b};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "neurosens.stabilize: second-order gradients are not supported (its fused backward is not "
                "differentiable); use neurosens.reference.stabilize for double backward");
  }
};

class Stabilize : public torch::autograd::Function<Stabilize> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b,
                               const std::optional<at::Tensor>& indices, int64_t k, const std::string& metric,
                               const std::string& select_metric, int64_t channel_dim) {
    at::Tensor loss, selected, stats;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(loss, selected, stats) = call_stabilize(a, b, indices, k, metric, select_metric, channel_dim);
    }
    ctx->save_for_backward({a, b, selected, stats});
    ctx->mark_non_differentiable({selected, stats});
    // The gradients of indices and stats are never used: left undefined, autograd does not fill an
    // [N, C, 6] tensor of zeros for them at every backward.
    ctx->set_materialize_grads(false);
    ctx->saved_data["metric"] = metric;
    ctx->saved_data["channel_dim"] = channel_dim;
    return {loss, selected, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_loss = grads[0];
    variable_list out(7);  // one per input of forward
    if (!grad_loss.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    auto [grad_a, grad_b] = call_stabilize_backward(grad_loss, saved[0], saved[1], saved[2], saved[3],
                                                    ctx->saved_data["metric"].toStringRef(),
                                                    ctx->saved_data["channel_dim"].toInt());
    if (ctx->needs_input_grad(0)) out[0] = grad_a;
    if (ctx->needs_input_grad(1)) out[1] = grad_b;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> stabilize_autograd(const at::Tensor& a, const at::Tensor& b,
                                                                  const std::optional<at::Tensor>& indices, int64_t k,
                                                                  c10::string_view metric,
                                                                  c10::string_view select_metric, int64_t channel_dim) {
  const variable_list out =
      Stabilize::apply(a, b, indices, k, std::string(metric), std::string(select_metric), channel_dim);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor> stabilize_backward_autograd(const at::Tensor& grad, const at::Tensor& a,
                                                               const at::Tensor& b, const at::Tensor& indices,
                                                               const at::Tensor& stats, c10::string_view metric,
                                                               int64_t channel_dim) {
  const variable_list out = StabilizeBackward::apply(grad, a, b, indices, stats, std::string(metric), channel_dim);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(neurosens, Autograd, m) {
  m.impl("stabilize", &stabilize_autograd);
  m.impl("_stabilize_backward", &stabilize_backward_autograd);
}

}  // namespace neurosens
