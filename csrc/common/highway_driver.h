// The highway op's layer loop, shared by the CPU and CUDA implementations: the GEMMs go through
// linear.h, the per-element work through a device backend `Pointwise` with
//   forward(proj, x, y, save)         proj (N, 2F) -> [h | g] when save; y = layer output
//   mix(act, x, y)                    y = layer output recomputed from saved act = [h | g]
//   backward(dy, x, act, d_proj, dx)  d_proj (N, 2F), dx = dy * g (dx may alias dy)
// Shapes: x (N, F); weight[k] (2F, F); bias[k] (2F,); activations (k, N, 2F) or (0,) when not saved.
#pragma once

#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "common/checks.h"
#include "common/linear.h"

namespace elmo_fast {

// Every weight[k] is (2F, F) with x's (N, F) device and dtype; `name` says which op checks.
inline void check_highway_weights(const at::Tensor& x, at::TensorList weight, const char* name) {
  const int64_t F = x.size(1);
  for (const at::Tensor& w : weight) {
    check_shape(w, {2 * F, F}, name);
    check_same_device_dtype(w, x, name);
  }
}

inline void check_highway_args(const at::Tensor& x, at::TensorList weight, at::TensorList bias) {
  TORCH_CHECK(x.dim() == 2, "highway: x must be 2-D (N, F), got shape ", x.sizes());
  TORCH_CHECK(weight.size() == bias.size(), "highway: got ", weight.size(), " weights but ", bias.size(), " biases");
  check_highway_weights(x, weight, "highway: weight");
  for (const at::Tensor& b : bias) {
    check_shape(b, {2 * x.size(1)}, "highway: bias");
    check_same_device_dtype(b, x, "highway: bias");
  }
}

template <class Pointwise>
std::tuple<at::Tensor, at::Tensor> highway_forward_driver(const at::Tensor& x_in, at::TensorList weight,
                                                          at::TensorList bias, bool save_activations,
                                                          const Pointwise& pointwise) {
  check_highway_args(x_in, weight, bias);
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), F = x.size(1), layers = static_cast<int64_t>(weight.size());
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (layers == 0) y.copy_(x);
  at::Tensor activations = save_activations ? at::empty({layers, N, 2 * F}, x.options()) : at::empty({0}, x.options());
  // Without saving, a product that fits is used as the GEMM returns it (linear.h, kFreshProductBytes).
  const bool fresh = !save_activations && N * 2 * F * x.element_size() <= kFreshProductBytes;
  at::Tensor scratch = save_activations || fresh ? at::Tensor() : at::empty({N, 2 * F}, x.options());
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor& input = l == 0 ? x : y;  // layers >= 1 update y in place, element by element
    at::Tensor proj = save_activations ? activations.select(0, l) : scratch;
    if (fresh) {
      proj = linear_once(input, weight[l], bias[l]);
    } else {
      linear_into(proj, input, weight[l], bias[l]);
    }
    pointwise.forward(proj, input, y, save_activations);
  }
  return {y, activations};
}

template <class Pointwise>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> highway_backward_driver(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& activations, at::TensorList weight,
    const Pointwise& pointwise) {
  TORCH_CHECK(x_in.dim() == 2, "highway_backward: x must be 2-D (N, F), got shape ", x_in.sizes());
  const int64_t N = x_in.size(0), F = x_in.size(1), layers = static_cast<int64_t>(weight.size());
  TORCH_CHECK(activations.numel() > 0 || N * F == 0 || layers == 0,
              "highway_backward: the forward did not save activations (save_activations=False)");
  check_shape(grad_out, {N, F}, "highway_backward: grad_out");
  check_same_device_dtype(grad_out, x_in, "highway_backward: grad_out");
  if (activations.numel() > 0) {
    check_shape(activations, {layers, N, 2 * F}, "highway_backward: activations");
    check_same_device_dtype(activations, x_in, "highway_backward: activations");
  }
  check_highway_weights(x_in, weight, "highway_backward: weight");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = grad_out.contiguous();
  std::vector<at::Tensor> grad_weight(layers), grad_bias(layers);
  if (layers == 0) return {dy.clone(), grad_weight, grad_bias};
  const at::Tensor acts = activations.numel() > 0 ? activations.contiguous()
                                                  : at::empty({layers, N, 2 * F}, x.options());  // N*F == 0

  // Layer inputs are recomputed from the saved [h | g] rather than saved: (k-1) x (N, F) less memory.
  std::vector<at::Tensor> inputs(layers);
  inputs[0] = x;
  for (int64_t l = 1; l < layers; ++l) {
    inputs[l] = at::empty_like(x);
    pointwise.mix(acts.select(0, l - 1), inputs[l - 1], inputs[l]);
  }
  at::Tensor d_proj = at::empty({N, 2 * F}, x.options());
  at::Tensor dx = at::empty_like(x);
  for (int64_t l = layers - 1; l >= 0; --l) {
    const at::Tensor& upstream = l == layers - 1 ? dy : dx;
    pointwise.backward(upstream, inputs[l], acts.select(0, l), d_proj, dx);
    grad_weight[l] = matmul_tn(d_proj, inputs[l]);
    grad_bias[l] = d_proj.sum(0);
    add_matmul_into(dx, d_proj, weight[l]);
  }
  return {dx, grad_weight, grad_bias};
}

}  // namespace elmo_fast
