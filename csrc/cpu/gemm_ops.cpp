// Private ops that let tests and benchmarks steer and observe the CPU GEMM layer (gemm.h). Kept in
// a library fragment beside the layer so that csrc/ops.cpp holds only the model's ops.
#include <string>

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "cpu/gemm.h"
#include "cpu/gemm_cache.h"

namespace elmo_fast {
namespace {

void set_cpu_gemm(c10::string_view mode) { cpu_gemm::set_mode(std::string(mode)); }
void cpu_gemm_measure(bool on) { cpu_gemm::set_measure(on); }
std::string cpu_gemm_info() { return cpu_gemm::info_json(); }
void cpu_gemm_reset() {
  cpu_gemm::clear_cache();
  cpu_gemm::reset_counters();
}

// Direct entry points to the two weight-operand GEMMs, so tests can cover dtypes (bfloat16) and
// shapes that no model op reaches yet.
at::Tensor cpu_gemm_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "_cpu_gemm_linear: bad shapes");
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  if (cpu_gemm::handles(out)) {
    cpu_gemm::linear_into(out, x, weight, b);
  } else {
    out = b.defined() ? at::addmm(b, x, weight.t()) : at::mm(x, weight.t());
  }
  return out;
}

at::Tensor cpu_gemm_add_matmul(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = c.clone(at::MemoryFormat::Contiguous);
  if (cpu_gemm::handles(out)) {
    cpu_gemm::add_matmul_into(out, a, b);
  } else {
    out.addmm_(a, b);
  }
  return out;
}

}  // namespace
}  // namespace elmo_fast

TORCH_LIBRARY_FRAGMENT(elmo_fast, m) {
  m.def("_set_cpu_gemm(str mode) -> ()", &elmo_fast::set_cpu_gemm);
  m.def("_cpu_gemm_measure(bool on) -> ()", &elmo_fast::cpu_gemm_measure);
  m.def("_cpu_gemm_info() -> str", &elmo_fast::cpu_gemm_info);
  m.def("_cpu_gemm_reset() -> ()", &elmo_fast::cpu_gemm_reset);
  m.def("_cpu_gemm_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("_cpu_gemm_add_matmul(Tensor c, Tensor a, Tensor b) -> Tensor");
}

TORCH_LIBRARY_IMPL(elmo_fast, CPU, m) {
  m.impl("_cpu_gemm_linear", &elmo_fast::cpu_gemm_linear);
  m.impl("_cpu_gemm_add_matmul", &elmo_fast::cpu_gemm_add_matmul);
}
