// CPU _lstm_chains op: independent lstm_projection calls (inference: nothing saved for backward) run at
// the same time on thread teams (cpu/thread_teams.h), for ElmoLstm's wavefront (Note [wavefront] in
// elmo_fast/wavefront.py): per stage, each layer and direction on its own chunk of time steps.
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/lstm_pair.h"
#include "cpu/ops_cpu.h"
#include "cpu/thread_teams.h"

namespace elmo_fast {
namespace {

std::tuple<TensorVec, TensorVec, TensorVec> lstm_chains_cpu(at::TensorList x, at::TensorList lengths,
                                                            at::TensorList w_ih, at::TensorList w_hh,
                                                            const OptTensorList& bias, const OptTensorList& w_proj,
                                                            at::TensorList h0, at::TensorList c0,
                                                            const c10::List<bool>& reverse, double cell_clip,
                                                            double proj_clip) {
  const size_t jobs = x.size();
  for (const auto& [size, name] : {std::pair<size_t, const char*>{lengths.size(), "lengths"},
                                   {w_ih.size(), "w_ih"}, {w_hh.size(), "w_hh"}, {bias.size(), "bias"},
                                   {w_proj.size(), "w_proj"}, {h0.size(), "h0"}, {c0.size(), "c0"},
                                   {reverse.size(), "reverse"}}) {
    TORCH_CHECK(size == jobs, "_lstm_chains: ", name, " must hold one entry per chain (", jobs, "), got ", size);
  }
  TensorVec out(jobs), h_n(jobs), c_n(jobs);
  const auto job = [&](int i) {
    std::tie(out[i], h_n[i], c_n[i], std::ignore) =
        lstm_projection_cpu(x[i], lengths[i], w_ih[i], w_hh[i], pair_element(bias, i), pair_element(w_proj, i), h0[i],
                            c0[i], cell_clip, proj_clip, reverse.get(i), /*save_activations=*/false);
  };
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int n = static_cast<int>(jobs);
  // Fewer threads than chains: teams of one, the caller's OpenMP team shares the chains out.
  const std::vector<int> sizes = threads >= n ? cpu_teams::split(threads, n) : std::vector<int>(n, 1);
  if (n < 2 || threads < 2 || !cpu_teams::try_run(sizes, job)) {
    for (int i = 0; i < n; ++i) job(i);
  }
  return {out, h_n, c_n};
}

}  // namespace
}  // namespace elmo_fast

TORCH_LIBRARY_FRAGMENT(elmo_fast, m) {
  // Inference only (no autograd formula): lists of equal length, entry i exactly lstm_projection's
  // arguments with save_activations=False; returns out, h_n, c_n per chain.
  m.def(
      "_lstm_chains(Tensor[] x, Tensor[] lengths, Tensor[] w_ih, Tensor[] w_hh, Tensor?[] bias, Tensor?[] w_proj,"
      " Tensor[] h0, Tensor[] c0, bool[] reverse, float cell_clip, float proj_clip)"
      " -> (Tensor[], Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(elmo_fast, CPU, m) { m.impl("_lstm_chains", &elmo_fast::lstm_chains_cpu); }
