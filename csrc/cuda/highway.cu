// Highway pointwise kernels (torch-free): one thread per (row, feature) element of an (N, F) layer,
// grid-stride; the math is csrc/include/elmo_fast/highway_math.h, shared with the CPU path.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "elmo_fast/cuda_types.cuh"
#include "elmo_fast/highway_launch.h"
#include "elmo_fast/highway_math.h"

namespace elmo_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void highway_forward_kernel(T* proj, const T* x, T* y, int64_t N, int64_t F, bool save) {
  const int64_t total = N * F;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = idx / F, f = idx - row * F;
    T* p = proj + row * 2 * F;
    float h, g;
    const float out = highway_point_forward(to_float(p[f]), to_float(p[F + f]), to_float(x[idx]), &h, &g);
    y[idx] = from_float<T>(out);
    if (save) {
      p[f] = from_float<T>(h);
      p[F + f] = from_float<T>(g);
    }
  }
}

template <typename T>
__global__ void highway_mix_kernel(const T* act, const T* x, T* y, int64_t N, int64_t F) {
  const int64_t total = N * F;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = idx / F, f = idx - row * F;
    const T* a = act + row * 2 * F;
    y[idx] = from_float<T>(highway_mix(to_float(x[idx]), to_float(a[f]), to_float(a[F + f])));
  }
}

template <typename T>
__global__ void highway_backward_kernel(const T* dy, const T* x, const T* act, T* d_proj, T* dx, int64_t N,
                                        int64_t F) {
  const int64_t total = N * F;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = idx / F, f = idx - row * F;
    const T* a = act + row * 2 * F;
    float d_nl, d_gate, dx_direct;
    highway_point_backward(to_float(dy[idx]), to_float(x[idx]), to_float(a[f]), to_float(a[F + f]), &d_nl, &d_gate,
                           &dx_direct);
    d_proj[row * 2 * F + f] = from_float<T>(d_nl);
    d_proj[row * 2 * F + F + f] = from_float<T>(d_gate);
    dx[idx] = from_float<T>(dx_direct);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_highway_forward(T* proj, const T* x, T* y, int64_t N, int64_t F, bool save_activations,
                                   cudaStream_t stream) {
  if (N * F == 0) return cudaSuccess;
  highway_forward_kernel<<<grid_for(N * F, kThreads), kThreads, 0, stream>>>(proj, x, y, N, F, save_activations);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_highway_mix(const T* act, const T* x, T* y, int64_t N, int64_t F, cudaStream_t stream) {
  if (N * F == 0) return cudaSuccess;
  highway_mix_kernel<<<grid_for(N * F, kThreads), kThreads, 0, stream>>>(act, x, y, N, F);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_highway_backward(const T* dy, const T* x, const T* act, T* d_proj, T* dx, int64_t N, int64_t F,
                                    cudaStream_t stream) {
  if (N * F == 0) return cudaSuccess;
  highway_backward_kernel<<<grid_for(N * F, kThreads), kThreads, 0, stream>>>(dy, x, act, d_proj, dx, N, F);
  return cudaGetLastError();
}

#define EF_INSTANTIATE(T)                                                                                 \
  template cudaError_t launch_highway_forward<T>(T*, const T*, T*, int64_t, int64_t, bool, cudaStream_t); \
  template cudaError_t launch_highway_mix<T>(const T*, const T*, T*, int64_t, int64_t, cudaStream_t);     \
  template cudaError_t launch_highway_backward<T>(const T*, const T*, const T*, T*, T*, int64_t, int64_t, \
                                                  cudaStream_t);
EF_INSTANTIATE(float)
EF_INSTANTIATE(__half)
EF_INSTANTIATE(__nv_bfloat16)
#undef EF_INSTANTIATE

}  // namespace cuda
}  // namespace elmo_fast
