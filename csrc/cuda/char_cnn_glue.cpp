// CUDA char-CNN op: ATen tensors -> the torch-free kernels of char_cnn.cu and char_cnn_tc.cu, on
// the current stream of the inputs' device. float32, float16, bfloat16 storage; float accumulation
// and float gradients workspaces, cast to the parameters' dtype at the end. The forward kernel is
// chosen by ELMO_FAST_CHAR_CNN_KERNEL (common/kernel_choice.h): simt (char_cnn.cu, every dtype) or
// tensor_core (char_cnn_tc.cu: half and bfloat16 on compute capability >= 8.0, shapes that fit
// char_cnn_tc_fits); auto takes tensor_core only once it is validated (Note [validated kernels]).
#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/char_cnn_args.h"
#include "common/kernel_choice.h"
#include "cuda/dispatch.h"
#include "elmo_fast/char_cnn_launch.h"

namespace elmo_fast {
namespace {

cuda::CharCnnGroups to_groups(const CharCnnShape& s) {
  TORCH_CHECK(s.groups.size() <= static_cast<size_t>(cuda::kCharCnnMaxGroups), "char_cnn on CUDA supports at most ",
              cuda::kCharCnnMaxGroups, " filter widths (weight tensors), got ", s.groups.size());
  TORCH_CHECK(s.F < (int64_t(1) << 31), "char_cnn on CUDA: too many filters (", s.F, ")");
  TORCH_CHECK(cuda::char_cnn_shared_bytes(s.C, s.d) <= 48 * 1024, "char_cnn on CUDA: C * d = ", s.C * s.d,
              " embedded chars per token do not fit in shared memory (at most ~12000)");
  cuda::CharCnnGroups g{};
  g.n = static_cast<int>(s.groups.size());
  for (int i = 0; i < g.n; ++i) {
    g.f0[i] = static_cast<int>(s.groups[i].f0);
    g.w[i] = static_cast<int>(s.groups[i].w);
  }
  g.f0[g.n] = static_cast<int>(s.F);
  return g;
}

// Why the tensor-core kernel cannot serve this call, or "" when it can.
std::string char_cnn_tc_obstacle(const CharCnnShape& s, const at::Tensor& embedding, const CharCnnTcLayout& layout) {
  const std::string type_or_device = tensor_core_obstacle(embedding.scalar_type(), embedding.device().index());
  if (!type_or_device.empty()) return type_or_device;
  if (!char_cnn_tc_fits(layout)) {
    return "the shape does not fit it (C = " + std::to_string(s.C) + ", d = " + std::to_string(s.d) +
           ", widest filter " + std::to_string(s.w_max) + ": at most " + std::to_string(kCharCnnTcMaxKSteps * 16) +
           " padded window values and " + std::to_string(kCharCnnTcMaxShared) + " bytes of staged chars)";
  }
  return "";
}

bool use_tensor_core(const CharCnnShape& s, const at::Tensor& embedding, const CharCnnTcLayout& layout) {
  return kernels::take(kernels::Family::kCharCnn, "tensor_core", "char_cnn",
                       [&] { return char_cnn_tc_obstacle(s, embedding, layout); });
}

// emb (V, d) -> (V, dp) and the weights -> the (Kp, Fp) B-matrix, zero-padded
// (Note [char-CNN on tensor cores]).
std::tuple<at::Tensor, at::Tensor> pad_for_tensor_core(const at::Tensor& emb, at::TensorList weight,
                                                       const CharCnnShape& s, const CharCnnTcLayout& l) {
  const int64_t extra = l.dp - s.d;
  std::vector<at::Tensor> padded;
  for (const at::Tensor& w : weight) padded.push_back(at::constant_pad_nd(w, {0, 0, 0, extra}));  // (m, dp, w)
  CharCnnShape sp = s;
  sp.d = l.dp;
  sp.K = s.w_max * l.dp;
  const at::Tensor packed = pack_char_cnn_weight(padded, sp, emb.scalar_type());  // (F, w_max * dp)
  return {at::constant_pad_nd(emb, {0, extra}).contiguous(),
          at::constant_pad_nd(packed, {0, l.Kp - sp.K, 0, l.Fp - s.F}).t().contiguous()};
}

std::tuple<at::Tensor, at::Tensor> char_cnn_cuda(const at::Tensor& char_ids, const at::Tensor& embedding,
                                                 at::TensorList weight, at::TensorList bias,
                                                 c10::string_view activation, bool save_activations) {
  const bool use_tanh = char_cnn_use_tanh(activation);
  const CharCnnShape s = check_char_cnn_args(char_ids, embedding, weight);
  check_char_cnn_bias(bias, embedding, s);
  const c10::cuda::CUDAGuard guard(embedding.device());
  at::Tensor out, win;  // not a structured binding: C++17 lambdas cannot capture those
  std::tie(out, win) = empty_char_cnn_outputs(s, embedding, save_activations);
  if (s.N == 0 || s.F == 0) return {out, win};
  const cuda::CharCnnGroups groups = to_groups(s);
  const at::Tensor ids = char_ids.contiguous();
  const at::Tensor emb = embedding.contiguous();
  const at::Tensor bias_cat = at::cat(bias, 0).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(embedding.device().index());
  const CharCnnTcLayout layout = char_cnn_tc_layout(s.C, s.d, s.w_min, s.w_max, s.F);
  if (use_tensor_core(s, embedding, layout)) {
    at::Tensor emb_p, packed_p;
    std::tie(emb_p, packed_p) = pad_for_tensor_core(emb, weight, s, layout);
    auto launch = [&](auto tag) {
      using T = typename decltype(tag)::type;
      C10_CUDA_CHECK(cuda::launch_char_cnn_forward_tc(
          ids.data_ptr<int64_t>(), device_ptr<const T>(emb_p), device_ptr<const T>(packed_p),
          device_ptr<const T>(bias_cat), device_ptr<T>(out), save_activations ? win.data_ptr<int16_t>() : nullptr,
          s.N, s.C, s.V, s.F, s.w_min, layout, groups, use_tanh, stream));
    };
    dispatch_half_types(embedding.scalar_type(), launch);
    return {out, win};
  }
  const at::Tensor packed_t = pack_char_cnn_weight(weight, s, embedding.scalar_type()).t().contiguous();
  dispatch_cuda_float_types(embedding.scalar_type(), "char_cnn_cuda", [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(cuda::launch_char_cnn_forward(
        ids.data_ptr<int64_t>(), device_ptr<const T>(emb), device_ptr<const T>(packed_t),
        device_ptr<const T>(bias_cat), device_ptr<T>(out), save_activations ? win.data_ptr<int16_t>() : nullptr, s.N,
        s.C, s.V, s.d, s.F, s.K, groups, use_tanh, stream));
  });
  return {out, win};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> char_cnn_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& char_ids, const at::Tensor& embedding, at::TensorList weight,
    const at::Tensor& out, const at::Tensor& windows, c10::string_view activation) {
  const bool use_tanh = char_cnn_use_tanh(activation);
  const CharCnnShape s = check_char_cnn_args(char_ids, embedding, weight);
  check_shape(grad_out, {s.N, s.F}, "char_cnn_backward: grad_out");
  check_same_device_dtype(grad_out, embedding, "char_cnn_backward: grad_out");
  check_shape(out, {s.N, s.F}, "char_cnn_backward: out");
  check_same_device_dtype(out, embedding, "char_cnn_backward: out");
  TORCH_CHECK(windows.scalar_type() == at::kShort && windows.device() == embedding.device(),
              "char_cnn_backward: windows must be int16 on ", embedding.device());
  TORCH_CHECK(s.N * s.F == 0 || windows.sizes() == out.sizes(),
              "char_cnn_backward: the forward did not save its windows (save_activations=False)");
  const c10::cuda::CUDAGuard guard(embedding.device());
  const at::TensorOptions f32 = embedding.options().dtype(at::kFloat);
  at::Tensor grad_emb = at::zeros({s.V, s.d}, f32);
  at::Tensor grad_packed_t = at::zeros({s.K, s.F}, f32);
  at::Tensor grad_bias = at::zeros({s.F}, f32);
  if (s.N > 0 && s.F > 0) {
    const cuda::CharCnnGroups groups = to_groups(s);
    // Token splits of the weight-gradient pass: enough (split, filter) threads to fill the GPU,
    // few enough that the (splits, K, F) float partial sums stay small.
    const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(16, s.N / 32));
    at::Tensor g = at::empty({s.N, s.F}, f32);
    at::Tensor part = at::empty({splits, s.K, s.F}, f32);
    at::Tensor part_bias = at::empty({splits, s.F}, f32);
    const at::Tensor ids = char_ids.contiguous();
    const at::Tensor emb = embedding.contiguous();
    const at::Tensor win = windows.contiguous();
    const at::Tensor dy = grad_out.contiguous();
    const at::Tensor y = out.contiguous();
    const at::Tensor packed_t = pack_char_cnn_weight(weight, s, embedding.scalar_type()).t().contiguous();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(embedding.device().index());
    dispatch_cuda_float_types(embedding.scalar_type(), "char_cnn_backward_cuda", [&](auto tag) {
      using T = typename decltype(tag)::type;
      C10_CUDA_CHECK(cuda::launch_char_cnn_backward(
          device_ptr<const T>(dy), device_ptr<const T>(y), win.data_ptr<int16_t>(), ids.data_ptr<int64_t>(),
          device_ptr<const T>(emb), device_ptr<const T>(packed_t), g.data_ptr<float>(), part.data_ptr<float>(),
          part_bias.data_ptr<float>(), splits, grad_packed_t.data_ptr<float>(), grad_bias.data_ptr<float>(),
          grad_emb.data_ptr<float>(), s.N, s.C, s.V, s.d, s.F, s.K, groups, use_tanh, stream));
    });
  }
  const at::ScalarType dtype = embedding.scalar_type();
  std::vector<at::Tensor> grad_weight = unpack_char_cnn_weight(grad_packed_t.t(), s, dtype);
  std::vector<at::Tensor> grad_b;
  for (const CharCnnGroup& gr : s.groups) grad_b.push_back(grad_bias.narrow(0, gr.f0, gr.m).to(dtype).clone());
  return {grad_emb.to(dtype), grad_weight, grad_b};
}

}  // namespace
}  // namespace elmo_fast

TORCH_LIBRARY_IMPL(elmo_fast, CUDA, m) {
  m.impl("char_cnn", &elmo_fast::char_cnn_cuda);
  m.impl("char_cnn_backward", &elmo_fast::char_cnn_backward_cuda);
}
