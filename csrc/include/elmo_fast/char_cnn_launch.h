// Launchers of the torch-free char-CNN kernels (csrc/cuda/char_cnn.cu). Pointers are device
// pointers to row-major, contiguous buffers; sizes in elements. T is float, __half or
// __nv_bfloat16; arithmetic is float. Shapes: ids (N, C) int64; emb (V, d); packed_t (K, F) = the
// transpose of the packed weight (Note [char-CNN packed weight]); bias (F,); out (N, F);
// windows (N, F) int16 = winning window start per (token, filter). Each launcher returns the
// launch's cudaError_t.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "elmo_fast/char_cnn_tc_layout.h"
#include "elmo_fast/hd.h"

namespace elmo_fast {
namespace cuda {

constexpr int kCharCnnMaxGroups = 32;

// The filter groups, passed by value: group i holds filters f0[i] .. f0[i+1]-1 of width w[i].
struct CharCnnGroups {
  int n;
  int f0[kCharCnnMaxGroups + 1];
  int w[kCharCnnMaxGroups];
};

// The group of filter f (a linear scan: there are few groups).
EF_HD int char_cnn_group_of(const CharCnnGroups& groups, int64_t f) {
  int gi = 0;
  while (gi + 1 < groups.n && f >= groups.f0[gi + 1]) ++gi;
  return gi;
}

// Dynamic shared memory the forward kernel needs per block, all of it: (C,) ids, the live length and the
// (C, d) embedded chars. The embedding-gradient kernel needs less (its (C, d) sums).
inline size_t char_cnn_shared_bytes(int64_t C, int64_t d) {
  return size_t(C) * d * sizeof(float) + size_t(C + 1) * sizeof(int64_t);
}

// Out-of-range ids are clamped to 0..V-1 (no read out of bounds); functional.py reports them first.
template <typename T>
cudaError_t launch_char_cnn_forward(const int64_t* ids, const T* emb, const T* packed_t, const T* bias, T* out,
                                    int16_t* windows /* nullable */, int64_t N, int64_t C, int64_t V, int64_t d,
                                    int64_t F, int64_t K, const CharCnnGroups& groups, bool use_tanh,
                                    cudaStream_t stream);

// The tensor-core forward (char_cnn_tc.cu; T = __half or __nv_bfloat16 only), same outputs as
// launch_char_cnn_forward. emb_p (V, dp) and packed_p (Kp, Fp) are emb and packed_t zero-padded to
// `layout` (channels per char to dp, then the window to Kp and the filters to Fp).
template <typename T>
cudaError_t launch_char_cnn_forward_tc(const int64_t* ids, const T* emb_p, const T* packed_p, const T* bias, T* out,
                                       int16_t* windows /* nullable */, int64_t N, int64_t C, int64_t V, int64_t F,
                                       int64_t w_min, const CharCnnTcLayout& layout, const CharCnnGroups& groups,
                                       bool use_tanh, cudaStream_t stream);

// Backward, in three deterministic steps and one atomic one:
//   g (N, F) float = grad_out * act'(out);
//   weight grads: per split s of the tokens, part (S, K, F) and part_bias (S, F) float, then
//   grad_packed_t (K, F) and grad_bias (F,) float = their sums over s in order;
//   grad_emb (V, d) float, zeroed by the caller, += per token via atomicAdd (order not fixed:
//   Note [CUDA char-CNN non-determinism]).
template <typename T>
cudaError_t launch_char_cnn_backward(const T* grad_out, const T* out, const int16_t* windows, const int64_t* ids,
                                     const T* emb, const T* packed_t, float* g, float* part, float* part_bias,
                                     int64_t splits, float* grad_packed_t, float* grad_bias, float* grad_emb,
                                     int64_t N, int64_t C, int64_t V, int64_t d, int64_t F, int64_t K,
                                     const CharCnnGroups& groups, bool use_tanh, cudaStream_t stream);

}  // namespace cuda
}  // namespace elmo_fast
