// The row order and packing of the lstm_projection op (Note [LSTM packing]), built once per call on
// the host from `lengths` (a CPU int64 tensor, as torch's pack_padded_sequence takes).
//
// Note [LSTM packing]: rows are sorted by length, longest first (stable), so at step s the rows
// still running are a prefix of A_s sorted rows. The (row, time) pairs actually computed are laid
// out step-major: packed row off_s + k is sorted row k at step s, whose time position is t = s
// forward and t = len - 1 - s in reverse (each row runs backwards within its own length). Then
// every step's gates, outputs and saved state are contiguous row blocks, the step's recurrent
// input is a prefix of the previous step's output block, and padding is never computed.
// The h buffer `Hbuf` (B + total, P) holds the sorted initial states in rows [0, B) and the
// packed outputs from row B on, so "the h before step s" and "the final h" are plain row indices.
#pragma once

#include <algorithm>
#include <numeric>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace elmo_fast {

struct LstmPlan {
  int64_t B = 0, T = 0, total = 0, steps = 0;  // total = sum of lengths; steps = max length
  std::vector<int64_t> active;                 // A_s: rows running at step s (a sorted prefix)
  std::vector<int64_t> offset;                 // off_s: first packed row of step s; offset[steps] = total
  at::Tensor perm;                             // (B,) sorted position -> original row
  at::Tensor pack_index;                       // (total,) packed row -> b * T + t of x / out
  at::Tensor prev_index;                       // (total,) packed row -> Hbuf row of its h before the step
  at::Tensor last_index;                       // (B,) sorted position -> Hbuf row of its final h
};

// On a GPU the indices go up through pinned memory without blocking: a copy from pageable memory
// waits for the whole device (four such waits per direction and layer stalled the host behind the
// previous layer's kernels) and cannot be captured in a CUDA graph. torch's pinned allocator keeps
// the block until the copy has run, and forever when it was made during a capture (graphs replay
// the copy from it).
inline at::Tensor index_tensor(const std::vector<int64_t>& v, const at::Device& device) {
  at::TensorOptions host = at::TensorOptions().dtype(at::kLong);
  if (device.is_cuda()) host = host.pinned_memory(true);
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, host);
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return device.is_cpu() ? t : t.to(device, at::kLong, /*non_blocking=*/true);
}

inline LstmPlan make_lstm_plan(const at::Tensor& lengths, int64_t B, int64_t T, bool reverse,
                               const at::Device& device) {
  TORCH_CHECK(lengths.device().is_cpu(), "lstm_projection: lengths must be a CPU tensor (as for torch's ",
              "pack_padded_sequence), got one on ", lengths.device());
  TORCH_CHECK(lengths.scalar_type() == at::kLong, "lstm_projection: lengths must be int64, got ",
              lengths.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B, "lstm_projection: lengths must have shape (", B,
              ",), got ", lengths.sizes());
  const at::Tensor len_c = lengths.contiguous();
  const int64_t* len = len_c.data_ptr<int64_t>();
  LstmPlan plan;
  plan.B = B;
  plan.T = T;
  std::vector<int64_t> perm(B);
  std::iota(perm.begin(), perm.end(), 0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 0 && len[b] <= T, "lstm_projection: lengths[", b, "] = ", len[b], " is outside [0, ", T,
                "]");
    plan.total += len[b];
  }
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return len[a] > len[b]; });
  plan.steps = B > 0 ? len[perm[0]] : 0;
  plan.active.assign(plan.steps, 0);
  plan.offset.assign(plan.steps + 1, 0);
  for (int64_t s = 0; s < plan.steps; ++s) {
    int64_t a = 0;
    while (a < B && len[perm[a]] > s) ++a;
    plan.active[s] = a;
    plan.offset[s + 1] = plan.offset[s] + a;
  }
  std::vector<int64_t> pack(plan.total), prev(plan.total), last(B);
  for (int64_t s = 0; s < plan.steps; ++s) {
    for (int64_t k = 0; k < plan.active[s]; ++k) {
      const int64_t b = perm[k], row = plan.offset[s] + k;
      pack[row] = b * T + (reverse ? len[b] - 1 - s : s);
      prev[row] = s == 0 ? k : B + plan.offset[s - 1] + k;
    }
  }
  for (int64_t k = 0; k < B; ++k) {
    const int64_t l = len[perm[k]];
    last[k] = l == 0 ? k : B + plan.offset[l - 1] + k;
  }
  plan.perm = index_tensor(perm, device);
  plan.pack_index = index_tensor(pack, device);
  plan.prev_index = index_tensor(prev, device);
  plan.last_index = index_tensor(last, device);
  return plan;
}

}  // namespace elmo_fast
