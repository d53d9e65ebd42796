// Host side of the persistent lstm_projection forward: whether it can serve a call (dtype, device,
// layout, residency), its scratch buffers, and the launch (csrc/cuda/lstm_persistent.cu).
#include "cuda/lstm_persistent_glue.h"

#include <string>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "common/kernel_choice.h"
#include "cuda/dispatch.h"
#include "elmo_fast/lstm_launch.h"
#include "elmo_fast/lstm_persistent_layout.h"

namespace elmo_fast {
namespace {

// Why the persistent kernel cannot serve this call, or "" when it can (then *layout is its layout).
std::string persistent_obstacle(const LstmSteps& st, LstmPersistentLayout* layout) {
  const at::Tensor& g = st.g;
  const int device = g.device().index();
  const std::string type_or_device = tensor_core_obstacle(g.scalar_type(), device);
  if (!type_or_device.empty()) return type_or_device;
  if (device_attribute(cudaDevAttrCooperativeLaunch, device) == 0) {
    return "the GPU does not support cooperative launches";
  }
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const size_t max_shared = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t n = st.c_state.size(1), P = st.hbuf.size(1);
  *layout = lstm_persistent_layout(n, P, st.w_proj.defined(), 2, sms);
  const std::string shape = " (n = " + std::to_string(n) + ", P = " + std::to_string(P) + ", " +
                            std::to_string(sms) + " multiprocessors)";
  if (layout->units > kLstmPtMaxUnits) {
    return "it needs at most " + std::to_string(kLstmPtMaxUnits) + " cells per multiprocessor" + shape;
  }
  if (layout->shared_bytes > max_shared) {
    return "its weight slices need " + std::to_string(layout->shared_bytes) + " bytes of shared memory per block, " +
           "the GPU has " + std::to_string(max_shared) + shape;
  }
  int per_sm = 0;
  dispatch_half_types(g.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(cuda::lstm_persistent_blocks_per_sm<T>(layout->shared_bytes, &per_sm));
  });
  if (!lstm_persistent_fits(*layout, sms, max_shared, int64_t(per_sm) * sms)) {
    return "its " + std::to_string(layout->blocks) + " blocks cannot all be resident at once" + shape;
  }
  return "";
}

}  // namespace

bool run_persistent_steps(const LstmSteps& st) {
  // No cells or no recurrent inputs: nothing to keep on chip, and the layout (n, P >= 1) is undefined.
  if (st.c_state.size(1) == 0 || st.hbuf.size(1) == 0) return false;
  LstmPersistentLayout layout;
  if (!kernels::take(kernels::Family::kLstm, "persistent", "lstm_projection",
                     [&] { return persistent_obstacle(st, &layout); })) {
    return false;
  }

  const at::Tensor& g = st.g;
  const int64_t B = st.plan.B, n = st.c_state.size(1), P = st.hbuf.size(1);
  const bool has_proj = st.w_proj.defined();
  const int64_t rows_pad = lstm_pt_round_up(B, kLstmPtRows);
  const at::Tensor offsets = index_tensor(st.plan.offset, g.device());
  const at::Tensor m = has_proj ? at::empty({B, n}, g.options()) : at::Tensor();
  const at::Tensor partial =
      has_proj ? at::empty({layout.unit_groups * rows_pad * layout.Pcols}, g.options().dtype(at::kFloat))
               : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(g.device().index());
  dispatch_half_types(g.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    cuda::LstmPersistentArgs<T> a;
    a.g = device_ptr<const T>(g);
    a.g_base = st.g_base;
    a.w_hh = device_ptr<const T>(st.w_hh);
    a.w_proj = has_proj ? device_ptr<const T>(st.w_proj) : nullptr;
    a.hbuf = device_ptr<T>(st.hbuf);
    a.c = st.c_state.data_ptr<float>();
    a.gates_out = st.gates_all.defined() ? st.gates_all.data_ptr<float>() : nullptr;
    a.c_out = st.c_all.defined() ? st.c_all.data_ptr<float>() : nullptr;
    a.m = has_proj ? device_ptr<T>(m) : nullptr;
    a.partial = has_proj ? partial.data_ptr<float>() : nullptr;
    a.offset = offsets.data_ptr<int64_t>();
    a.B = B;
    a.n = n;
    a.P = P;
    a.rows_pad = rows_pad;
    a.s_begin = st.s_begin;
    a.s_end = st.s_end;
    a.cell_clip = static_cast<float>(st.cell_clip);
    a.proj_clip = static_cast<float>(st.proj_clip);
    C10_CUDA_CHECK(cuda::launch_lstm_persistent(a, layout, stream));
  });
  return true;
}

}  // namespace elmo_fast
