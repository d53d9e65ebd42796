// Launchers of the torch-free lstm_projection kernels (csrc/cuda/lstm.cu). Pointers are device
// pointers to row blocks of row-major, contiguous buffers; sizes in elements. T is float, __half or
// __nv_bfloat16 (storage); cell state, saved activations and arithmetic are float. Shape letters:
// A active rows of the step, n cells, P projection. Each launcher returns the launch's cudaError_t.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "elmo_fast/lstm_persistent_layout.h"

namespace elmo_fast {
namespace cuda {

// z (A, 4n) pre-activations; gates (A, 4n) float or null (not saved; may alias z when T is float);
// c (A, n) in/out; c_save (A, n) or null; m (A, n) = clip(o tanh(c), out_clip).
template <typename T>
cudaError_t launch_lstm_forward(const T* z, float* gates, float* c, float* c_save, T* m, int64_t A, int64_t n,
                                float cell_clip, float out_clip, cudaStream_t stream);

// h (count) clipped in place to [-limit, limit].
template <typename T>
cudaError_t launch_lstm_clip(T* h, int64_t count, float limit, cudaStream_t stream);

// d (count) <- (dh_future + d) where h's projection clip passed, else 0.
template <typename T>
cudaError_t launch_lstm_proj_backward(const T* dh_future, T* d, const T* h, int64_t count, float proj_clip,
                                      cudaStream_t stream);

// dm (A, n); gates (A, 4n); c, c_prev (A, n); dc (A, n) in/out; writes dz (A, 4n) and, when m is not
// null, m (A, n) = o tanh(c).
template <typename T>
cudaError_t launch_lstm_backward(const T* dm, const float* gates, const float* c, const float* c_prev, float* dc,
                                 T* dz, T* m, int64_t A, int64_t n, float cell_clip, cudaStream_t stream);

// The persistent forward (Note [persistent LSTM]) of steps [s_begin, s_end) of a plan
// (Note [LSTM packing]); T is __half or __nv_bfloat16. Row indices are packed rows.
template <typename T>
struct LstmPersistentArgs {
  const T* g = nullptr;         // input pre-activations with bias, (rows, 4n): row k = packed row g_base + k
  int64_t g_base = 0;
  const T* w_hh = nullptr;      // (4n, P)
  const T* w_proj = nullptr;    // (P, n), or null: no projection (P = n)
  T* hbuf = nullptr;            // (B + total, P): initial h in rows [0, B), outputs from row B on
  float* c = nullptr;           // (B, n) cell state of the sorted rows, in/out
  float* gates_out = nullptr;   // (total, 4n) activated gates, or null (not saved)
  float* c_out = nullptr;       // (total, n) cell states, or null
  T* m = nullptr;               // (B, n) scratch: the unprojected outputs of a step
  float* partial = nullptr;     // (unit_groups, rows_pad, Pcols) scratch: projection partial sums
  const int64_t* offset = nullptr;  // (steps + 1,) device copy of the plan's offsets
  int64_t B = 0, n = 0, P = 0, rows_pad = 0;  // rows_pad: B rounded up to kLstmPtRows
  int64_t s_begin = 0, s_end = 0;
  float cell_clip = 0.f, proj_clip = 0.f;  // <= 0: no clip
};

// One cooperative launch of layout.blocks blocks; the caller has checked lstm_persistent_fits.
template <typename T>
cudaError_t launch_lstm_persistent(const LstmPersistentArgs<T>& args, const LstmPersistentLayout& layout,
                                   cudaStream_t stream);

// How many blocks of the persistent kernel with `shared_bytes` of dynamic shared memory fit on one
// multiprocessor of the current device (0 when none).
template <typename T>
cudaError_t lstm_persistent_blocks_per_sm(size_t shared_bytes, int* blocks);

}  // namespace cuda
}  // namespace elmo_fast
