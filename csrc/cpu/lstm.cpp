// CPU lstm_projection op: the time loops of common/lstm_driver.h with vectorized pointwise passes
// (elmo_fast/lstm_math.h) over the active rows, in parallel over rows (at::parallel_for, so
// torch.set_num_threads governs it). float32, float64 and bfloat16 (bf16 z/h/m storage, float gates,
// cell state and arithmetic).
#include <optional>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "common/lstm_driver.h"
#include "cpu/ops_cpu.h"
#include "elmo_fast/lstm_math.h"

namespace elmo_fast {
namespace {

// Rows per parallel task: enough work (>= ~16k units) to amortise a task's start.
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Rows [r0, r1) of a step. T is the storage type of z and m, A = at::opmath_type<T> the arithmetic
// type of the gates and the cell state (float for bfloat16: load T, compute float, store T).
// gates may alias z (only when T == A) and m may alias nothing else; element u of a row only
// touches index u of each block, so there is no loop-carried dependence.
// z_rec (kRec): the recurrent product, added to z in A (Note [fresh products] in common/lstm_driver.h).
template <typename T, bool kSave, bool kRec, typename A = at::opmath_type<T>>
__attribute__((always_inline)) inline void forward_rows(const T* z, const T* z_rec, A* gates, A* c, A* c_save, T* m,
                                                        int64_t r0, int64_t r1, int64_t n, A cell_clip,
                                                        A out_clip) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* zr = z + r * 4 * n;
    const T* qr = kRec ? z_rec + r * 4 * n : nullptr;
    A* gr = kSave ? gates + r * 4 * n : nullptr;
    A* cr = c + r * n;
    A* sr = kSave ? c_save + r * n : nullptr;
    T* mr = m + r * n;
#pragma GCC ivdep
    for (int64_t u = 0; u < n; ++u) {
      A gi, gf, gj, go, cu = cr[u];
      A zi = A(zr[u]), zf = A(zr[n + u]), zj = A(zr[2 * n + u]), zo = A(zr[3 * n + u]);
      if (kRec) {
        zi += A(qr[u]);
        zf += A(qr[n + u]);
        zj += A(qr[2 * n + u]);
        zo += A(qr[3 * n + u]);
      }
      mr[u] = T(lstm_point_forward(zi, zf, zj, zo, &cu, cell_clip, out_clip, &gi, &gf, &gj, &go));
      cr[u] = cu;
      if (kSave) {
        gr[u] = gi;
        gr[n + u] = gf;
        gr[2 * n + u] = gj;
        gr[3 * n + u] = go;
        sr[u] = cu;
      }
    }
  }
}

template <typename T, typename A>
__attribute__((always_inline)) inline void forward_rows_any(const T* z, const T* z_rec, A* gates, A* c, A* c_save,
                                                            T* m, int64_t r0, int64_t r1, int64_t n, A cell_clip,
                                                            A out_clip) {
  if (gates != nullptr) {
    if (z_rec != nullptr) {
      forward_rows<T, true, true>(z, z_rec, gates, c, c_save, m, r0, r1, n, cell_clip, out_clip);
    } else {
      forward_rows<T, true, false>(z, z_rec, gates, c, c_save, m, r0, r1, n, cell_clip, out_clip);
    }
  } else if (z_rec != nullptr) {
    forward_rows<T, false, true>(z, z_rec, gates, c, c_save, m, r0, r1, n, cell_clip, out_clip);
  } else {
    forward_rows<T, false, false>(z, z_rec, gates, c, c_save, m, r0, r1, n, cell_clip, out_clip);
  }
}

// dz may alias gates and m may alias c (same element only, and only when T == A). dm, dz, m are
// storage type T; gates, c, c_prev, dc arithmetic type A.
template <typename T, bool kHasM, typename A = at::opmath_type<T>>
__attribute__((always_inline)) inline void backward_rows(const T* dm, const A* gates, const A* c, const A* c_prev,
                                                         A* dc, T* dz, T* m, int64_t r0, int64_t r1, int64_t n,
                                                         A cell_clip) {
  for (int64_t r = r0; r < r1; ++r) {
    const A* g = gates + r * 4 * n;
    const T* dmr = dm + r * n;
    const A* cr = c + r * n;
    const A* pr = c_prev + r * n;
    A* dcr = dc + r * n;
    T* dzr = dz + r * 4 * n;
    T* mr = kHasM ? m + r * n : nullptr;
#pragma GCC ivdep
    for (int64_t u = 0; u < n; ++u) {
      A dzi, dzf, dzj, dzo, dcu = dcr[u];
      const A mu = lstm_point_backward(A(dmr[u]), &dcu, g[u], g[n + u], g[2 * n + u], g[3 * n + u], cr[u], pr[u],
                                       cell_clip, &dzi, &dzf, &dzj, &dzo);
      dcr[u] = dcu;
      dzr[u] = T(dzi);
      dzr[n + u] = T(dzf);
      dzr[2 * n + u] = T(dzj);
      dzr[3 * n + u] = T(dzo);
      if (kHasM) mr[u] = T(mu);
    }
  }
}

template <typename T, typename A>
__attribute__((always_inline)) inline void backward_rows_any_m(const T* dm, const A* gates, const A* c,
                                                               const A* c_prev, A* dc, T* dz, T* m, int64_t r0,
                                                               int64_t r1, int64_t n, A cell_clip) {
  if (m != nullptr) {
    backward_rows<T, true>(dm, gates, c, c_prev, dc, dz, m, r0, r1, n, cell_clip);
  } else {
    backward_rows<T, false>(dm, gates, c, c_prev, dc, dz, m, r0, r1, n, cell_clip);
  }
}

// One overload per storage type T (A: its accumulation type), called from at::parallel_for's lambdas:
// float and bfloat16 get ISA clones (Note [CPU multiversioning]); double is for tests and stays generic.
using bf16 = c10::BFloat16;
#define EF_LSTM_ROWS(ATTR, T, A)                                                                                  \
  ATTR void forward_rows_dispatch(const T* z, const T* z_rec, A* gates, A* c, A* c_save, T* m, int64_t r0,        \
                                  int64_t r1, int64_t n, A cell_clip, A out_clip) {                               \
    forward_rows_any(z, z_rec, gates, c, c_save, m, r0, r1, n, cell_clip, out_clip);                              \
  }                                                                                                               \
  ATTR void backward_rows_dispatch(const T* dm, const A* gates, const A* c, const A* c_prev, A* dc, T* dz, T* m,  \
                                   int64_t r0, int64_t r1, int64_t n, A cell_clip) {                              \
    backward_rows_any_m(dm, gates, c, c_prev, dc, dz, m, r0, r1, n, cell_clip);                                   \
  }
EF_LSTM_ROWS(EF_CPU_MULTIVERSION, float, float)
EF_LSTM_ROWS(EF_CPU_MULTIVERSION, bf16, float)
EF_LSTM_ROWS(, double, double)
#undef EF_LSTM_ROWS

struct CpuLstmPointwise {
  static constexpr bool kSumsRecurrent = true;  // Note [fresh products] in common/lstm_driver.h

  int64_t input_chunk_rows(int64_t n, int64_t elem_bytes) const { return lstm_fresh_chunk_rows(n, elem_bytes); }
  bool run_steps(const LstmSteps& /*steps*/) const { return false; }  // the driver steps

  void forward(const at::Tensor& z, const at::Tensor& z_rec, const at::Tensor& gates, const at::Tensor& c,
               const at::Tensor& c_save, const at::Tensor& m, double cell_clip, double out_clip) const {
    const int64_t rows = c.size(0), n = c.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "lstm_projection_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* zp = z.data_ptr<scalar_t>();
      const scalar_t* qp = ptr_or_null<scalar_t>(z_rec);
      acc_t *gp = ptr_or_null<acc_t>(gates), *cp = c.data_ptr<acc_t>(), *sp = ptr_or_null<acc_t>(c_save);
      scalar_t* mp = m.data_ptr<scalar_t>();
      at::parallel_for(0, rows, grain_rows(n), [&](int64_t r0, int64_t r1) {
        forward_rows_dispatch(zp, qp, gp, cp, sp, mp, r0, r1, n, static_cast<acc_t>(cell_clip),
                              static_cast<acc_t>(out_clip));
      });
    });
  }

  void clip(const at::Tensor& h, double limit) const {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "lstm_projection_clip_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* hp = h.data_ptr<scalar_t>();
      const acc_t lim = static_cast<acc_t>(limit);
      at::parallel_for(0, h.numel(), 65536, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) hp[i] = static_cast<scalar_t>(ef_clip(static_cast<acc_t>(hp[i]), lim));
      });
    });
  }

  void proj_backward(const at::Tensor& dh_future, const at::Tensor& d, const at::Tensor& h, double proj_clip) const {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "lstm_projection_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t *fp = dh_future.data_ptr<scalar_t>(), *hp = h.data_ptr<scalar_t>();
      scalar_t* dp = d.data_ptr<scalar_t>();
      const acc_t lim = static_cast<acc_t>(proj_clip);
      at::parallel_for(0, h.numel(), 65536, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          dp[i] = static_cast<scalar_t>(lstm_proj_backward(static_cast<acc_t>(fp[i]), static_cast<acc_t>(dp[i]),
                                                           static_cast<acc_t>(hp[i]), lim));
        }
      });
    });
  }

  void backward(const at::Tensor& dm, const at::Tensor& gates, const at::Tensor& c, const at::Tensor& c_prev,
                const at::Tensor& dc, const at::Tensor& dz, const at::Tensor& m, double cell_clip) const {
    const int64_t rows = c.size(0), n = c.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dm.scalar_type(), "lstm_projection_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* dmp = dm.data_ptr<scalar_t>();
      const acc_t *gp = gates.data_ptr<acc_t>(), *cp = c.data_ptr<acc_t>(), *pp = c_prev.data_ptr<acc_t>();
      acc_t* dcp = dc.data_ptr<acc_t>();
      scalar_t *dzp = dz.data_ptr<scalar_t>(), *mp = ptr_or_null<scalar_t>(m);
      at::parallel_for(0, rows, grain_rows(n), [&](int64_t r0, int64_t r1) {
        backward_rows_dispatch(dmp, gp, cp, pp, dcp, dzp, mp, r0, r1, n, static_cast<acc_t>(cell_clip));
      });
    });
  }
};

void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16,
              "lstm_projection on CPU supports float32, float64 and bfloat16, got ", x.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_projection_cpu(
    const at::Tensor& x, const at::Tensor& lengths, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_proj, const at::Tensor& h0,
    const at::Tensor& c0, double cell_clip, double proj_clip, bool reverse, bool save_activations) {
  check_cpu_dtype(x);
  return lstm_forward_driver(x, lengths, w_ih, w_hh, bias, w_proj, h0, c0, cell_clip, proj_clip, reverse,
                             save_activations, CpuLstmPointwise{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_projection_backward_cpu(const at::Tensor& grad_out, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                             const at::Tensor& x, const at::Tensor& lengths, const at::Tensor& w_ih,
                             const at::Tensor& w_hh, const std::optional<at::Tensor>& w_proj, const at::Tensor& h0,
                             const at::Tensor& c0, const at::Tensor& out, const at::Tensor& activations,
                             bool has_bias, double cell_clip, double proj_clip, bool reverse) {
  check_cpu_dtype(x);
  return lstm_backward_driver(grad_out, grad_h_n, grad_c_n, x, lengths, w_ih, w_hh, w_proj, h0, c0, out, activations,
                              has_bias, cell_clip, proj_clip, reverse, CpuLstmPointwise{});
}

}  // namespace elmo_fast
