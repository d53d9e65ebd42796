// CPU char-CNN forward (spec §4.2 steps 1-3): embedding gather + all widths' convolutions + max over
// positions + bias + activation -> (N, F), float32, float64 and bfloat16 (bias and activation in float). Only the live windows of each token
// are computed (Note [char-CNN padding shortcut]); they are gathered, block by block of tokens, into
// an im2col buffer (rows, K = w_max * d) and multiplied by the packed (F, K) weight through
// common/linear.h (Note [char-CNN packed weight]); a masked max per filter group follows.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "common/char_cnn_args.h"
#include "common/linear.h"
#include "cpu/char_cnn_cpu.h"
#include "cpu/ops_cpu.h"
#include "elmo_fast/char_cnn_math.h"

namespace elmo_fast {
namespace {

// Tokens per GEMM block: ~32 tokens x ~8 live windows = ~256 rows keeps the (rows, F) product in L2
// while the GEMM still sees a reasonable M. Fixed (not per thread count) so results do not depend
// on the number of threads.
constexpr int64_t kBlockTokens = 32;

// The masked max of one token over its live windows' conv values y (rows, F) and the constant
// window's values (when it exists), then bias and activation. Writes out (F) and win (F): the
// winning window's start t (t = L for the constant window). Y is the GEMM's storage type (bfloat16
// is read as it is and compared in float: no converted copy of the product), T the arithmetic type.
template <typename Y, typename T>
__attribute__((always_inline)) inline void token_max(const Y* y, const T* constant, const T* bias, T* out,
                                                     int16_t* win, const CharCnnGroup* groups, int64_t n_groups,
                                                     int64_t L, int64_t C, int64_t F, bool use_tanh) {
  for (int64_t gi = 0; gi < n_groups; ++gi) {
    const int64_t f0 = groups[gi].f0, f1 = f0 + groups[gi].m, w = groups[gi].w;
    const int64_t live = char_cnn_live_windows(L, C, w);
    if (live > 0) {
      for (int64_t f = f0; f < f1; ++f) {
        out[f] = T(y[f]);
        win[f] = 0;
      }
      for (int64_t t = 1; t < live; ++t) {
        const Y* yt = y + t * F;
        for (int64_t f = f0; f < f1; ++f) {
          const T v = T(yt[f]);
          const bool better = char_cnn_beats(v, out[f]);
          out[f] = better ? v : out[f];
          win[f] = better ? static_cast<int16_t>(t) : win[f];
        }
      }
    }
    if (char_cnn_has_constant_window(L, C, w)) {
      for (int64_t f = f0; f < f1; ++f) {
        const bool better = live == 0 || char_cnn_beats(constant[f], out[f]);
        out[f] = better ? constant[f] : out[f];
        win[f] = better ? static_cast<int16_t>(L) : win[f];
      }
    }
  }
  for (int64_t f = 0; f < F; ++f) out[f] = char_cnn_activate(out[f] + bias[f], use_tanh);
}

// float and bfloat16 products get ISA clones (Note [CPU multiversioning]); double is for tests.
EF_CPU_MULTIVERSION void token_max_any(const float* y, const float* constant, const float* bias, float* out,
                                       int16_t* win, const CharCnnGroup* groups, int64_t n_groups, int64_t L,
                                       int64_t C, int64_t F, bool use_tanh) {
  token_max(y, constant, bias, out, win, groups, n_groups, L, C, F, use_tanh);
}
EF_CPU_MULTIVERSION void token_max_any(const c10::BFloat16* y, const float* constant, const float* bias, float* out,
                                       int16_t* win, const CharCnnGroup* groups, int64_t n_groups, int64_t L,
                                       int64_t C, int64_t F, bool use_tanh) {
  token_max(y, constant, bias, out, win, groups, n_groups, L, C, F, use_tanh);
}
void token_max_any(const double* y, const double* constant, const double* bias, double* out, int16_t* win,
                   const CharCnnGroup* groups, int64_t n_groups, int64_t L, int64_t C, int64_t F, bool use_tanh) {
  token_max(y, constant, bias, out, win, groups, n_groups, L, C, F, use_tanh);
}

// One im2col row: the w_max embedded chars starting at slot t, zeros past the last slot (only
// filters narrower than w_max reach there, and their packed weights are zero).
template <typename T>
void fill_window(T* row, const int64_t* ids, const T* emb, int64_t t, int64_t C, int64_t d, int64_t w_max) {
  for (int64_t k = 0; k < w_max; ++k) {
    if (t + k < C) {
      std::memcpy(row + k * d, emb + ids[t + k] * d, sizeof(T) * d);
    } else {
      std::fill(row + k * d, row + (k + 1) * d, T(0));
    }
  }
}

// Note [char-CNN non-finite chars]: the packed GEMM reads w_max chars for every filter, the extra ones
// against zero weights, which adds nothing unless such a char holds a NaN or inf (x * 0 = NaN) where the
// reference, whose conv reads only the filter's own w chars, gives inf or a finite value. So a token with
// a non-finite char (or a constant window of one) has its conv values recomputed over exactly each
// filter's width before the max. The tensor-core CUDA kernel does the same (char_cnn_tc.cu).

// A filter's conv over exactly its w chars: sum over k < w, c < d of char(k)[c] * packed_row[k * d + c].
template <typename A, typename T, class CharAt>
A exact_conv(const CharAt& char_at, const T* packed_row, int64_t w, int64_t d) {
  A acc = 0;
  for (int64_t k = 0; k < w; ++k) {
    const T* x = char_at(k);
    for (int64_t c = 0; c < d; ++c) acc += A(x[c]) * A(packed_row[k * d + c]);
  }
  return acc;
}

// Rows of the table holding a NaN or inf (all false, and *any false, for a finite table).
template <typename T>
std::vector<char> nonfinite_rows(const T* emb, int64_t V, int64_t d, bool* any) {
  std::vector<char> bad(V, 0);
  *any = false;
  for (int64_t v = 0; v < V; ++v) {
    for (int64_t c = 0; c < d; ++c) bad[v] |= !std::isfinite(static_cast<double>(emb[v * d + c]));
    *any |= bad[v] != 0;
  }
  return bad;
}

// T: storage type; the max, bias and activation run in A = at::opmath_type<T> (float for bfloat16).
template <typename T, typename A = at::opmath_type<T>>
void forward_impl(const CharCnnShape& s, const CharCnnTokens& tok, const at::Tensor& ids_t, const at::Tensor& emb_t,
                  const at::Tensor& packed, const at::Tensor& bias_t, at::Tensor& out_t, at::Tensor& win_t,
                  bool save, bool use_tanh) {
  const int64_t N = s.N, C = s.C, d = s.d, F = s.F, K = s.K;
  const int64_t* ids = ids_t.data_ptr<int64_t>();
  const T* emb = emb_t.data_ptr<T>();
  constexpr bool kSame = std::is_same_v<T, A>;
  const at::Tensor bias_a = bias_t.to(c10::CppTypeToScalarType<A>::value);
  const A* bias = bias_a.data_ptr<A>();
  T* out = out_t.data_ptr<T>();
  int16_t* win = save ? win_t.data_ptr<int16_t>() : nullptr;

  // The constant windows: one GEMM row of w_max copies of embedding[p] per distinct trailing id p.
  const int64_t P = static_cast<int64_t>(tok.distinct.size());
  at::Tensor const_x = at::empty({P, K}, emb_t.options());
  for (int64_t j = 0; j < P; ++j) {
    T* row = const_x.data_ptr<T>() + j * K;
    for (int64_t k = 0; k < s.w_max; ++k) std::memcpy(row + k * d, emb + tok.distinct[j] * d, sizeof(T) * d);
  }
  at::Tensor const_y = at::empty({P, F}, emb_t.options());
  if (P > 0) matmul_nt_into(const_y, const_x, packed);
  const at::Tensor const_a = const_y.to(c10::CppTypeToScalarType<A>::value);
  A* constant = const_a.data_ptr<A>();
  const T* packed_p = packed.data_ptr<T>();
  bool any_nonfinite = false;
  const std::vector<char> nonfinite = nonfinite_rows(emb, s.V, d, &any_nonfinite);
  for (int64_t j = 0; any_nonfinite && j < P; ++j) {  // Note [char-CNN non-finite chars]
    if (!nonfinite[tok.distinct[j]]) continue;
    const T* x = emb + tok.distinct[j] * d;
    for (const CharCnnGroup& g : s.groups) {
      for (int64_t f = g.f0; f < g.f0 + g.m; ++f) {
        constant[j * F + f] = exact_conv<A>([&](int64_t) { return x; }, packed_p + f * K, g.w, d);
      }
    }
  }

  const int64_t n_blocks = (N + kBlockTokens - 1) / kBlockTokens;
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int16_t> scratch_win(save ? 0 : F);
    std::vector<A> scratch_out(kSame ? 0 : F);  // a token's output in A before the store as T
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kBlockTokens, n1 = std::min(N, n0 + kBlockTokens);
      int64_t rows = 0;
      for (int64_t n = n0; n < n1; ++n) rows += char_cnn_live_windows(tok.live[n], C, s.w_min);
      at::Tensor x = at::empty({rows, K}, emb_t.options());
      at::Tensor y = at::empty({rows, F}, emb_t.options());
      T* xp = x.data_ptr<T>();
      int64_t r = 0;
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t live = char_cnn_live_windows(tok.live[n], C, s.w_min);
        for (int64_t t = 0; t < live; ++t, ++r) fill_window(xp + r * K, ids + n * C, emb, t, C, d, s.w_max);
      }
      if (rows > 0) matmul_nt_into(y, x, packed);
      T* yp = y.data_ptr<T>();
      r = 0;
      for (int64_t n = n0; any_nonfinite && n < n1; ++n) {  // Note [char-CNN non-finite chars]
        const int64_t* idn = ids + n * C;
        const int64_t live = char_cnn_live_windows(tok.live[n], C, s.w_min);
        if (std::any_of(idn, idn + C, [&](int64_t id) { return nonfinite[id] != 0; })) {
          for (int64_t t = 0; t < live; ++t) {
            for (const CharCnnGroup& g : s.groups) {
              if (t >= char_cnn_live_windows(tok.live[n], C, g.w)) continue;  // not a window of this width
              for (int64_t f = g.f0; f < g.f0 + g.m; ++f) {
                const auto char_at = [&](int64_t k) { return emb + idn[t + k] * d; };
                yp[(r + t) * F + f] = T(exact_conv<A>(char_at, packed_p + f * K, g.w, d));
              }
            }
          }
        }
        r += live;
      }
      r = 0;
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t L = tok.live[n];
        int16_t* wrow = save ? win + n * F : scratch_win.data();
        A* orow = kSame ? reinterpret_cast<A*>(out + n * F) : scratch_out.data();
        token_max_any(yp + r * F, constant + tok.slot[n] * F, bias, orow, wrow, s.groups.data(),
                      static_cast<int64_t>(s.groups.size()), L, C, F, use_tanh);
        if constexpr (!kSame) {
          for (int64_t f = 0; f < F; ++f) out[n * F + f] = T(orow[f]);
        }
        r += char_cnn_live_windows(L, C, s.w_min);
      }
    }
  });
}

}  // namespace

CharCnnTokens scan_char_cnn_tokens(const at::Tensor& ids_t, int64_t V) {
  const int64_t N = ids_t.size(0), C = ids_t.size(1);
  const int64_t* ids = ids_t.data_ptr<int64_t>();
  CharCnnTokens tok;
  tok.live.resize(N);
  tok.slot.resize(N);
  std::vector<int64_t> slot_of(V, -1);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t* row = ids + n * C;
    for (int64_t c = 0; c < C; ++c) {
      TORCH_CHECK(row[c] >= 0 && row[c] < V, "char_cnn: char_ids must lie in 0..", V - 1,
                  " (the embedding's rows), got ", row[c], " at token ", n, ", slot ", c);
    }
    tok.live[n] = char_cnn_live_length(row, C);
    const int64_t p = row[C - 1];
    if (slot_of[p] < 0) {
      slot_of[p] = static_cast<int64_t>(tok.distinct.size());
      tok.distinct.push_back(p);
    }
    tok.slot[n] = slot_of[p];
  }
  return tok;
}

std::tuple<at::Tensor, at::Tensor> char_cnn_cpu(const at::Tensor& char_ids, const at::Tensor& embedding,
                                                at::TensorList weight, at::TensorList bias,
                                                c10::string_view activation, bool save_activations) {
  const bool use_tanh = char_cnn_use_tanh(activation);
  const CharCnnShape s = check_char_cnn_args(char_ids, embedding, weight);
  check_char_cnn_bias(bias, embedding, s);
  TORCH_CHECK(embedding.scalar_type() == at::kFloat || embedding.scalar_type() == at::kDouble ||
                  embedding.scalar_type() == at::kBFloat16,
              "char_cnn on CPU supports float32, float64 and bfloat16, got ", embedding.scalar_type());
  at::Tensor out, win;  // not a structured binding: C++17 lambdas cannot capture those
  std::tie(out, win) = empty_char_cnn_outputs(s, embedding, save_activations);
  if (s.N == 0 || s.F == 0) return {out, win};
  const at::Tensor ids = char_ids.contiguous();
  const at::Tensor emb = embedding.contiguous();
  const CharCnnTokens tok = scan_char_cnn_tokens(ids, s.V);
  const at::Tensor packed = pack_char_cnn_weight(weight, s, embedding.scalar_type());
  const at::Tensor bias_cat = at::cat(bias, 0).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, embedding.scalar_type(), "char_cnn_cpu", [&] {
    forward_impl<scalar_t>(s, tok, ids, emb, packed, bias_cat, out, win, save_activations, use_tanh);
  });
  return {out, win};
}

}  // namespace elmo_fast
