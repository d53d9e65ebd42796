// The one place the ops' GEMMs go through (CPU and CUDA alike), so that a faster path (e.g. oneDNN
// with packed weights on the CPU, ../shared/cpu-gemm.md) serves every op at once.
// All tensors are 2-D; `out` is preallocated and contiguous; strides of the other operands are free.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

namespace elmo_fast {

// out = x @ weight^T + bias; x (M, K), weight (N, K), bias (N,) or undefined (none), out (M, N).
inline void linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (bias.defined()) {
    at::addmm_out(out, bias, x, weight.t());
  } else {
    at::mm_out(out, x, weight.t());
  }
}

// out = a @ b; a (M, K), b (K, N), out (M, N) (a row block of a contiguous buffer is fine).
inline void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

// out = x @ weight^T (no bias); x (M, K), weight (N, K), out (M, N).
inline void matmul_nt_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight) {
  at::mm_out(out, x, weight.t());
}

// out += a @ b; a (M, K), b (K, N), out (M, N).
inline void add_matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  out.addmm_(a, b);
}

// a^T @ b as a new tensor; a (M, N), b (M, K) -> (N, K): the weight gradient of a linear layer.
inline at::Tensor matmul_tn(const at::Tensor& a, const at::Tensor& b) { return at::mm(a.t(), b); }

}  // namespace elmo_fast
