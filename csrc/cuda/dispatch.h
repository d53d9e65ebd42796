// dtype dispatch for the CUDA glue: maps at::ScalarType to the torch-free kernels' storage types
// (float, __half, __nv_bfloat16) without including CUDA's fp16 headers in g++-compiled files; and
// what the tensor-core kernels need of a dtype and a device.
#pragma once

#include <string>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

struct __half;
struct __nv_bfloat16;

namespace elmo_fast {

template <typename T>
struct TypeTag {
  using type = T;
};

// at::Half / at::BFloat16 share their bit layout with CUDA's __half / __nv_bfloat16.
template <typename T>
T* device_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename Fn>
void dispatch_cuda_float_types(at::ScalarType type, const char* op, Fn&& fn) {
  switch (type) {
    case at::kFloat:
      fn(TypeTag<float>{});
      break;
    case at::kHalf:
      fn(TypeTag<__half>{});
      break;
    case at::kBFloat16:
      fn(TypeTag<__nv_bfloat16>{});
      break;
    default:
      TORCH_CHECK(false, op, ": CUDA supports float32, float16 and bfloat16, got ", type);
  }
}

// For the tensor-core kernels: float16 -> __half, else (bfloat16) __nv_bfloat16; the caller has
// checked the type (tensor_core_obstacle).
template <typename Fn>
void dispatch_half_types(at::ScalarType type, Fn&& fn) {
  if (type == at::kHalf) {
    fn(TypeTag<__half>{});
  } else {
    fn(TypeTag<__nv_bfloat16>{});
  }
}

// cudaDeviceGetAttribute (ATen/cuda/CUDAContext.h would need cuSPARSE's headers).
inline int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// Why the tensor-core kernels (WMMA on half and bfloat16) cannot take `type` on `device`, or "".
inline std::string tensor_core_obstacle(at::ScalarType type, int device) {
  if (type != at::kHalf && type != at::kBFloat16) {
    return "it takes float16 or bfloat16, got " + std::string(c10::toString(type));
  }
  if (device_attribute(cudaDevAttrComputeCapabilityMajor, device) < 8) {
    return "it needs a GPU of compute capability 8.0 or newer";
  }
  return "";
}

}  // namespace elmo_fast
