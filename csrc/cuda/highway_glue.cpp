// CUDA highway op: ATen tensors -> the torch-free pointwise kernels of highway.cu, on the current
// stream of the input's device; the GEMMs run through common/linear.h (cuBLAS via ATen).
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/highway_driver.h"
#include "cuda/dispatch.h"
#include "elmo_fast/highway_launch.h"

namespace elmo_fast {
namespace {

struct CudaHighwayPointwise {
  void forward(at::Tensor& proj, const at::Tensor& x, at::Tensor& y, bool save) const {
    const int64_t N = x.size(0), F = x.size(1);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
    dispatch_cuda_float_types(x.scalar_type(), "highway_cuda", [&](auto tag) {
      using T = typename decltype(tag)::type;
      C10_CUDA_CHECK(cuda::launch_highway_forward(device_ptr<T>(proj), device_ptr<const T>(x), device_ptr<T>(y), N,
                                                  F, save, stream));
    });
  }
  void mix(const at::Tensor& act, const at::Tensor& x, at::Tensor& y) const {
    const int64_t N = x.size(0), F = x.size(1);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
    dispatch_cuda_float_types(x.scalar_type(), "highway_mix_cuda", [&](auto tag) {
      using T = typename decltype(tag)::type;
      C10_CUDA_CHECK(cuda::launch_highway_mix(device_ptr<const T>(act), device_ptr<const T>(x), device_ptr<T>(y), N,
                                              F, stream));
    });
  }
  void backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& act, at::Tensor& d_proj,
                at::Tensor& dx) const {
    const int64_t N = x.size(0), F = x.size(1);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
    dispatch_cuda_float_types(x.scalar_type(), "highway_backward_cuda", [&](auto tag) {
      using T = typename decltype(tag)::type;
      C10_CUDA_CHECK(cuda::launch_highway_backward(device_ptr<const T>(dy), device_ptr<const T>(x),
                                                   device_ptr<const T>(act), device_ptr<T>(d_proj),
                                                   device_ptr<T>(dx), N, F, stream));
    });
  }
};

std::tuple<at::Tensor, at::Tensor> highway_cuda(const at::Tensor& x, at::TensorList weight, at::TensorList bias,
                                                bool save_activations) {
  const c10::cuda::CUDAGuard guard(x.device());
  return highway_forward_driver(x, weight, bias, save_activations, CudaHighwayPointwise{});
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> highway_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& activations, at::TensorList weight) {
  const c10::cuda::CUDAGuard guard(x.device());
  return highway_backward_driver(grad_out, x, activations, weight, CudaHighwayPointwise{});
}

}  // namespace
}  // namespace elmo_fast

TORCH_LIBRARY_IMPL(elmo_fast, CUDA, m) {
  m.impl("highway", &elmo_fast::highway_cuda);
  m.impl("highway_backward", &elmo_fast::highway_backward_cuda);
}
