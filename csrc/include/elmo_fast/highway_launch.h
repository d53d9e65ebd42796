// Launchers of the torch-free highway kernels (csrc/cuda/highway.cu). Pointers are device
// pointers to row-major, contiguous buffers; sizes in elements. T is float, __half or
// __nv_bfloat16; arithmetic is float. Each launcher returns the launch's cudaError_t.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace elmo_fast {
namespace cuda {

// proj (N, 2F): [nonlinear | gate] on entry; [h | g] on exit when save_activations.
// x, y (N, F) may alias (in-place layer update).
template <typename T>
cudaError_t launch_highway_forward(T* proj, const T* x, T* y, int64_t N, int64_t F, bool save_activations,
                                   cudaStream_t stream);

// Recomputes a layer's output from its input and saved activations act = [h | g]; y may alias x.
template <typename T>
cudaError_t launch_highway_mix(const T* act, const T* x, T* y, int64_t N, int64_t F, cudaStream_t stream);

// dy, x (N, F); act (N, 2F) = [h | g]; writes d_proj (N, 2F) and dx = dy * g (N, F); dx may alias dy.
template <typename T>
cudaError_t launch_highway_backward(const T* dy, const T* x, const T* act, T* d_proj, T* dx, int64_t N, int64_t F,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace elmo_fast
