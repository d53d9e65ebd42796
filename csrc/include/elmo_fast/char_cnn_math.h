// The char-CNN's per-token scalar rules (spec §4.2 steps 1-3), shared by csrc/cpu/char_cnn*.cpp and
// csrc/cuda/char_cnn.cu: the token's live length (Note [char-CNN padding shortcut]), the window
// counts, and the activation applied after the max with its derivative.
#pragma once

#include <cmath>
#include <cstdint>

#include "elmo_fast/hd.h"

namespace elmo_fast {

// Note [char-CNN padding shortcut]: let p = ids[C-1] (the token's trailing id: 261 = pad char in a
// real token, 0 in a whole padding token) and L = 1 + the last index whose id != p (L = 0 when all
// C ids equal p). A window of width w starting at t lies entirely in the trailing run of p iff
// t >= L, and all such windows hold w copies of embedding[p]: their conv value depends only on
// (p, filter), so it is computed once per call per distinct p. Per token only the "live" windows
// t < min(L, C - w + 1) are computed; the constant window takes part in the max iff L <= C - w.
// When the constant window wins, its position is recorded as t = L (the first such window): every
// window of the trailing run has the same content, so the gradient is the same wherever it goes.
// `key` maps a stored id to the id it stands for (the CUDA kernels clamp; the CPU, which has checked
// the ids, takes them as they are).
template <typename Id, typename Key>
EF_HD int64_t char_cnn_live_length(const Id* ids, int64_t C, const Key& key) {
  const auto p = key(ids[C - 1]);
  int64_t L = C;
  while (L > 0 && key(ids[L - 1]) == p) --L;  // stops just after the last slot != p, or at 0
  return L;
}

struct CharIdAsIs {
  template <typename Id>
  EF_HD Id operator()(Id id) const { return id; }
};

template <typename Id>
EF_HD int64_t char_cnn_live_length(const Id* ids, int64_t C) {
  return char_cnn_live_length(ids, C, CharIdAsIs{});
}

// An id clamped into the table's rows 0..V-1: no kernel reads out of bounds on a corrupt input
// (functional.py reports out-of-range ids first).
EF_HD int64_t char_cnn_clamp_id(int64_t id, int64_t V) { return id < 0 ? 0 : (id >= V ? V - 1 : id); }

struct CharIdClamped {
  int64_t V;
  EF_HD int64_t operator()(int64_t id) const { return char_cnn_clamp_id(id, V); }
};

// Number of live windows of width w (those starting before L), never more than the C - w + 1 valid.
EF_HD int64_t char_cnn_live_windows(int64_t L, int64_t C, int64_t w) {
  const int64_t valid = C - w + 1;
  return L < valid ? L : valid;
}

// Whether the constant (all-trailing-id) window of width w exists for a token of live length L.
EF_HD bool char_cnn_has_constant_window(int64_t L, int64_t C, int64_t w) { return L <= C - w; }

EF_HD float char_cnn_tanh(float x) { return tanhf(x); }
EF_HD double char_cnn_tanh(double x) { return tanh(x); }

// Whether window value v replaces the running max m of earlier windows, as torch.max decides: a larger
// value, or the first NaN (NaN propagates). Strict, so that the first maximal window wins.
template <typename T>
EF_HD bool char_cnn_beats(T v, T m) {
  return v > m || (v != v && m == m);
}

// Whether candidate (v, tv) replaces (m, tm) when two partial maxima over disjoint windows merge.
template <typename T>
EF_HD bool char_cnn_beats_merge(T v, int tv, T m, int tm) {
  const bool same = v == m || (v != v && m != m);
  return char_cnn_beats(v, m) || (same && tv < tm);
}

// act(v), act = relu (use_tanh false) or tanh; applied after the max (spec §4.2 step 2). relu keeps a
// NaN, as torch.relu does.
template <typename T>
EF_HD T char_cnn_activate(T v, bool use_tanh) {
  return use_tanh ? char_cnn_tanh(v) : (v < T(0) ? T(0) : v);
}

// d act / d v expressed through y = act(v): relu'(v) = (y > 0) (relu'(0) = 0, as torch), tanh' = 1 - y^2.
template <typename T>
EF_HD T char_cnn_activation_grad(T y, bool use_tanh) {
  return use_tanh ? T(1) - y * y : (y > T(0) ? T(1) : T(0));
}

}  // namespace elmo_fast
