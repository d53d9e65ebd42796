// Load-as-float / store-from-float for the CUDA storage types, and the grid size helper.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// The tensor-core kernels use bf16 WMMA, which needs sm_80. For an older arch in TORCH_CUDA_ARCH_LIST
// their device bodies are left out (a trap), so the build still works; the glue never launches them
// there (tensor_core_obstacle checks the device's compute capability).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define ELMO_FAST_TENSOR_CORE_ARCH 1
#else
#define ELMO_FAST_TENSOR_CORE_ARCH 0
#endif

namespace elmo_fast {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Enough blocks to fill any current GPU several times over; grid-stride loops cover the rest.
inline unsigned grid_for(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
}

}  // namespace cuda
}  // namespace elmo_fast
