// Char-CNN forward on tensor cores (half, bfloat16; float accumulation), torch-free: WMMA 16x16x16
// tiles of 16 windows x 16 filters straight out of the tokens' staged chars, the max over windows,
// bias and activation, and the winning window per (token, filter) for backward
// (Note [char-CNN on tensor cores] in elmo_fast/char_cnn_tc_layout.h). Block (x, y): tokens
// x*kCharCnnTcTokens .. +15, filter tiles of group y; each warp owns kCharCnnTcTilesPerWarp tiles.
// The backward is char_cnn.cu's: it reads only the windows.
#include <math_constants.h>
#include <mma.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "elmo_fast/char_cnn_launch.h"
#include "elmo_fast/char_cnn_math.h"
#include "elmo_fast/char_cnn_tc_layout.h"
#include "elmo_fast/cuda_types.cuh"

namespace elmo_fast {
namespace cuda {
namespace {

namespace wmma = nvcuda::wmma;

// inf - inf and NaN - NaN are NaN. (Unused below sm_80, where the kernel body is left out.)
[[maybe_unused]] __device__ __forceinline__ bool is_finite(float v) { return v - v == 0.f; }

// A window's conv over exactly its filter's w chars (count = w * dp values; packed column f, stride Fp).
// The tile MMA reads w_max chars for every filter, the extra ones against zero weights, which is exact
// unless one of them is NaN or inf (x * 0 = NaN): tokens holding such a char take this path instead,
// window by window, so that they give what the SIMT kernel and the reference give.
template <typename T>
__device__ float window_dot(const T* x, const T* column, int count, int Fp) {
  float acc = 0.f;
#pragma unroll 1
  for (int k = 0; k < count; ++k, column += Fp) acc += to_float(x[k]) * to_float(*column);
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kCharCnnTcWarps * 32)
    char_cnn_tc_forward_kernel(const int64_t* ids, const T* emb_p, const T* packed_p, const T* bias, T* out,
                               int16_t* windows, int64_t N, int C, int64_t V, int F, int dp, int Fp, int ksteps,
                               int slot, int w_min, CharCnnGroups groups, bool use_tanh) {
#if ELMO_FAST_TENSOR_CORE_ARCH
  extern __shared__ __align__(128) unsigned char smem[];
  T* s_emb = reinterpret_cast<T*>(smem);  // (kCharCnnTcTokens, slot, dp)
  float* s_acc = reinterpret_cast<float*>(smem + sizeof(T) * kCharCnnTcTokens * slot * dp);  // (warps, 16, 16)
  __shared__ int s_live[kCharCnnTcTokens];
  __shared__ int s_nonfinite[kCharCnnTcTokens];  // the token has a NaN or inf among its staged chars

  const int64_t n0 = int64_t(blockIdx.x) * kCharCnnTcTokens;
  const int tokens = N - n0 < kCharCnnTcTokens ? static_cast<int>(N - n0) : kCharCnnTcTokens;
  if (threadIdx.x < kCharCnnTcTokens) s_nonfinite[threadIdx.x] = 0;
  __syncthreads();

  // Stage: slot position r < C holds char r; positions >= C (read only by masked rows or against
  // zero weights) and the slots past the last token are zeros, as are channels >= d in emb_p.
  const int slot_elems = slot * dp;
  for (int e = threadIdx.x; e < kCharCnnTcTokens * slot_elems; e += blockDim.x) {
    const int i = e / slot_elems, r = (e % slot_elems) / dp, c = e % dp;
    T v = from_float<T>(0.f);
    if (i < tokens && r < C) {
      v = emb_p[char_cnn_clamp_id(ids[(n0 + i) * C + r], V) * dp + c];
      if (!is_finite(to_float(v))) atomicOr(s_nonfinite + i, 1);
    }
    s_emb[e] = v;
  }
  if (threadIdx.x < tokens) {  // the live length L over the clamped ids (Note [char-CNN padding shortcut])
    s_live[threadIdx.x] = static_cast<int>(char_cnn_live_length(ids + (n0 + threadIdx.x) * C, C, CharIdClamped{V}));
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int col = lane & 15, part = lane >> 4;  // lanes 0-15 scan rows 0-7 of a tile, 16-31 rows 8-15
  float* acc_s = s_acc + warp * 256;
  const int tiles = Fp / 16;
  for (int jt = 0; jt < kCharCnnTcTilesPerWarp; ++jt) {
    const int tile = (int(blockIdx.y) * kCharCnnTcWarps + warp) * kCharCnnTcTilesPerWarp + jt;
    if (tile >= tiles) break;  // warp-uniform
    const int f0 = tile * 16;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[kCharCnnTcMaxKSteps];
#pragma unroll
    for (int ks = 0; ks < kCharCnnTcMaxKSteps; ++ks) {
      if (ks < ksteps) wmma::load_matrix_sync(b[ks], packed_p + int64_t(ks) * 16 * Fp + f0, Fp);
    }
    const int f = f0 + col;
    const bool real = f < F;
    const int w = real ? groups.w[char_cnn_group_of(groups, f)] : w_min;
    const float bf = real ? to_float(bias[f]) : 0.f;
    for (int i = 0; i < tokens; ++i) {
      const int L = s_live[i];
      const bool exact = s_nonfinite[i] != 0;  // warp-uniform
      const int last = L < C - w ? L : C - w;                       // this filter's last window row
      const int rows = (L < C - w_min ? L : C - w_min) + 1;         // rows any filter of the tile needs
      float best = -CUDART_INF_F;
      int best_t = 0;
      if (exact) {  // warp-uniform; rare: lanes 0-15 scan their filter's windows one by one
#pragma unroll 1
        for (int t = 0; part == 0 && real && t <= last; ++t) {
          const float v = window_dot(s_emb + (i * slot + t) * dp, packed_p + f, w * dp, Fp);
          if (char_cnn_beats(v, best)) {
            best = v;
            best_t = t;
          }
        }
      }
      for (int t0 = 0; !exact && t0 < rows; t0 += 16) {  // warp-uniform
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
        const T* a_base = s_emb + (i * slot + t0) * dp;
#pragma unroll
        for (int ks = 0; ks < kCharCnnTcMaxKSteps; ++ks) {
          if (ks < ksteps) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
            wmma::load_matrix_sync(a, a_base + ks * 16, dp);
            wmma::mma_sync(acc, a, b[ks], acc);
          }
        }
        wmma::store_matrix_sync(acc_s, acc, 16, wmma::mem_row_major);
        __syncwarp();
        for (int r = part * 8; r < part * 8 + 8; ++r) {
          const int t = t0 + r;
          const float v = acc_s[r * 16 + col];
          if (t <= last && char_cnn_beats(v, best)) {  // ascending t: the first maximal window wins
            best = v;
            best_t = t;
          }
        }
        __syncwarp();  // acc_s is overwritten by the next tile
      }
      const float other = __shfl_xor_sync(0xffffffffu, best, 16);
      const int other_t = __shfl_xor_sync(0xffffffffu, best_t, 16);
      if (char_cnn_beats_merge(other, other_t, best, best_t)) {
        best = other;
        best_t = other_t;
      }
      if (part == 0 && real) {
        const int64_t o = (n0 + i) * F + f;
        out[o] = from_float<T>(char_cnn_activate(best + bf, use_tanh));
        if (windows != nullptr) windows[o] = static_cast<int16_t>(best_t);
      }
    }
  }
#else
  __trap();
#endif
}

}  // namespace

template <typename T>
cudaError_t launch_char_cnn_forward_tc(const int64_t* ids, const T* emb_p, const T* packed_p, const T* bias, T* out,
                                       int16_t* windows, int64_t N, int64_t C, int64_t V, int64_t F, int64_t w_min,
                                       const CharCnnTcLayout& layout, const CharCnnGroups& groups, bool use_tanh,
                                       cudaStream_t stream) {
  if (N == 0 || F == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((N + kCharCnnTcTokens - 1) / kCharCnnTcTokens),
                  static_cast<unsigned>(layout.grid_y));
  char_cnn_tc_forward_kernel<T><<<grid, kCharCnnTcWarps * 32, layout.shared_bytes, stream>>>(
      ids, emb_p, packed_p, bias, out, windows, N, static_cast<int>(C), V, static_cast<int>(F),
      static_cast<int>(layout.dp), static_cast<int>(layout.Fp), static_cast<int>(layout.ksteps),
      static_cast<int>(layout.slot), static_cast<int>(w_min), groups, use_tanh);
  return cudaGetLastError();
}

#define EF_INSTANTIATE(T)                                                                                        \
  template cudaError_t launch_char_cnn_forward_tc<T>(const int64_t*, const T*, const T*, const T*, T*, int16_t*, \
                                                     int64_t, int64_t, int64_t, int64_t, int64_t,                \
                                                     const CharCnnTcLayout&, const CharCnnGroups&, bool,         \
                                                     cudaStream_t);
EF_INSTANTIATE(__half)
EF_INSTANTIATE(__nv_bfloat16)
#undef EF_INSTANTIATE

}  // namespace cuda
}  // namespace elmo_fast
