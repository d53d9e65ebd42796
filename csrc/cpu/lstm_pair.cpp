// CPU lstm_bidirectional op: the two directions of a layer through lstm_projection_cpu, one after the
// other or side by side as measured (cpu/side_by_side.h), plus the private ops that steer and observe
// that choice.
#include <functional>
#include <string>
#include <vector>

#include <torch/library.h>

#include "common/lstm_pair.h"
#include "cpu/ops_cpu.h"
#include "cpu/side_by_side.h"
#include "cpu/thread_teams.h"

namespace elmo_fast {

namespace {

void run_cpu_pair(const std::string& key, double flops, const std::function<void(int)>& job) {
  cpu_pair::run(key, flops, job);
}

void set_cpu_directions(c10::string_view mode) { cpu_pair::set_mode(std::string(mode)); }
std::string cpu_directions_info() { return cpu_pair::info_json(); }
void cpu_directions_reset() { cpu_pair::reset(); }
std::vector<int64_t> cpu_teams_probe(int64_t threads, int64_t jobs) {
  return cpu_teams::probe(static_cast<int>(threads), static_cast<int>(jobs));
}

}  // namespace

std::tuple<TensorVec, TensorVec, TensorVec, TensorVec> lstm_bidirectional_cpu(
    at::TensorList x, const at::Tensor& lengths, at::TensorList w_ih, at::TensorList w_hh, const OptTensorList& bias,
    const OptTensorList& w_proj, at::TensorList h0, at::TensorList c0, double cell_clip, double proj_clip,
    bool save_activations) {
  return lstm_pair_forward(x, lengths, w_ih, w_hh, bias, w_proj, h0, c0, cell_clip, proj_clip, save_activations,
                           lstm_projection_cpu, run_cpu_pair);
}

std::tuple<TensorVec, TensorVec, TensorVec, TensorVec, TensorVec, TensorVec, TensorVec> lstm_bidirectional_backward_cpu(
    at::TensorList grad_out, at::TensorList grad_h_n, at::TensorList grad_c_n, at::TensorList x,
    const at::Tensor& lengths, at::TensorList w_ih, at::TensorList w_hh, const OptTensorList& w_proj,
    at::TensorList h0, at::TensorList c0, at::TensorList out, at::TensorList activations, bool has_bias,
    double cell_clip, double proj_clip) {
  return lstm_pair_backward(grad_out, grad_h_n, grad_c_n, x, lengths, w_ih, w_hh, w_proj, h0, c0, out, activations,
                            has_bias, cell_clip, proj_clip, lstm_projection_backward_cpu, run_cpu_pair);
}

}  // namespace elmo_fast

TORCH_LIBRARY_FRAGMENT(elmo_fast, m) {
  m.def("_set_cpu_directions(str mode) -> ()", &elmo_fast::set_cpu_directions);
  m.def("_cpu_directions_info() -> str", &elmo_fast::cpu_directions_info);
  m.def("_cpu_directions_reset() -> ()", &elmo_fast::cpu_directions_reset);
  m.def("_cpu_teams_probe(int threads, int jobs) -> int[]", &elmo_fast::cpu_teams_probe);
}
