// Layout of the tensor-core char-CNN forward (csrc/cuda/char_cnn_tc.cu), host-side and torch-free
// so that every build can check it (torch.ops.elmo_fast._char_cnn_tc_layout, tests/test_char_cnn_tc.py).
//
// Note [char-CNN on tensor cores]
// A window of a token starting at t is w_max embedded chars, contiguous in the token's (C, d) row
// block. Staged in shared memory with each char padded to dp = roundup(d, 8) channels, the windows
// t0 .. t0+15 of one token form a 16 x Kp WMMA A-matrix with leading dimension dp (rows overlap:
// row t is the block shifted by t chars), and the packed weight, padded to (Kp, Fp), is the
// B-matrix: every width's conv of 16 windows x 16 filters is Kp/16 tensor-core MMAs, with no im2col.
// The constant window (Note [char-CNN padding shortcut]) needs no special case: when L <= C - w it
// is the window at t = L, a valid window, so the max of a width-w filter runs over rows
// 0 .. min(L, C - w): the live windows plus the constant one, recorded at t = L as on the CPU. The
// CPU computes it once per call; here it is one more row of a 16-row tile, which costs the same
// however many of its rows are used (an extra tile only when L + 1 crosses a multiple of 16).
// Char slots past C are staged as zeros: only masked rows, or zero weights, read them.
// A filter narrower than w_max meets its tile's extra chars with zero weights, which adds nothing unless
// such a char holds a NaN or inf (x * 0 = NaN): a token with a non-finite staged value has its windows
// recomputed over exactly each filter's width (window_dot), as the SIMT kernel and the reference do.
// Reads stay inside the token's slot: rows go up to roundup(C - w_min + 1, 16) - 1, each reading
// Kp/dp chars, so a slot holds roundup(C - w_min + 1, 16) + ceil(Kp / dp) chars (rounded up to
// even, which keeps every tile 32-byte aligned as WMMA requires).
#pragma once

#include <cstddef>
#include <cstdint>

namespace elmo_fast {

constexpr int kCharCnnTcTokens = 16;      // tokens staged per block
constexpr int kCharCnnTcWarps = 8;        // one 16-filter tile at a time per warp
constexpr int kCharCnnTcTilesPerWarp = 2;
constexpr int kCharCnnTcMaxKSteps = 8;    // B fragments kept in registers: Kp <= 128
constexpr size_t kCharCnnTcMaxShared = 47 * 1024;  // dynamic; with the static part under 48 KiB: no opt-in

struct CharCnnTcLayout {
  int64_t dp = 0;      // padded channels per char
  int64_t Kp = 0;      // padded window length (multiple of 16)
  int64_t Fp = 0;      // padded filter count (multiple of 16)
  int64_t ksteps = 0;  // Kp / 16
  int64_t slot = 0;    // chars staged per token
  size_t shared_bytes = 0;
  int64_t grid_y = 0;  // filter-tile groups: blocks along the filters
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// elem_bytes: 2 (half, bfloat16). F >= 1, 1 <= w_min <= w_max <= C.
inline CharCnnTcLayout char_cnn_tc_layout(int64_t C, int64_t d, int64_t w_min, int64_t w_max, int64_t F,
                                          int64_t elem_bytes = 2) {
  CharCnnTcLayout l;
  l.dp = round_up(d, 8);
  l.Kp = round_up(w_max * l.dp, 16);
  l.Fp = round_up(F, 16);
  l.ksteps = l.Kp / 16;
  l.slot = round_up(round_up(C - w_min + 1, 16) + (l.Kp + l.dp - 1) / l.dp, 2);
  l.shared_bytes = size_t(kCharCnnTcTokens) * l.slot * l.dp * elem_bytes +
                   size_t(kCharCnnTcWarps) * 16 * 16 * sizeof(float);
  const int64_t tiles_per_block = int64_t(kCharCnnTcWarps) * kCharCnnTcTilesPerWarp;
  l.grid_y = (l.Fp / 16 + tiles_per_block - 1) / tiles_per_block;
  return l;
}

// Whether the tensor-core kernel can run this shape (else the SIMT kernel serves it).
inline bool char_cnn_tc_fits(const CharCnnTcLayout& l) {
  return l.ksteps <= kCharCnnTcMaxKSteps && l.shared_bytes <= kCharCnnTcMaxShared && l.grid_y <= 65535;
}

}  // namespace elmo_fast
