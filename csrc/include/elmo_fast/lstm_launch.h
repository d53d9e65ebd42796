// Launchers of the torch-free lstm_projection kernels (csrc/cuda/lstm.cu). Pointers are device
// pointers to row blocks of row-major, contiguous buffers; sizes in elements. T is float, __half or
// __nv_bfloat16 (storage); cell state, saved activations and arithmetic are float. Shape letters:
// A active rows of the step, n cells, P projection. Each launcher returns the launch's cudaError_t.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

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

}  // namespace cuda
}  // namespace elmo_fast
