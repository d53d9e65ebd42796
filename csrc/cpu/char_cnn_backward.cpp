// CPU char-CNN backward (spec §6.3): the max sends each (token, filter) gradient to its winning
// window (saved by the forward as its start t), the activation's derivative is taken from the
// output. Deterministic whatever the thread count: every sum runs in a fixed order.
//   grad of the packed weight (F, K): parallel over filters, each summing over tokens in order;
//   grad of the embedded chars (N, C, d): parallel over tokens, each summing over filters in order;
//   grad of the embedding (V, d): one serial pass over (token, slot) in order.
// T is the storage type of the inputs; every gradient is accumulated in A = at::opmath_type<T> (float
// for bfloat16) and converted to T at the end.
#include <algorithm>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "common/char_cnn_args.h"
#include "cpu/char_cnn_cpu.h"
#include "cpu/ops_cpu.h"
#include "elmo_fast/char_cnn_math.h"

namespace elmo_fast {
namespace {

// Filters per task of the weight-gradient pass: their (f, K) rows stay in L1 across all tokens.
constexpr int64_t kGrainFilters = 16;

template <typename A, typename T>
__attribute__((always_inline)) inline void axpy(A* y, const T* x, A a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * A(x[i]);
}

// grad_packed[f, k*d + c] += g[n, f] * emb[ids[n, t+k], c] for filters f0..f1, tokens in order.
template <typename T, typename A = at::opmath_type<T>>
__attribute__((always_inline)) inline void weight_grad_filters(const A* g, const int16_t* win, const int64_t* ids,
                                                               const T* emb, const int64_t* width, A* grad_packed,
                                                               A* grad_bias, int64_t f0, int64_t f1, int64_t N,
                                                               int64_t C, int64_t d, int64_t F, int64_t K) {
  for (int64_t n = 0; n < N; ++n) {
    const A* gn = g + n * F;
    const int16_t* wn = win + n * F;
    const int64_t* idn = ids + n * C;
    for (int64_t f = f0; f < f1; ++f) {
      const A gv = gn[f];
      grad_bias[f] += gv;
      if (gv == A(0)) continue;
      for (int64_t k = 0; k < width[f]; ++k) axpy(grad_packed + f * K + k * d, emb + idn[wn[f] + k] * d, gv, d);
    }
  }
}

// grad_x[n, t*d .. (t+w)*d) += g[n, f] * packed[f, 0 .. w*d) for tokens n0..n1: the window's
// embedded chars are contiguous in a token's (C, d) block, as its filter is in the packed row.
template <typename T, typename A = at::opmath_type<T>>
__attribute__((always_inline)) inline void input_grad_tokens(const A* g, const int16_t* win, const T* packed,
                                                             const int64_t* width, A* grad_x, int64_t n0, int64_t n1,
                                                             int64_t C, int64_t d, int64_t F, int64_t K) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t f = 0; f < F; ++f) {
      const A gv = g[n * F + f];
      if (gv == A(0)) continue;
      axpy(grad_x + (n * C + win[n * F + f]) * d, packed + f * K, gv, width[f] * d);
    }
  }
}

// One overload per (accumulation A, storage T) pair, called from at::parallel_for's lambdas: float
// and bfloat16 storage get ISA clones (Note [CPU multiversioning]); double is for tests.
using bf16 = c10::BFloat16;
#define EF_CHAR_CNN_GRADS(ATTR, A, T)                                                                             \
  ATTR void weight_grad_filters_any(const A* g, const int16_t* win, const int64_t* ids, const T* emb,             \
                                    const int64_t* width, A* gp, A* gb, int64_t f0, int64_t f1, int64_t N,        \
                                    int64_t C, int64_t d, int64_t F, int64_t K) {                                 \
    weight_grad_filters(g, win, ids, emb, width, gp, gb, f0, f1, N, C, d, F, K);                                  \
  }                                                                                                               \
  ATTR void input_grad_tokens_any(const A* g, const int16_t* win, const T* packed, const int64_t* width, A* gx,   \
                                  int64_t n0, int64_t n1, int64_t C, int64_t d, int64_t F, int64_t K) {           \
    input_grad_tokens(g, win, packed, width, gx, n0, n1, C, d, F, K);                                             \
  }
EF_CHAR_CNN_GRADS(EF_CPU_MULTIVERSION, float, float)
EF_CHAR_CNN_GRADS(EF_CPU_MULTIVERSION, float, bf16)
EF_CHAR_CNN_GRADS(, double, double)
#undef EF_CHAR_CNN_GRADS

template <typename T, typename A = at::opmath_type<T>>
void backward_impl(const CharCnnShape& s, const at::Tensor& dy_t, const at::Tensor& out_t, const at::Tensor& win_t,
                   const at::Tensor& ids_t, const at::Tensor& emb_t, const at::Tensor& packed_t, bool use_tanh,
                   at::Tensor& grad_emb_t, at::Tensor& grad_packed_t, at::Tensor& grad_bias_t) {
  const int64_t N = s.N, C = s.C, d = s.d, F = s.F, K = s.K;
  std::vector<int64_t> width(F);
  for (const CharCnnGroup& g : s.groups) std::fill(width.begin() + g.f0, width.begin() + g.f0 + g.m, g.w);
  const int16_t* win = win_t.data_ptr<int16_t>();
  const int64_t* ids = ids_t.data_ptr<int64_t>();
  const T* emb = emb_t.data_ptr<T>();
  const T* packed = packed_t.data_ptr<T>();

  // g = dL/d(max + bias) = grad_out * act'(out).
  const auto acc = emb_t.options().dtype(c10::CppTypeToScalarType<A>::value);
  at::Tensor g_t = at::empty({N, F}, acc);
  A* g = g_t.data_ptr<A>();
  const T* dy = dy_t.data_ptr<T>();
  const T* out = out_t.data_ptr<T>();
  at::parallel_for(0, N * F, 32768, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) g[i] = A(dy[i]) * char_cnn_activation_grad(A(out[i]), use_tanh);
  });

  A* grad_packed = grad_packed_t.data_ptr<A>();
  A* grad_bias = grad_bias_t.data_ptr<A>();
  at::parallel_for(0, F, kGrainFilters, [&](int64_t f0, int64_t f1) {
    weight_grad_filters_any(g, win, ids, emb, width.data(), grad_packed, grad_bias, f0, f1, N, C, d, F, K);
  });

  at::Tensor grad_x_t = at::zeros({N, C, d}, acc);
  A* grad_x = grad_x_t.data_ptr<A>();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    input_grad_tokens_any(g, win, packed, width.data(), grad_x, n0, n1, C, d, F, K);
  });

  A* grad_emb = grad_emb_t.data_ptr<A>();
  for (int64_t i = 0; i < N * C; ++i) axpy(grad_emb + ids[i] * d, grad_x + i * d, A(1), d);
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> char_cnn_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& char_ids, const at::Tensor& embedding, at::TensorList weight,
    const at::Tensor& out, const at::Tensor& windows, c10::string_view activation) {
  const bool use_tanh = char_cnn_use_tanh(activation);
  const CharCnnShape s = check_char_cnn_args(char_ids, embedding, weight);
  TORCH_CHECK(embedding.scalar_type() == at::kFloat || embedding.scalar_type() == at::kDouble ||
                  embedding.scalar_type() == at::kBFloat16,
              "char_cnn_backward on CPU supports float32, float64 and bfloat16, got ", embedding.scalar_type());
  check_shape(grad_out, {s.N, s.F}, "char_cnn_backward: grad_out");
  check_same_device_dtype(grad_out, embedding, "char_cnn_backward: grad_out");
  check_shape(out, {s.N, s.F}, "char_cnn_backward: out");
  check_same_device_dtype(out, embedding, "char_cnn_backward: out");
  TORCH_CHECK(windows.scalar_type() == at::kShort, "char_cnn_backward: windows must be int16");
  TORCH_CHECK(s.N * s.F == 0 || windows.sizes() == out.sizes(),
              "char_cnn_backward: the forward did not save its windows (save_activations=False)");

  // Accumulated in the arithmetic type (float for bfloat16), converted to the storage type below.
  const auto acc = embedding.options().dtype(at::toOpMathType(embedding.scalar_type()));
  at::Tensor grad_emb = at::zeros({s.V, s.d}, acc);
  at::Tensor grad_packed = at::zeros({s.F, s.K}, acc);
  at::Tensor grad_bias = at::zeros({s.F}, acc);
  if (s.N > 0 && s.F > 0) {
    const at::Tensor ids = char_ids.contiguous();
    scan_char_cnn_tokens(ids, s.V);  // the id check: the gathers below trust the ids
    const at::Tensor win = windows.contiguous();
    const int16_t* wp = win.data_ptr<int16_t>();
    for (const CharCnnGroup& g : s.groups) {  // a window must fit in the token: no read out of bounds
      for (int64_t n = 0; n < s.N; ++n) {
        for (int64_t f = g.f0; f < g.f0 + g.m; ++f) {
          TORCH_CHECK(wp[n * s.F + f] >= 0 && wp[n * s.F + f] <= s.C - g.w,
                      "char_cnn_backward: windows holds an impossible window start ", wp[n * s.F + f]);
        }
      }
    }
    const at::Tensor packed = pack_char_cnn_weight(weight, s, embedding.scalar_type());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, embedding.scalar_type(), "char_cnn_backward_cpu", [&] {
      backward_impl<scalar_t>(s, grad_out.contiguous(), out.contiguous(), win, ids, embedding.contiguous(), packed,
                              use_tanh, grad_emb, grad_packed, grad_bias);
    });
  }
  std::vector<at::Tensor> grad_weight = unpack_char_cnn_weight(grad_packed, s, embedding.scalar_type());
  std::vector<at::Tensor> grad_b;
  // clone: the op's outputs must not alias each other.
  for (const CharCnnGroup& g : s.groups) {
    grad_b.push_back(grad_bias.narrow(0, g.f0, g.m).to(embedding.scalar_type()).clone());
  }
  return {grad_emb.to(embedding.scalar_type()), grad_weight, grad_b};
}

}  // namespace elmo_fast
