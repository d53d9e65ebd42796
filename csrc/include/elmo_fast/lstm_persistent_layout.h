// Layout of the persistent LSTM forward (csrc/cuda/lstm_persistent.cu), host-side and torch-free so
// that every build checks it (torch.ops.elmo_fast._lstm_persistent_layout, tests/test_lstm_persistent.py).
//
// Note [persistent LSTM]
// The stepwise CUDA path re-reads the recurrent weight (4n x P) and the projection (P x n) from L2 or
// memory at every step and pays ~4 launches per step. The persistent kernel is one cooperative launch
// for a run of steps whose blocks (at most one per multiprocessor, all resident) keep their slices of
// both weights in shared memory for the whole run, and step together through grid-wide barriers:
//   phase 1 (gates): block j owns cells [j u, (j+1) u): the 4u rows {g n + cell} of W_hh. It stages
//     h_prev (32 batch rows at a time) and runs h_prev . W_slice^T on tensor cores (WMMA 16x16x16,
//     one 16-column tile per warp), adds the hoisted input pre-activations, and runs the shared
//     pointwise step (lstm_math.h) into the float cell state, m (or, with no projection, h), and the
//     saved gates and c when training.                                                 -> grid barrier
//   phase 2 (projection, split over n): block (p, q) holds W_proj[q-th group of `cols` outputs,
//     p-th group of `group_units` cells] and writes the partial sums m[:, cells_p] . W_proj[..]^T of
//     its tile to a float buffer (a_eff, rows, P cols).                                -> grid barrier
//   phase 3: every thread sums the a_eff partials of some outputs in a fixed order (deterministic),
//     clips and writes h into its packed row.                                          -> grid barrier
// The 2-D split of phase 2 keeps the traffic small both ways: each block reads m for group_units
// cells (not all n), and the partials are a_eff (not n / u) copies of the (A, P) output.
// Only float16 and bfloat16 (the tensor-core types); shapes that do not fit (n > 32 x SMs, or
// slices larger than a block's shared memory) take the stepwise path.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace elmo_fast {

constexpr int kLstmPtWarps = 8;
constexpr int kLstmPtThreads = kLstmPtWarps * 32;
constexpr int kLstmPtRows = 32;      // batch rows per pass: two 16-row tiles
constexpr int kLstmPtMaxUnits = 32;  // cells per block: 4u / 16 <= 8 column tiles, one per warp
constexpr int kLstmPtCols = 64;      // projection outputs per block in phase 2 (fewer when P is small)

struct LstmPersistentLayout {
  int64_t units = 0;        // u: cells per block in phase 1, a multiple of 4
  int64_t blocks = 0;       // grid: ceil(n / u), one per multiprocessor at most
  int64_t Pp = 0;           // P padded to 16: the gate GEMM's K
  int64_t ldw = 0;          // row stride (elements) of the W_hh slice and of staged h: Pp + 8
  int64_t lds = 0;          // row stride (floats) of the gate scratch: 4u + 4
  // Phase 2 (zero without a projection):
  int64_t col_groups = 0;   // b: groups of `cols` projection outputs
  int64_t cols = 0;         // outputs per block, a multiple of 16
  int64_t unit_groups = 0;  // a_eff: groups of `group_units` cells (blocks p < a_eff, q < b work)
  int64_t group_units = 0;  // cells per group, a multiple of 16
  int64_t ldm = 0;          // row stride (elements) of the W_proj slice and of staged m: group_units + 8
  int64_t Pcols = 0;        // b * cols: row stride of the partial sums
  // Shared memory (bytes), each region a multiple of 128: [W_hh slice | W_proj slice | stage], the
  // stage holding staged h, then the gate scratch (floats), then staged m, one after the other.
  size_t w_hh_bytes = 0, w_proj_bytes = 0, stage_bytes = 0, shared_bytes = 0;
};

inline int64_t lstm_pt_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t lstm_pt_round_up(int64_t a, int64_t m) { return lstm_pt_ceil_div(a, m) * m; }

// n cells, P inputs of the recurrent GEMM (the projection size, or n without one), elem_bytes of
// the storage type (2), sms: multiprocessors of the device. n, P >= 1.
inline LstmPersistentLayout lstm_persistent_layout(int64_t n, int64_t P, bool has_proj, int64_t elem_bytes,
                                                   int64_t sms) {
  LstmPersistentLayout l;
  l.units = std::max<int64_t>(4, lstm_pt_round_up(lstm_pt_ceil_div(n, std::max<int64_t>(sms, 1)), 4));
  l.blocks = lstm_pt_ceil_div(n, l.units);
  l.Pp = lstm_pt_round_up(P, 16);
  l.ldw = l.Pp + 8;  // 16 bytes of skew per row: WMMA's row loads spread over the banks
  l.lds = 4 * l.units + 4;
  l.w_hh_bytes = size_t(lstm_pt_round_up(4 * l.units * l.ldw * elem_bytes, 128));
  size_t stage = std::max<size_t>(size_t(kLstmPtRows) * l.ldw * elem_bytes, size_t(kLstmPtRows) * l.lds * 4);
  if (has_proj) {
    l.cols = std::min<int64_t>(kLstmPtCols, l.Pp);
    l.col_groups = lstm_pt_ceil_div(P, l.cols);
    if (l.col_groups > l.blocks) {  // small n, wide P: wider column groups so that every group has a block
      l.cols = lstm_pt_round_up(lstm_pt_ceil_div(P, l.blocks), 16);
      l.col_groups = lstm_pt_ceil_div(P, l.cols);
    }
    const int64_t a = std::max<int64_t>(1, l.blocks / l.col_groups);
    l.group_units = lstm_pt_round_up(lstm_pt_ceil_div(n, a), 16);
    l.unit_groups = lstm_pt_ceil_div(n, l.group_units);
    l.ldm = l.group_units + 8;
    l.Pcols = l.col_groups * l.cols;
    l.w_proj_bytes = size_t(lstm_pt_round_up(l.cols * l.ldm * elem_bytes, 128));
    stage = std::max<size_t>(stage, size_t(kLstmPtRows) * l.ldm * elem_bytes);
  }
  l.stage_bytes = size_t(lstm_pt_round_up(int64_t(stage), 128));
  l.shared_bytes = l.w_hh_bytes + l.w_proj_bytes + l.stage_bytes;
  return l;
}

// Whether the layout can run on a device with `sms` multiprocessors, `max_shared` bytes of opt-in
// shared memory per block and room for `resident` co-resident blocks (the cooperative launch's
// limit, from the occupancy calculator).
inline bool lstm_persistent_fits(const LstmPersistentLayout& l, int64_t sms, size_t max_shared, int64_t resident) {
  return l.units <= kLstmPtMaxUnits && l.blocks >= 1 && l.blocks <= sms && l.blocks <= resident &&
         l.shared_bytes <= max_shared &&
         (l.col_groups == 0 || l.unit_groups * l.col_groups <= l.blocks);
}

}  // namespace elmo_fast
