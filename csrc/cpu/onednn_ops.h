// torch's own oneDNN GEMM, reached through the dispatcher (the mkldnn:: ops Inductor uses; facts
// and costs in ../shared/cpu-gemm.md). No new dependency: a torch without oneDNN simply lacks them.
// Packed weights are opaque oneDNN-layout tensors: they never leave the CPU GEMM layer.
#pragma once

#include <ATen/core/Tensor.h>

namespace elmo_fast::cpu_gemm {

// Whether this torch has oneDNN, it is enabled (torch.backends.mkldnn.enabled), and it can run
// `dtype` on this CPU (bf16 needs native support:
// torch's own mkldnn::_is_mkldnn_bf16_supported, decided from the CPU's flags at run time).
bool onednn_available(at::ScalarType dtype);

// weight (N, K) -> packed for onednn_linear (no batch-size hint: a pack made for one M serves
// every M about equally well here, measured in bench/results/cpu-gemm-*.md).
at::Tensor onednn_pack(const at::Tensor& weight_nk);

// x (M, K) @ W^T (+ bias) as a new (M, N) tensor; bias may be undefined.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias);

// x @ W^T + addend as a new tensor (oneDNN's "add" post-op: addend is read in the GEMM's epilogue).
at::Tensor onednn_linear_add(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& addend);

}  // namespace elmo_fast::cpu_gemm
