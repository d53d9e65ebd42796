// Which CUDA kernel (or way of running kernels) serves an op family, chosen by the user (environment
// or elmo_fast.set_kernel) and, in "auto", by what has been validated on a real GPU
// (Note [validated kernels]):
//   ELMO_FAST_CHAR_CNN_KERNEL = auto | simt | tensor_core     (family "char_cnn")
//   ELMO_FAST_CUDA_DIRECTIONS = auto | serial | streams       (family "cuda_directions": the two
//       directions of an LSTM layer one after the other on the current stream, or on two streams)
//   ELMO_FAST_CUDA_GRAPHS = auto | off | on                   (family "cuda_graphs": ElmoLstm's
//       inference forward replayed from captured CUDA graphs, elmo_fast/cuda_graphs.py)
//   ELMO_FAST_LSTM_KERNEL = auto | stepwise | persistent      (family "lstm": the lstm_projection
//       forward per step through cuBLAS, or one persistent kernel, Note [persistent LSTM])
// The value is read from the environment at first use; set_mode overrides it. Compiled into every
// build (CPU-only too), so a bad value is the same clear error everywhere.
#pragma once

#include <functional>
#include <string>

namespace elmo_fast::kernels {

enum class Family : int { kCharCnn = 0, kCudaDirections = 1, kCudaGraphs = 2, kLstm = 3 };

// "auto" or one of the family's explicit kernels; throws on an unknown family or value.
std::string mode(Family family);
void set_mode(const std::string& family, const std::string& mode);
Family family_named(const std::string& family);  // throws on an unknown name
// {family: {"env": ..., "mode": ..., "choices": [...], "validated": [...]}} as JSON.
std::string info_json();

// Note [validated kernels]
// A kernel that has never run on a GPU must not become anyone's default: "auto" only picks a fast
// path listed here, and a kernel is listed only after scripts/gpu-verify has passed the CUDA tests
// with it forced (ELMO_FAST_<FAMILY>_KERNEL=<kernel>), recorded under bench/results/ with the
// device, date and commit. Until then the fast path runs only when asked for by name.
bool validated(Family family, const std::string& kernel);

// Whether `kernel` runs: asked for by name, or "auto" and validated.
inline bool chosen(Family family, const std::string& kernel) {
  const std::string m = mode(family);
  return m == kernel || (m == "auto" && validated(family, kernel));
}

// Whether `kernel` serves this call of `op`. When it is not chosen: false, and `obstacle` is not
// called. When it is: `obstacle()` says why it cannot serve the call ("" when it can); then "auto"
// falls back (false) and a kernel asked for by name raises, naming the switch and the reason.
bool take(Family family, const std::string& kernel, const char* op, const std::function<std::string()>& obstacle);

}  // namespace elmo_fast::kernels
