// Char-CNN kernels (torch-free): forward = one block per token (grid-stride), the token's embedded
// chars staged in shared memory as float, one thread per filter running the max over the token's
// live windows and its constant window (Note [char-CNN padding shortcut]), then bias + activation.
// Shapes: N tokens, C char slots, V table rows, d char dim, F filters, K = w_max * d.
// Note [CUDA char-CNN non-determinism]: the weight and bias gradients are deterministic (per-split
// partial sums reduced in a fixed order); the embedding gradient is summed with float atomicAdd, so
// its last bits may vary from run to run (the CPU backward is deterministic).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "elmo_fast/char_cnn_launch.h"
#include "elmo_fast/char_cnn_math.h"
#include "elmo_fast/cuda_types.cuh"

namespace elmo_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWindows = 8;  // live windows per register-blocked pass of the forward

// Loads a token's ids (clamped) and embedded chars into shared memory; returns its live length.
template <typename T>
__device__ int64_t stage_token(const int64_t* ids, const T* emb, float* s_emb, int64_t* s_ids, int64_t* s_live,
                               int64_t n, int64_t C, int64_t V, int64_t d) {
  for (int64_t i = threadIdx.x; i < C; i += blockDim.x) s_ids[i] = char_cnn_clamp_id(ids[n * C + i], V);
  __syncthreads();
  for (int64_t i = threadIdx.x; i < C * d; i += blockDim.x) s_emb[i] = to_float(emb[s_ids[i / d] * d + i % d]);
  if (threadIdx.x == 0) *s_live = char_cnn_live_length(s_ids, C);
  __syncthreads();
  return *s_live;
}

template <typename T>
__global__ void char_cnn_forward_kernel(const int64_t* ids, const T* emb, const T* packed_t, const T* bias, T* out,
                                        int16_t* windows, int64_t N, int64_t C, int64_t V, int64_t d, int64_t F,
                                        CharCnnGroups groups, bool use_tanh) {
  // One dynamic buffer holds everything (char_cnn_shared_bytes), so the glue's limit check sees every
  // byte: (C,) ids, the live length, then (C, d) embedded chars; the int64s first keep both aligned.
  extern __shared__ int64_t s_ids[];
  int64_t* s_live = s_ids + C;
  float* s_emb = reinterpret_cast<float*>(s_ids + C + 1);
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int64_t L = stage_token(ids, emb, s_emb, s_ids, s_live, n, C, V, d);
    const float* s_trail = s_emb + (C - 1) * d;  // embedding[p], p = the trailing id
    for (int64_t f = threadIdx.x; f < F; f += blockDim.x) {
      const int64_t w = groups.w[char_cnn_group_of(groups, f)];
      const int64_t live = char_cnn_live_windows(L, C, w);
      float best = 0.f;
      int64_t best_t = 0;
      // kWindows live windows at a time, so that each weight read (from L1/L2) serves kWindows FMAs.
      // Window t's w embedded chars are contiguous in s_emb, as filter f's column is in packed_t.
      for (int64_t t0 = 0; t0 < live; t0 += kWindows) {
        const int64_t count = live - t0 < kWindows ? live - t0 : kWindows;
        float acc[kWindows];
#pragma unroll
        for (int u = 0; u < kWindows; ++u) acc[u] = 0.f;
        for (int64_t j = 0; j < w * d; ++j) {
          const float wv = to_float(packed_t[j * F + f]);
          const float* x = s_emb + t0 * d + j;
#pragma unroll
          for (int u = 0; u < kWindows; ++u) {
            if (u < count) acc[u] += x[u * d] * wv;  // (t0 + u) * d + j < C * d for live windows
          }
        }
#pragma unroll
        for (int u = 0; u < kWindows; ++u) {
          if (u < count && (t0 + u == 0 || char_cnn_beats(acc[u], best))) {
            best = acc[u];
            best_t = t0 + u;
          }
        }
      }
      if (char_cnn_has_constant_window(L, C, w)) {
        float acc = 0.f;
        for (int64_t j = 0; j < w * d; ++j) acc += s_trail[j % d] * to_float(packed_t[j * F + f]);
        if (live == 0 || char_cnn_beats(acc, best)) {
          best = acc;
          best_t = L;
        }
      }
      out[n * F + f] = from_float<T>(char_cnn_activate(best + to_float(bias[f]), use_tanh));
      if (windows != nullptr) windows[n * F + f] = static_cast<int16_t>(best_t);
    }
    __syncthreads();  // s_emb is overwritten by the next token
  }
}

template <typename T>
__global__ void char_cnn_grad_kernel(const T* grad_out, const T* out, float* g, int64_t total, bool use_tanh) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    g[i] = to_float(grad_out[i]) * char_cnn_activation_grad(to_float(out[i]), use_tanh);
  }
}

// Window start as saved, clamped into the token (no read out of bounds on a corrupt input).
__device__ __forceinline__ int64_t window_start(const int16_t* windows, int64_t i, int64_t C, int64_t w) {
  const int64_t t = windows[i];
  return t < 0 ? 0 : (t > C - w ? C - w : t);
}

// Thread (f, split s) owns part[s, :, f] and part_bias[s, f]: sums over its tokens, no atomics.
template <typename T>
__global__ void char_cnn_weight_grad_kernel(const float* g, const int16_t* windows, const int64_t* ids, const T* emb,
                                            float* part, float* part_bias, int64_t splits, int64_t N, int64_t C,
                                            int64_t V, int64_t d, int64_t F, int64_t K, CharCnnGroups groups) {
  const int64_t f = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t s = blockIdx.y;
  if (f >= F) return;
  const int64_t w = groups.w[char_cnn_group_of(groups, f)];
  float* p = part + s * K * F + f;
  for (int64_t j = 0; j < K; ++j) p[j * F] = 0.f;
  const int64_t per = (N + splits - 1) / splits;
  const int64_t n0 = s * per, n1 = n0 + per < N ? n0 + per : N;
  float bias_sum = 0.f;
  for (int64_t n = n0; n < n1; ++n) {
    const float gv = g[n * F + f];
    bias_sum += gv;
    if (gv == 0.f) continue;
    const int64_t t = window_start(windows, n * F + f, C, w);
    for (int64_t k = 0; k < w; ++k) {
      const T* e = emb + char_cnn_clamp_id(ids[n * C + t + k], V) * d;
      for (int64_t c = 0; c < d; ++c) p[(k * d + c) * F] += gv * to_float(e[c]);
    }
  }
  part_bias[s * F + f] = bias_sum;
}

__global__ void char_cnn_reduce_kernel(const float* part, float* result, int64_t splits, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int64_t s = 0; s < splits; ++s) acc += part[s * total + i];
    result[i] = acc;
  }
}

// One block per token: each filter's thread adds g * its packed column to the embedded chars of
// its winning window in shared memory; the token's (C, d) sums then go to the table rows.
template <typename T>
__global__ void char_cnn_embedding_grad_kernel(const float* g, const int16_t* windows, const int64_t* ids,
                                               const T* packed_t, float* grad_emb, int64_t N, int64_t C, int64_t V,
                                               int64_t d, int64_t F, CharCnnGroups groups) {
  extern __shared__ float s_grad[];  // (C, d)
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    for (int64_t i = threadIdx.x; i < C * d; i += blockDim.x) s_grad[i] = 0.f;
    __syncthreads();
    for (int64_t f = threadIdx.x; f < F; f += blockDim.x) {
      const float gv = g[n * F + f];
      if (gv == 0.f) continue;
      const int64_t w = groups.w[char_cnn_group_of(groups, f)];
      const int64_t t = window_start(windows, n * F + f, C, w);
      for (int64_t j = 0; j < w * d; ++j) atomicAdd(s_grad + t * d + j, gv * to_float(packed_t[j * F + f]));
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < C * d; i += blockDim.x) {
      if (s_grad[i] != 0.f) atomicAdd(grad_emb + char_cnn_clamp_id(ids[n * C + i / d], V) * d + i % d, s_grad[i]);
    }
    __syncthreads();  // s_grad is reset for the next token
  }
}

}  // namespace

template <typename T>
cudaError_t launch_char_cnn_forward(const int64_t* ids, const T* emb, const T* packed_t, const T* bias, T* out,
                                    int16_t* windows, int64_t N, int64_t C, int64_t V, int64_t d, int64_t F,
                                    int64_t K, const CharCnnGroups& groups, bool use_tanh, cudaStream_t stream) {
  (void)K;
  if (N == 0 || F == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(N < 65535 ? N : 65535);
  char_cnn_forward_kernel<T><<<blocks, kThreads, char_cnn_shared_bytes(C, d), stream>>>(
      ids, emb, packed_t, bias, out, windows, N, C, V, d, F, groups, use_tanh);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_char_cnn_backward(const T* grad_out, const T* out, const int16_t* windows, const int64_t* ids,
                                     const T* emb, const T* packed_t, float* g, float* part, float* part_bias,
                                     int64_t splits, float* grad_packed_t, float* grad_bias, float* grad_emb,
                                     int64_t N, int64_t C, int64_t V, int64_t d, int64_t F, int64_t K,
                                     const CharCnnGroups& groups, bool use_tanh, cudaStream_t stream) {
  if (N == 0 || F == 0) return cudaSuccess;
  char_cnn_grad_kernel<T><<<grid_for(N * F, kThreads), kThreads, 0, stream>>>(grad_out, out, g, N * F, use_tanh);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 wgrid(static_cast<unsigned>((F + kThreads - 1) / kThreads), static_cast<unsigned>(splits));
  char_cnn_weight_grad_kernel<T><<<wgrid, kThreads, 0, stream>>>(g, windows, ids, emb, part, part_bias, splits, N, C,
                                                                  V, d, F, K, groups);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  char_cnn_reduce_kernel<<<grid_for(K * F, kThreads), kThreads, 0, stream>>>(part, grad_packed_t, splits, K * F);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  char_cnn_reduce_kernel<<<grid_for(F, kThreads), kThreads, 0, stream>>>(part_bias, grad_bias, splits, F);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>(N < 65535 ? N : 65535);
  const size_t shared = size_t(C) * d * sizeof(float);
  char_cnn_embedding_grad_kernel<T>
      <<<blocks, kThreads, shared, stream>>>(g, windows, ids, packed_t, grad_emb, N, C, V, d, F, groups);
  return cudaGetLastError();
}

#define EF_INSTANTIATE(T)                                                                                         \
  template cudaError_t launch_char_cnn_forward<T>(const int64_t*, const T*, const T*, const T*, T*, int16_t*,     \
                                                  int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,           \
                                                  const CharCnnGroups&, bool, cudaStream_t);                       \
  template cudaError_t launch_char_cnn_backward<T>(const T*, const T*, const int16_t*, const int64_t*, const T*,  \
                                                   const T*, float*, float*, float*, int64_t, float*, float*,     \
                                                   float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                                   const CharCnnGroups&, bool, cudaStream_t);
EF_INSTANTIATE(float)
EF_INSTANTIATE(__half)
EF_INSTANTIATE(__nv_bfloat16)
#undef EF_INSTANTIATE

}  // namespace cuda
}  // namespace elmo_fast
