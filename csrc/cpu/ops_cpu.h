// CPU implementations registered in csrc/ops.cpp. Shapes and semantics: design.md §3 and the schemas.
#pragma once

#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

namespace elmo_fast {

std::tuple<at::Tensor, at::Tensor> highway_cpu(const at::Tensor& x, at::TensorList weight, at::TensorList bias,
                                               bool save_activations);
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> highway_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& activations, at::TensorList weight);

}  // namespace elmo_fast
