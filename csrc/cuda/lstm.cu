// lstm_projection pointwise kernels (torch-free): one thread per (row, cell) unit of a step's active
// rows, grid-stride, reading the four gate blocks n apart (RNN.cu); the math is
// csrc/include/elmo_fast/lstm_math.h, shared with the CPU path. Shape letters: A rows, n cells.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "elmo_fast/cuda_types.cuh"
#include "elmo_fast/lstm_launch.h"
#include "elmo_fast/lstm_math.h"

namespace elmo_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// gates may alias z (T = float): each thread reads its four z values before writing its gates.
template <typename T>
__global__ void lstm_forward_kernel(const T* z, float* gates, float* c, float* c_save, T* m, int64_t A, int64_t n,
                                    float cell_clip, float out_clip) {
  const int64_t total = A * n;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = idx / n, u = idx - row * n;
    const T* zr = z + row * 4 * n;
    const float zi = to_float(zr[u]), zf = to_float(zr[n + u]), zj = to_float(zr[2 * n + u]),
                zo = to_float(zr[3 * n + u]);
    float gi, gf, gj, go, cu = c[idx];
    const float mu = lstm_point_forward(zi, zf, zj, zo, &cu, cell_clip, out_clip, &gi, &gf, &gj, &go);
    c[idx] = cu;
    m[idx] = from_float<T>(mu);
    if (gates != nullptr) {
      float* gr = gates + row * 4 * n;
      gr[u] = gi;
      gr[n + u] = gf;
      gr[2 * n + u] = gj;
      gr[3 * n + u] = go;
    }
    if (c_save != nullptr) c_save[idx] = cu;
  }
}

template <typename T>
__global__ void lstm_clip_kernel(T* h, int64_t count, float limit) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < count;
       idx += int64_t(gridDim.x) * blockDim.x) {
    h[idx] = from_float<T>(ef_clip(to_float(h[idx]), limit));
  }
}

template <typename T>
__global__ void lstm_proj_backward_kernel(const T* dh_future, T* d, const T* h, int64_t count, float proj_clip) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < count;
       idx += int64_t(gridDim.x) * blockDim.x) {
    d[idx] = from_float<T>(lstm_proj_backward(to_float(dh_future[idx]), to_float(d[idx]), to_float(h[idx]), proj_clip));
  }
}

template <typename T>
__global__ void lstm_backward_kernel(const T* dm, const float* gates, const float* c, const float* c_prev, float* dc,
                                     T* dz, T* m, int64_t A, int64_t n, float cell_clip) {
  const int64_t total = A * n;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = idx / n, u = idx - row * n;
    const float* g = gates + row * 4 * n;
    float dzi, dzf, dzj, dzo, dcu = dc[idx];
    const float mu = lstm_point_backward(to_float(dm[idx]), &dcu, g[u], g[n + u], g[2 * n + u], g[3 * n + u], c[idx],
                                         c_prev[idx], cell_clip, &dzi, &dzf, &dzj, &dzo);
    dc[idx] = dcu;
    T* dzr = dz + row * 4 * n;
    dzr[u] = from_float<T>(dzi);
    dzr[n + u] = from_float<T>(dzf);
    dzr[2 * n + u] = from_float<T>(dzj);
    dzr[3 * n + u] = from_float<T>(dzo);
    if (m != nullptr) m[idx] = from_float<T>(mu);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_lstm_forward(const T* z, float* gates, float* c, float* c_save, T* m, int64_t A, int64_t n,
                                float cell_clip, float out_clip, cudaStream_t stream) {
  if (A * n == 0) return cudaSuccess;
  lstm_forward_kernel<<<grid_for(A * n, kThreads), kThreads, 0, stream>>>(z, gates, c, c_save, m, A, n, cell_clip,
                                                                          out_clip);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_lstm_clip(T* h, int64_t count, float limit, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  lstm_clip_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(h, count, limit);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_lstm_proj_backward(const T* dh_future, T* d, const T* h, int64_t count, float proj_clip,
                                      cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  lstm_proj_backward_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(dh_future, d, h, count, proj_clip);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_lstm_backward(const T* dm, const float* gates, const float* c, const float* c_prev, float* dc,
                                 T* dz, T* m, int64_t A, int64_t n, float cell_clip, cudaStream_t stream) {
  if (A * n == 0) return cudaSuccess;
  lstm_backward_kernel<<<grid_for(A * n, kThreads), kThreads, 0, stream>>>(dm, gates, c, c_prev, dc, dz, m, A, n,
                                                                           cell_clip);
  return cudaGetLastError();
}

#define EF_INSTANTIATE(T)                                                                                           \
  template cudaError_t launch_lstm_forward<T>(const T*, float*, float*, float*, T*, int64_t, int64_t, float, float, \
                                              cudaStream_t);                                                        \
  template cudaError_t launch_lstm_clip<T>(T*, int64_t, float, cudaStream_t);                                       \
  template cudaError_t launch_lstm_proj_backward<T>(const T*, T*, const T*, int64_t, float, cudaStream_t);          \
  template cudaError_t launch_lstm_backward<T>(const T*, const float*, const float*, const float*, float*, T*, T*,  \
                                               int64_t, int64_t, float, cudaStream_t);
EF_INSTANTIATE(float)
EF_INSTANTIATE(__half)
EF_INSTANTIATE(__nv_bfloat16)
#undef EF_INSTANTIATE

}  // namespace cuda
}  // namespace elmo_fast
