// The one place the ops' GEMMs go through (CPU and CUDA alike), so that a faster path serves every
// op at once: CPU float32/bfloat16 goes to the CPU GEMM layer (cpu/gemm.h: oneDNN with cached
// packed weights or mm, ../shared/cpu-gemm.md); float64 and other devices use at::addmm.
// All tensors are 2-D; `out` is preallocated and contiguous; strides of the other operands are free.
// `weight` / `b` must be the op's constant operand (a parameter), never an activation: the CPU
// layer caches a packed copy of it per version (Note [packed weight cache keys], cpu/gemm_cache.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

#include "cpu/gemm.h"

namespace elmo_fast {

// out = x @ weight^T + bias; x (M, K), weight (N, K), bias (N,) or undefined (none), out (M, N).
inline void linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (cpu_gemm::handles(out)) return cpu_gemm::linear_into(out, x, weight, bias);
  if (bias.defined()) {
    at::addmm_out(out, bias, x, weight.t());
  } else {
    at::mm_out(out, x, weight.t());
  }
}

// Products consumed once are kept as oneDNN returns them (linear_once) up to this size, the largest
// block glibc reuses from its heap; beyond it a fresh tensor page-faults on every call, and copying
// into a reused buffer (linear_into) is cheaper (Note [fresh products] in common/lstm_driver.h).
constexpr int64_t kFreshProductBytes = int64_t{32} << 20;

// x @ weight^T + bias (bias undefined: none) as a new contiguous (M, N) tensor, for a product used
// once: on the CPU it is oneDNN's own output, with no copy into a caller's buffer. (Not named
// `linear`: argument-dependent lookup would find at::linear.)
inline at::Tensor linear_once(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16)) {
    return cpu_gemm::linear_once(x, weight, bias);
  }
  return bias.defined() ? at::addmm(bias, x, weight.t()) : at::mm(x, weight.t());
}

// out += a @ b; a (M, K), b (K, N) the weight used untransposed (backward's dx = d_proj @ W), out (M, N).
inline void add_matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (cpu_gemm::handles(out)) return cpu_gemm::add_matmul_into(out, a, b);
  out.addmm_(a, b);
}

// out += x @ weight^T; x (M, K), weight (N, K) the parameter itself (e.g. the LSTM's recurrent
// weight, so its packed copy is keyed on the parameter, not on a per-call transposed view), out (M, N).
inline void add_linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight) {
  if (cpu_gemm::handles(out)) return cpu_gemm::add_linear_into(out, x, weight);
  out.addmm_(x, weight.t());
}

// out = a @ b; a (M, K), b (K, N) a weight used untransposed, out (M, N) (a row block of a
// contiguous buffer is fine).
inline void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (cpu_gemm::handles(out)) return cpu_gemm::matmul_into(out, a, b);
  at::mm_out(out, a, b);
}

// out = x @ weight^T for an operand built per call (e.g. the char-CNN's filter matrix): never
// cached or packed (a pack would not outlive the call); x (M, K), weight (N, K), out (M, N).
inline void matmul_nt_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight) {
  at::mm_out(out, x, weight.t());
}

// a^T @ b as a new tensor; a (M, N), b (M, K) -> (N, K): the weight gradient of a linear layer.
// No constant operand to pack, so at::mm on every device (MKL/oneDNN inside torch choose). Every
// route to torch's oneDNN was measured no faster at ELMo's shapes (it must copy a^T; bf16 mm already
// is oneDNN): bench/results/cpu-gemm-weight-grad-2026-11-25.md.
inline at::Tensor matmul_tn(const at::Tensor& a, const at::Tensor& b) { return at::mm(a.t(), b); }

}  // namespace elmo_fast
