// dtype dispatch for the CUDA glue: maps at::ScalarType to the torch-free kernels' storage types
// (float, __half, __nv_bfloat16) without including CUDA's fp16 headers in g++-compiled files.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace elmo_fast
