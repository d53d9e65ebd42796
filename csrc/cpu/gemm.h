// The CPU GEMM layer: common/linear.h sends every CPU float32/bfloat16 GEMM here; per call it takes
// oneDNN with a cached packed weight (gemm_cache.h) or at::addmm, by ELMO_FAST_CPU_GEMM, a size
// policy (Note [when to pack] in gemm.cpp) and timings taken on this machine (Note [measured
// path]). Same meaning as linear.h's functions.
#pragma once

#include <string>

#include <ATen/core/Tensor.h>

namespace elmo_fast::cpu_gemm {

// Whether this layer takes GEMMs whose output is `out` (CPU, float32 or bfloat16); others keep
// at::addmm in linear.h (float64 is the tests' exact dtype: never routed through oneDNN).
inline bool handles(const at::Tensor& out) {
  return out.device().is_cpu() && (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16);
}

// out = x @ weight^T + bias; x (M, K), weight (N, K), bias (N,) or undefined, out (M, N).
void linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);
// x @ weight^T + bias as a new contiguous tensor: oneDNN's own result, no copy into a buffer (for
// callers that consume the product once; keep it under ~32 MB, glibc's largest heap-reused block).
at::Tensor linear_once(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);
// out += a @ b; a (M, K), b (K, N) a constant (weight-like) operand, out (M, N).
void add_matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);
// out += x @ weight^T; weight (N, K) a constant operand (packed as for linear_into).
void add_linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight);
// out = a @ b; b (K, N) a constant operand (packed as for add_matmul_into).
void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// ELMO_FAST_CPU_GEMM: "auto" | "mm" | "onednn". Read from the environment at the first GEMM;
// set_mode overrides it (tests, benchmarks). Throws on any other value.
void set_mode(const std::string& mode);
// Whether "auto" times both paths per shape class and keeps the faster (Note [measured path] in
// gemm.cpp; on by default). Off, "auto" takes oneDNN wherever the size policy allows.
void set_measure(bool on);
// {"mode", "onednn_fp32", "onednn_bf16", "last_path", counters, cache stats, "measure",
// "decisions"} as one JSON object.
std::string info_json();
// Zeroes the counters and forgets the measured decisions.
void reset_counters();

}  // namespace elmo_fast::cpu_gemm
