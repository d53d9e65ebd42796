// Dispatcher handles for torch's mkldnn:: GEMM ops (see onednn_ops.h). Handles are looked up once
// (function-local statics); a torch built without oneDNN has no such schemas and we report "absent".
#include "cpu/onednn_ops.h"

#include <optional>

#include <ATen/Context.h>
#include <ATen/core/List.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace elmo_fast::cpu_gemm {
namespace {

std::optional<c10::OperatorHandle> find_op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchema({name, overload});
}

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>);
using LinearBinaryFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const std::optional<at::Tensor>&, c10::string_view);
using ReorderFn = at::Tensor(const at::Tensor&, std::optional<int64_t>);

struct Handles {
  bool ok = false;
  bool bf16 = false;
  c10::TypedOperatorHandle<LinearFn> linear;
  c10::TypedOperatorHandle<LinearBinaryFn> linear_binary;
  c10::TypedOperatorHandle<ReorderFn> reorder;
};

// TypedOperatorHandle has no default constructor: build the struct from found handles only.
const Handles* handles() {
  static const Handles* h = []() -> const Handles* {
    if (!at::hasMKLDNN()) return nullptr;
    auto lin = find_op("mkldnn::_linear_pointwise", "");
    auto bin = find_op("mkldnn::_linear_pointwise", "binary");
    auto reo = find_op("mkldnn::_reorder_linear_weight", "");
    if (!lin || !bin || !reo) return nullptr;
    auto* out = new Handles{true, false, lin->typed<LinearFn>(), bin->typed<LinearBinaryFn>(), reo->typed<ReorderFn>()};
    if (auto bf16 = find_op("mkldnn::_is_mkldnn_bf16_supported", "")) {
      try {
        out->bf16 = bf16->typed<bool()>().call();
      } catch (const std::exception&) {
        out->bf16 = false;
      }
    }
    return out;  // intentionally leaked: lives for the process, like the dispatcher itself
  }();
  return h;
}

}  // namespace

bool onednn_available(at::ScalarType dtype) {
  const Handles* h = handles();
  // torch.backends.mkldnn.enabled = False (or flags(enabled=False)) turns this path off too.
  if (h == nullptr || !at::globalContext().userEnabledMkldnn()) return false;
  if (dtype == at::kFloat) return true;
  if (dtype == at::kBFloat16) return h->bf16;
  return false;
}

at::Tensor onednn_pack(const at::Tensor& weight_nk) {
  return handles()->reorder.call(weight_nk.contiguous(), std::nullopt);
}

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias) {
  std::optional<at::Tensor> b;
  if (bias.defined()) b = bias.contiguous();
  return handles()->linear.call(x.contiguous(), packed, b, "none", c10::List<std::optional<at::Scalar>>(),
                                std::nullopt);
}

at::Tensor onednn_linear_add(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& addend) {
  return handles()->linear_binary.call(x.contiguous(), addend.contiguous(), packed, std::nullopt, "add");
}

}  // namespace elmo_fast::cpu_gemm
