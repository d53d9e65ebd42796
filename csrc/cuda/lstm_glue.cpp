// CUDA lstm_projection op: ATen tensors -> the torch-free pointwise kernels of lstm.cu, on the
// current stream of the input's device; the time loops are common/lstm_driver.h's, the GEMMs run
// through common/linear.h (cuBLAS via ATen). Cell state and saved activations are float32.
#include <algorithm>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/lstm_driver.h"
#include "common/kernel_choice.h"
#include "common/lstm_pair.h"
#include "cuda/dispatch.h"
#include "cuda/lstm_persistent_glue.h"
#include "elmo_fast/lstm_launch.h"

namespace elmo_fast {
namespace {

float* float_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? device_ptr<T>(t) : nullptr;
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()); }

// Inference input GEMMs of up to this many bytes of gates at once: cuBLAS has no fresh-product
// concern (Note [fresh products]), and each chunk is one persistent launch that loads the weights.
constexpr int64_t kCudaInputChunkBytes = int64_t{128} << 20;

struct CudaLstmPointwise {
  static constexpr bool kSumsRecurrent = false;  // cuBLAS adds the recurrent product into z (beta = 1)

  int64_t input_chunk_rows(int64_t n, int64_t elem_bytes) const {
    return std::max<int64_t>(1, kCudaInputChunkBytes / (4 * n * elem_bytes));
  }
  bool run_steps(const LstmSteps& steps) const { return run_persistent_steps(steps); }

  void forward(const at::Tensor& z, const at::Tensor& /*z_rec: never set*/, const at::Tensor& gates, const at::Tensor& c, const at::Tensor& c_save,
               const at::Tensor& m, double cell_clip, double out_clip) const {
    dispatch_cuda_float_types(z.scalar_type(), "lstm_projection_cuda", [&](auto tag) {
      using T = typename decltype(tag)::type;
      C10_CUDA_CHECK(cuda::launch_lstm_forward(device_ptr<const T>(z), float_or_null(gates), c.data_ptr<float>(),
                                               float_or_null(c_save), device_ptr<T>(m), c.size(0), c.size(1),
                                               static_cast<float>(cell_clip), static_cast<float>(out_clip),
                                               stream_of(z)));
    });
  }
  void clip(const at::Tensor& h, double limit) const {
    dispatch_cuda_float_types(h.scalar_type(), "lstm_projection_cuda", [&](auto tag) {
      using T = typename decltype(tag)::type;
      C10_CUDA_CHECK(cuda::launch_lstm_clip(device_ptr<T>(h), h.numel(), static_cast<float>(limit), stream_of(h)));
    });
  }
  void proj_backward(const at::Tensor& dh_future, const at::Tensor& d, const at::Tensor& h, double proj_clip) const {
    dispatch_cuda_float_types(h.scalar_type(), "lstm_projection_backward_cuda", [&](auto tag) {
      using T = typename decltype(tag)::type;
      C10_CUDA_CHECK(cuda::launch_lstm_proj_backward(device_ptr<const T>(dh_future), device_ptr<T>(d),
                                                     device_ptr<const T>(h), h.numel(), static_cast<float>(proj_clip),
                                                     stream_of(h)));
    });
  }
  void backward(const at::Tensor& dm, const at::Tensor& gates, const at::Tensor& c, const at::Tensor& c_prev,
                const at::Tensor& dc, const at::Tensor& dz, const at::Tensor& m, double cell_clip) const {
    dispatch_cuda_float_types(dm.scalar_type(), "lstm_projection_backward_cuda", [&](auto tag) {
      using T = typename decltype(tag)::type;
      C10_CUDA_CHECK(cuda::launch_lstm_backward(device_ptr<const T>(dm), gates.data_ptr<float>(), c.data_ptr<float>(),
                                                c_prev.data_ptr<float>(), dc.data_ptr<float>(), device_ptr<T>(dz),
                                                ptr_or_null<T>(m), c.size(0), c.size(1),
                                                static_cast<float>(cell_clip), stream_of(dm)));
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_projection_cuda(
    const at::Tensor& x, const at::Tensor& lengths, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_proj, const at::Tensor& h0,
    const at::Tensor& c0, double cell_clip, double proj_clip, bool reverse, bool save_activations) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lstm_forward_driver(x, lengths, w_ih, w_hh, bias, w_proj, h0, c0, cell_clip, proj_clip, reverse,
                             save_activations, CudaLstmPointwise{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_projection_backward_cuda(const at::Tensor& grad_out, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                              const at::Tensor& x, const at::Tensor& lengths, const at::Tensor& w_ih,
                              const at::Tensor& w_hh, const std::optional<at::Tensor>& w_proj, const at::Tensor& h0,
                              const at::Tensor& c0, const at::Tensor& out, const at::Tensor& activations,
                              bool has_bias, double cell_clip, double proj_clip, bool reverse) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lstm_backward_driver(grad_out, grad_h_n, grad_c_n, x, lengths, w_ih, w_hh, w_proj, h0, c0, out, activations,
                              has_bias, cell_clip, proj_clip, reverse, CudaLstmPointwise{});
}

// Note [directions on two streams]
// The two directions of a layer are independent chains of small kernels (at ELMo's batch sizes one
// step's GEMMs fill a fraction of the GPU), so ELMO_FAST_CUDA_DIRECTIONS=streams runs each on its
// own stream from torch's pool: both wait for the caller's stream (their inputs come from it), the
// caller's stream waits for both before anything else runs on it, and every output, allocated on a
// side stream, is recorded on the caller's stream so that the caching allocator does not hand its
// memory to the side stream again while the caller's kernels may still read it. Temporaries live
// and die on their side stream. The same pattern is what torch.cuda.graph capture needs, so
// capture works too. Serial (the default until validated, Note [validated kernels]) runs the
// directions one after the other on the caller's stream.
class CudaEvent {
 public:
  CudaEvent() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }
  ~CudaEvent() { cudaEventDestroy(event_); }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  void record(cudaStream_t s) { C10_CUDA_CHECK(cudaEventRecord(event_, s)); }
  void block(cudaStream_t s) { C10_CUDA_CHECK(cudaStreamWaitEvent(s, event_, 0)); }

 private:
  cudaEvent_t event_ = nullptr;
};

void record_on(const TensorVec& tensors, const c10::cuda::CUDAStream& stream) {
  for (const at::Tensor& t : tensors) {
    if (t.defined() && t.numel() > 0) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream);
  }
}

// run_pair for lstm_pair.h: both directions on side streams; the caller records the outputs.
void run_on_streams(const std::function<void(int)>& job, c10::DeviceIndex device) {
  const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(device);
  CudaEvent inputs_ready, done[2];
  inputs_ready.record(caller.stream());
  for (int i = 0; i < 2; ++i) {
    const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device);
    inputs_ready.block(side.stream());
    {
      const c10::cuda::CUDAStreamGuard on_side(side);
      job(i);
    }
    done[i].record(side.stream());
  }
  done[0].block(caller.stream());
  done[1].block(caller.stream());
}

// Runs lstm_pair_forward / lstm_pair_backward (`pair(run_pair)`) with the directions on the caller's
// stream or on two (Note [directions on two streams]); returns its tuple of per-direction lists.
template <class Pair>
auto run_directions(const char* op, at::TensorList x, const Pair& pair) {
  TORCH_CHECK(!x.empty(), op, ": x must hold 2 tensors (forward, reverse), got 0");
  const c10::cuda::CUDAGuard guard(x[0].device());
  // A persistent forward fills every multiprocessor with blocks that must all be resident at once:
  // two side by side would gain nothing and could wait on each other, so they take turns.
  if (!kernels::chosen(kernels::Family::kCudaDirections, "streams") ||
      kernels::chosen(kernels::Family::kLstm, "persistent")) {
    return pair([](const std::string&, double, const std::function<void(int)>& job) {
      job(0);
      job(1);
    });
  }
  const c10::DeviceIndex device = x[0].device().index();
  auto result = pair([device](const std::string&, double, const std::function<void(int)>& job) {
    run_on_streams(job, device);
  });
  const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(device);
  std::apply([&](const auto&... lists) { (record_on(lists, caller), ...); }, result);
  return result;
}

std::tuple<TensorVec, TensorVec, TensorVec, TensorVec> lstm_bidirectional_cuda(
    at::TensorList x, const at::Tensor& lengths, at::TensorList w_ih, at::TensorList w_hh, const OptTensorList& bias,
    const OptTensorList& w_proj, at::TensorList h0, at::TensorList c0, double cell_clip, double proj_clip,
    bool save_activations) {
  return run_directions("lstm_bidirectional", x, [&](const auto& run_pair) {
    return lstm_pair_forward(x, lengths, w_ih, w_hh, bias, w_proj, h0, c0, cell_clip, proj_clip, save_activations,
                             lstm_projection_cuda, run_pair);
  });
}

std::tuple<TensorVec, TensorVec, TensorVec, TensorVec, TensorVec, TensorVec, TensorVec>
lstm_bidirectional_backward_cuda(at::TensorList grad_out, at::TensorList grad_h_n, at::TensorList grad_c_n,
                                 at::TensorList x, const at::Tensor& lengths, at::TensorList w_ih,
                                 at::TensorList w_hh, const OptTensorList& w_proj, at::TensorList h0,
                                 at::TensorList c0, at::TensorList out, at::TensorList activations, bool has_bias,
                                 double cell_clip, double proj_clip) {
  return run_directions("lstm_bidirectional_backward", x, [&](const auto& run_pair) {
    return lstm_pair_backward(grad_out, grad_h_n, grad_c_n, x, lengths, w_ih, w_hh, w_proj, h0, c0, out, activations,
                              has_bias, cell_clip, proj_clip, lstm_projection_backward_cuda, run_pair);
  });
}

}  // namespace
}  // namespace elmo_fast

TORCH_LIBRARY_IMPL(elmo_fast, CUDA, m) {
  m.impl("lstm_projection", &elmo_fast::lstm_projection_cuda);
  m.impl("lstm_projection_backward", &elmo_fast::lstm_projection_backward_cuda);
  m.impl("lstm_bidirectional", &elmo_fast::lstm_bidirectional_cuda);
  m.impl("lstm_bidirectional_backward", &elmo_fast::lstm_bidirectional_backward_cuda);
}
