// CPU highway op: GEMMs through common/linear.h, one fused pointwise pass per layer over rows in
// parallel (at::parallel_for, so torch.set_num_threads governs it). float32, float64 and bfloat16
// (loads bf16, computes in float, stores bf16; GEMMs accumulate in float inside the GEMM layer).
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "common/highway_driver.h"
#include "cpu/ops_cpu.h"
#include "elmo_fast/highway_math.h"

namespace elmo_fast {
namespace {

// Rows per parallel task: enough work (>= ~32k elements) to amortise a task's start.
int64_t grain_rows(int64_t F) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(F, 1)); }

// T is the storage type, A = at::opmath_type<T> the arithmetic type (float for bfloat16).
// kSave a template argument, not a runtime flag: a conditional store keeps the AVX2 clone scalar.
template <bool kSave, typename T, typename A = at::opmath_type<T>>
__attribute__((always_inline)) inline void forward_rows(T* proj, const T* x, T* y, int64_t r0, int64_t r1,
                                                        int64_t F) {
  for (int64_t r = r0; r < r1; ++r) {
    T* p = proj + r * 2 * F;
    const T* xr = x + r * F;
    T* yr = y + r * F;
    // y may alias x, but only element f reads x[f] and writes y[f]: no loop-carried dependence.
#pragma GCC ivdep
    for (int64_t f = 0; f < F; ++f) {
      A h, g;
      yr[f] = T(highway_point_forward(A(p[f]), A(p[F + f]), A(xr[f]), &h, &g));
      if (kSave) {
        p[f] = T(h);
        p[F + f] = T(g);
      }
    }
  }
}

template <typename T, typename A = at::opmath_type<T>>
__attribute__((always_inline)) inline void mix_rows(const T* act, const T* x, T* y, int64_t r0, int64_t r1,
                                                    int64_t F) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* a = act + r * 2 * F;
    const T* xr = x + r * F;
    T* yr = y + r * F;
#pragma GCC ivdep
    for (int64_t f = 0; f < F; ++f) yr[f] = T(highway_mix(A(xr[f]), A(a[f]), A(a[F + f])));
  }
}

template <typename T, typename A = at::opmath_type<T>>
__attribute__((always_inline)) inline void backward_rows(const T* dy, const T* x, const T* act, T* d_proj, T* dx,
                                                         int64_t r0, int64_t r1, int64_t F) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* a = act + r * 2 * F;
    const T* dyr = dy + r * F;
    const T* xr = x + r * F;
    T* dp = d_proj + r * 2 * F;
    T* dxr = dx + r * F;
    // dx may alias dy element-wise (same index only).
#pragma GCC ivdep
    for (int64_t f = 0; f < F; ++f) {
      A dn, dg, dd;
      highway_point_backward(A(dyr[f]), A(xr[f]), A(a[f]), A(a[F + f]), &dn, &dg, &dd);
      dp[f] = T(dn);
      dp[F + f] = T(dg);
      dxr[f] = T(dd);
    }
  }
}

// One overload per storage type, called from at::parallel_for's lambda: float and bfloat16 get ISA
// clones (Note [CPU multiversioning]); double is for tests and stays generic.
using bf16 = c10::BFloat16;
#define EF_HIGHWAY_ROWS(ATTR, T)                                                                                  \
  ATTR void forward_rows_any(T* p, const T* x, T* y, int64_t r0, int64_t r1, int64_t F, bool save) {             \
    save ? forward_rows<true>(p, x, y, r0, r1, F) : forward_rows<false>(p, x, y, r0, r1, F);                     \
  }                                                                                                               \
  ATTR void mix_rows_any(const T* a, const T* x, T* y, int64_t r0, int64_t r1, int64_t F) {                      \
    mix_rows(a, x, y, r0, r1, F);                                                                                 \
  }                                                                                                               \
  ATTR void backward_rows_any(const T* dy, const T* x, const T* a, T* dp, T* dx, int64_t r0, int64_t r1,         \
                              int64_t F) {                                                                        \
    backward_rows(dy, x, a, dp, dx, r0, r1, F);                                                                   \
  }
EF_HIGHWAY_ROWS(EF_CPU_MULTIVERSION, float)
EF_HIGHWAY_ROWS(EF_CPU_MULTIVERSION, bf16)
EF_HIGHWAY_ROWS(, double)
#undef EF_HIGHWAY_ROWS

struct CpuHighwayPointwise {
  void forward(at::Tensor& proj, const at::Tensor& x, at::Tensor& y, bool save) const {
    const int64_t N = x.size(0), F = x.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "highway_cpu", [&] {
      scalar_t* p = proj.data_ptr<scalar_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* yp = y.data_ptr<scalar_t>();
      at::parallel_for(0, N, grain_rows(F),
                       [&](int64_t r0, int64_t r1) { forward_rows_any(p, xp, yp, r0, r1, F, save); });
    });
  }
  void mix(const at::Tensor& act, const at::Tensor& x, at::Tensor& y) const {
    const int64_t N = x.size(0), F = x.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "highway_mix_cpu", [&] {
      const scalar_t* a = act.data_ptr<scalar_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* yp = y.data_ptr<scalar_t>();
      at::parallel_for(0, N, grain_rows(F), [&](int64_t r0, int64_t r1) { mix_rows_any(a, xp, yp, r0, r1, F); });
    });
  }
  void backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& act, at::Tensor& d_proj,
                at::Tensor& dx) const {
    const int64_t N = x.size(0), F = x.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "highway_backward_cpu", [&] {
      const scalar_t* dyp = dy.data_ptr<scalar_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* a = act.data_ptr<scalar_t>();
      scalar_t* dp = d_proj.data_ptr<scalar_t>();
      scalar_t* dxp = dx.data_ptr<scalar_t>();
      at::parallel_for(0, N, grain_rows(F),
                       [&](int64_t r0, int64_t r1) { backward_rows_any(dyp, xp, a, dp, dxp, r0, r1, F); });
    });
  }
};

void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16,
              "highway on CPU supports float32, float64 and bfloat16, got ", x.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> highway_cpu(const at::Tensor& x, at::TensorList weight, at::TensorList bias,
                                               bool save_activations) {
  check_cpu_dtype(x);
  return highway_forward_driver(x, weight, bias, save_activations, CpuHighwayPointwise{});
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> highway_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& activations, at::TensorList weight) {
  check_cpu_dtype(x);
  return highway_backward_driver(grad_out, x, activations, weight, CpuHighwayPointwise{});
}

}  // namespace elmo_fast
