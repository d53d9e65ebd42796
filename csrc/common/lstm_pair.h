// Both directions of one LSTM layer in one op (lstm_bidirectional and its backward): element 0 of
// every list is the forward direction, element 1 the reverse one; each direction is exactly the
// lstm_projection op. A device supplies `single` (one direction's op) and `run_pair(flops, job)`,
// which runs job(0) and job(1) in any order or concurrently (CPU: cpu/side_by_side.h).
#pragma once

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace elmo_fast {

using TensorVec = std::vector<at::Tensor>;
using OptTensorList = c10::List<std::optional<at::Tensor>>;

inline void check_pair(size_t size, const char* op, const char* name) {
  TORCH_CHECK(size == 2, op, ": ", name, " must hold 2 tensors (forward, reverse), got ", size);
}

inline std::optional<at::Tensor> pair_element(const OptTensorList& list, int i) {
  const std::optional<at::Tensor> v = list.get(i);
  return v.has_value() && v->defined() ? v : std::nullopt;
}

// Multiply-adds x2 of one direction (input, recurrent and projection GEMMs over every valid step),
// used to decide whether running the directions side by side can pay. Backward is about twice this.
inline double lstm_direction_flops(const at::Tensor& x, const at::Tensor& lengths, const at::Tensor& w_ih,
                                   const std::optional<at::Tensor>& w_proj, const at::Tensor& h0) {
  if (lengths.numel() == 0 || x.dim() != 3 || w_ih.dim() != 2) return 0.0;
  const double rows = static_cast<double>(lengths.clamp(0, x.size(1)).sum().item<int64_t>());
  const double four_n = static_cast<double>(w_ih.size(0)), I = static_cast<double>(w_ih.size(1));
  const double P = static_cast<double>(h0.size(-1));
  const double proj = w_proj.has_value() ? P * four_n / 4 : 0.0;
  return 2.0 * rows * (four_n * (I + P) + proj);
}

// A shape class for timing decisions: dtype, sizes, and the work rounded to a power of two.
inline std::string lstm_pair_key(const char* what, const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& h0,
                                 double flops) {
  int flops_log2 = 0;
  for (double f = flops; f >= 2.0; f /= 2.0) ++flops_log2;
  return std::string(what) + "/" + std::string(c10::toString(x.scalar_type())) + "/I=" +
         std::to_string(x.size(-1)) + ",4n=" + std::to_string(w_ih.size(0)) + ",P=" + std::to_string(h0.size(-1)) +
         ",flops=2^" + std::to_string(flops_log2);
}

template <class Single, class RunPair>
std::tuple<TensorVec, TensorVec, TensorVec, TensorVec> lstm_pair_forward(
    at::TensorList x, const at::Tensor& lengths, at::TensorList w_ih, at::TensorList w_hh, const OptTensorList& bias,
    const OptTensorList& w_proj, at::TensorList h0, at::TensorList c0, double cell_clip, double proj_clip, bool save,
    const Single& single, const RunPair& run_pair) {
  constexpr const char* op = "lstm_bidirectional";
  check_pair(x.size(), op, "x");
  check_pair(w_ih.size(), op, "w_ih");
  check_pair(w_hh.size(), op, "w_hh");
  check_pair(bias.size(), op, "bias");
  check_pair(w_proj.size(), op, "w_proj");
  check_pair(h0.size(), op, "h0");
  check_pair(c0.size(), op, "c0");
  TensorVec out(2), h_n(2), c_n(2), act(2);
  const double flops = lstm_direction_flops(x[0], lengths, w_ih[0], pair_element(w_proj, 0), h0[0]);
  run_pair(lstm_pair_key("forward", x[0], w_ih[0], h0[0], flops), flops, [&](int i) {
    std::tie(out[i], h_n[i], c_n[i], act[i]) = single(x[i], lengths, w_ih[i], w_hh[i], pair_element(bias, i),
                                                      pair_element(w_proj, i), h0[i], c0[i], cell_clip, proj_clip,
                                                      /*reverse=*/i == 1, save);
  });
  return {out, h_n, c_n, act};
}

template <class Single, class RunPair>
std::tuple<TensorVec, TensorVec, TensorVec, TensorVec, TensorVec, TensorVec, TensorVec> lstm_pair_backward(
    at::TensorList grad_out, at::TensorList grad_h_n, at::TensorList grad_c_n, at::TensorList x,
    const at::Tensor& lengths, at::TensorList w_ih, at::TensorList w_hh, const OptTensorList& w_proj,
    at::TensorList h0, at::TensorList c0, at::TensorList out, at::TensorList activations, bool has_bias,
    double cell_clip, double proj_clip, const Single& single, const RunPair& run_pair) {
  constexpr const char* op = "lstm_bidirectional_backward";
  for (const auto& [size, name] : {std::pair<size_t, const char*>{grad_out.size(), "grad_out"},
                                   {grad_h_n.size(), "grad_h_n"}, {grad_c_n.size(), "grad_c_n"}, {x.size(), "x"},
                                   {w_ih.size(), "w_ih"}, {w_hh.size(), "w_hh"}, {w_proj.size(), "w_proj"},
                                   {h0.size(), "h0"}, {c0.size(), "c0"}, {out.size(), "out"},
                                   {activations.size(), "activations"}}) {
    check_pair(size, op, name);
  }
  TensorVec gx(2), gw_ih(2), gw_hh(2), gb(2), gw_proj(2), gh0(2), gc0(2);
  const double flops = 2.0 * lstm_direction_flops(x[0], lengths, w_ih[0], pair_element(w_proj, 0), h0[0]);
  run_pair(lstm_pair_key("backward", x[0], w_ih[0], h0[0], flops), flops, [&](int i) {
    std::tie(gx[i], gw_ih[i], gw_hh[i], gb[i], gw_proj[i], gh0[i], gc0[i]) =
        single(grad_out[i], grad_h_n[i], grad_c_n[i], x[i], lengths, w_ih[i], w_hh[i], pair_element(w_proj, i), h0[i],
               c0[i], out[i], activations[i], has_bias, cell_clip, proj_clip, /*reverse=*/i == 1);
  });
  return {gx, gw_ih, gw_hh, gb, gw_proj, gh0, gc0};
}

}  // namespace elmo_fast
