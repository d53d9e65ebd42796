// The elmo_fast operator library: every schema in one place, the CPU implementations, and the
// Python module `elmo_fast._C` (no pybind11: loading it runs these static registrations).
// CUDA implementations register themselves in csrc/cuda/*_glue.cpp.
#include <Python.h>

#include <mutex>
#include <set>
#include <thread>

#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/ops_cpu.h"

#ifndef ELMO_FAST_TORCH_VERSION
#define ELMO_FAST_TORCH_VERSION "unknown"
#endif
#ifndef ELMO_FAST_CUDA_ARCHS
#define ELMO_FAST_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(elmo_fast, m) {
  // x (N, F); weight[k] (2F, F); bias[k] (2F,). Returns y (N, F) and, when save_activations, the
  // activations backward needs: (k, N, 2F) = per layer [relu(nonlinear) | sigmoid(gate)]; else (0,).
  m.def("highway(Tensor x, Tensor[] weight, Tensor[] bias, bool save_activations) -> (Tensor, Tensor)");
  m.def(
      "highway_backward(Tensor grad_out, Tensor x, Tensor activations, Tensor[] weight)"
      " -> (Tensor, Tensor[], Tensor[])");
  // One layer, one direction of an LSTM with projection over a batch (design.md §3, spec §5):
  // x (B, T, I); lengths (B,) int64 on the CPU (as torch's pack_padded_sequence), each in [0, T];
  // w_ih (4n, I); w_hh (4n, P); bias (4n,); w_proj (P, n) or none (then P = n); h0 (B, P); c0 (B, n);
  // gate blocks [i, f, j, o]; a clip <= 0 means none; reverse runs each row backwards within its
  // length. Returns out (B, T, P) (zero at t >= length), h_n, c_n, and the activations backward
  // needs (flat, see csrc/common/lstm_driver.h) when save_activations, else (0,).
  m.def(
      "lstm_projection(Tensor x, Tensor lengths, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor? w_proj,"
      " Tensor h0, Tensor c0, float cell_clip, float proj_clip, bool reverse, bool save_activations)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  // Grads for x, w_ih, w_hh, bias ((0,) unless has_bias), w_proj ((0,) without it), h0, c0.
  m.def(
      "lstm_projection_backward(Tensor grad_out, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor lengths,"
      " Tensor w_ih, Tensor w_hh, Tensor? w_proj, Tensor h0, Tensor c0, Tensor out, Tensor activations,"
      " bool has_bias, float cell_clip, float proj_clip, bool reverse)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Both directions of one layer in one call, so the CPU can run them side by side (csrc/cpu/side_by_side.cpp):
  // every list holds 2 entries, [0] the forward direction, [1] the reverse one, each exactly
  // lstm_projection's arguments (the two x may differ: ELMo's stacks; or be one tensor: torch.nn.LSTM).
  m.def(
      "lstm_bidirectional(Tensor[] x, Tensor lengths, Tensor[] w_ih, Tensor[] w_hh, Tensor?[] bias,"
      " Tensor?[] w_proj, Tensor[] h0, Tensor[] c0, float cell_clip, float proj_clip, bool save_activations)"
      " -> (Tensor[], Tensor[], Tensor[], Tensor[])");
  m.def(
      "lstm_bidirectional_backward(Tensor[] grad_out, Tensor[] grad_h_n, Tensor[] grad_c_n, Tensor[] x,"
      " Tensor lengths, Tensor[] w_ih, Tensor[] w_hh, Tensor?[] w_proj, Tensor[] h0, Tensor[] c0, Tensor[] out,"
      " Tensor[] activations, bool has_bias, float cell_clip, float proj_clip)"
      " -> (Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], Tensor[])");

  // char_ids (N, C) int64 in 0..V-1; embedding (V, d); weight[i] (m_i, d, w_i) (Conv1d layout), any widths
  // <= C; bias[i] (m_i,); activation "relu" | "tanh" (after the max). Returns out (N, F = sum m_i) and, when
  // save_activations, the winning window start per (token, filter) as int16 (N, F); else an empty (0, 0).
  m.def(
      "char_cnn(Tensor char_ids, Tensor embedding, Tensor[] weight, Tensor[] bias, str activation,"
      " bool save_activations) -> (Tensor, Tensor)");
  m.def(
      "char_cnn_backward(Tensor grad_out, Tensor char_ids, Tensor embedding, Tensor[] weight, Tensor out,"
      " Tensor windows, str activation) -> (Tensor, Tensor[], Tensor[])");
}

namespace {

// How many distinct threads run an at::parallel_for of `iterations` in our code: proof that our
// translation units were built with OpenMP (else ATen's inline parallel_for is a serial loop).
int64_t parallel_for_threads(int64_t iterations) {
  std::mutex mutex;
  std::set<std::thread::id> ids;
  at::parallel_for(0, iterations, 1, [&](int64_t, int64_t) {
    const std::lock_guard<std::mutex> lock(mutex);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(ids.size());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(elmo_fast, m) { m.def("_parallel_for_threads(int iterations) -> int", &parallel_for_threads); }

TORCH_LIBRARY_IMPL(elmo_fast, CPU, m) {
  m.impl("highway", &elmo_fast::highway_cpu);
  m.impl("highway_backward", &elmo_fast::highway_backward_cpu);
  m.impl("lstm_projection", &elmo_fast::lstm_projection_cpu);
  m.impl("lstm_projection_backward", &elmo_fast::lstm_projection_backward_cpu);
  m.impl("lstm_bidirectional", &elmo_fast::lstm_bidirectional_cpu);
  m.impl("lstm_bidirectional_backward", &elmo_fast::lstm_bidirectional_backward_cpu);
  m.impl("char_cnn", &elmo_fast::char_cnn_cpu);
  m.impl("char_cnn_backward", &elmo_fast::char_cnn_backward_cpu);
}

namespace {

int add_str(PyObject* dict, const char* key, const char* value) {
  PyObject* v = PyUnicode_FromString(value);
  if (v == nullptr) return -1;
  const int rc = PyDict_SetItemString(dict, key, v);
  Py_DECREF(v);
  return rc;
}

int add_bool(PyObject* dict, const char* key, bool value) {
  return PyDict_SetItemString(dict, key, value ? Py_True : Py_False);
}

#if defined(_OPENMP) && AT_PARALLEL_OPENMP
constexpr bool kOpenMP = true;  // our own at::parallel_for loops run on torch's OpenMP threads
#else
constexpr bool kOpenMP = false;
#endif

// What this binary was built with; elmo_fast.build_info() adds the package version.
PyObject* build_info(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
#if defined(WITH_CUDA)
  const bool cuda = true;
#else
  const bool cuda = false;
#endif
#if defined(__clang__)
  const char* compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  const char* compiler = "gcc " __VERSION__;
#else
  const char* compiler = "unknown";
#endif
  if (add_str(d, "torch", ELMO_FAST_TORCH_VERSION) || add_bool(d, "cuda", cuda) ||
      add_str(d, "cuda_arch", ELMO_FAST_CUDA_ARCHS) || add_bool(d, "openmp", kOpenMP) ||
      add_str(d, "compiler", compiler) || add_str(d, "cplusplus", std::to_string(__cplusplus).c_str())) {
    Py_DECREF(d);
    return nullptr;
  }
  return d;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What elmo_fast._C was built with."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "elmo_fast's compiled operators", -1, methods};

}  // namespace

extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&module_def); }
