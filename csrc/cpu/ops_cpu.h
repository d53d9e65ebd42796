// CPU implementations registered in csrc/ops.cpp. Shapes and semantics: design.md §3 and the schemas.
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace elmo_fast {

std::tuple<at::Tensor, at::Tensor> highway_cpu(const at::Tensor& x, at::TensorList weight, at::TensorList bias,
                                               bool save_activations);
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> highway_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& activations, at::TensorList weight);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_projection_cpu(
    const at::Tensor& x, const at::Tensor& lengths, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_proj, const at::Tensor& h0,
    const at::Tensor& c0, double cell_clip, double proj_clip, bool reverse, bool save_activations);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_projection_backward_cpu(const at::Tensor& grad_out, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                             const at::Tensor& x, const at::Tensor& lengths, const at::Tensor& w_ih,
                             const at::Tensor& w_hh, const std::optional<at::Tensor>& w_proj, const at::Tensor& h0,
                             const at::Tensor& c0, const at::Tensor& out, const at::Tensor& activations,
                             bool has_bias, double cell_clip, double proj_clip, bool reverse);

// Both directions of a layer (lists of 2: forward, reverse), one after the other or side by side.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
lstm_bidirectional_cpu(at::TensorList x, const at::Tensor& lengths, at::TensorList w_ih, at::TensorList w_hh,
                       const c10::List<std::optional<at::Tensor>>& bias,
                       const c10::List<std::optional<at::Tensor>>& w_proj, at::TensorList h0, at::TensorList c0,
                       double cell_clip, double proj_clip, bool save_activations);
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
lstm_bidirectional_backward_cpu(at::TensorList grad_out, at::TensorList grad_h_n, at::TensorList grad_c_n,
                                at::TensorList x, const at::Tensor& lengths, at::TensorList w_ih,
                                at::TensorList w_hh, const c10::List<std::optional<at::Tensor>>& w_proj,
                                at::TensorList h0, at::TensorList c0, at::TensorList out,
                                at::TensorList activations, bool has_bias, double cell_clip, double proj_clip);

// char_ids (N, C) int64; embedding (V, d); weight[i] (m_i, d, w_i); bias[i] (m_i,). Returns out (N, F)
// and, when save_activations, the winning window start per (token, filter) as int16 (N, F); else (0, 0).
std::tuple<at::Tensor, at::Tensor> char_cnn_cpu(const at::Tensor& char_ids, const at::Tensor& embedding,
                                                at::TensorList weight, at::TensorList bias,
                                                c10::string_view activation, bool save_activations);
// Gradients of embedding (V, d), each weight[i] and bias[i], given out and the saved windows.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> char_cnn_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& char_ids, const at::Tensor& embedding, at::TensorList weight,
    const at::Tensor& out, const at::Tensor& windows, c10::string_view activation);

}  // namespace elmo_fast
