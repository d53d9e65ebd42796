// The lstm_projection op's time loops, shared by the CPU and CUDA implementations: GEMMs through
// linear.h, row bookkeeping through lstm_plan.h (Note [LSTM packing]), the per-element work through
// a device backend `Pointwise` (all tensors are row blocks of contiguous buffers; "acc" tensors have
// the arithmetic dtype: float for half/bfloat16 storage, else the storage dtype):
//   kSumsRecurrent (static constexpr bool): the backend takes the recurrent product apart (below)
//   forward(z, z_rec, gates, c, c_save, m, cell_clip, out_clip)
//       z (A, 4n) pre-activations; z_rec (A, 4n) or undefined: the recurrent GEMM's product, added to
//       z in the pass (only when kSumsRecurrent; else the driver has added it into z);
//       gates (A, 4n) acc or undefined: activated gates (may alias z);
//       c (A, n) acc in/out; c_save (A, n) acc or undefined: copy of the new c; m (A, n) = o tanh(c)
//   clip(h, limit)                                  in place
//   proj_backward(dh, d, h, proj_clip)             d = (dh + d) where the clip of h passed, else 0
//   backward(dm, gates, c, c_prev, dc, dz, m, cell_clip)
//       dz (A, 4n); m (A, n) or undefined: o tanh(c) recomputed; dc (A, n) acc in/out
//   input_chunk_rows(n, elem_bytes)                packed rows per inference input GEMM
//   run_steps(LstmSteps)                           runs a chunk's steps in one go and returns true, or
//                                                  returns false and the driver steps (the CUDA
//                                                  persistent kernel, Note [persistent LSTM])
// Shapes: x (B, T, I); w_ih (4n, I); w_hh (4n, P); bias (4n,); w_proj (P, n); h0 (B, P); c0 (B, n).
// activations (saved for backward, acc dtype, flat): [gates (B*T, 4n) | c (B*T, n)], the first
// `total` rows of each used (packed order); (0,) when not saved.
// Note [chunked input GEMM]: with activations saved, the input GEMM of every step runs at once into
// the saved gates (total, 4n). Without them (inference) it runs per chunk of consecutive steps of at
// most the backend's input_chunk_rows packed rows (at least one step; on the CPU kLstmInputChunkRows
// and oneDNN's fresh-product size, on CUDA 128 MiB of gates), so memory stays linear in T with no
// (total, 4n) buffer: a 10 000-residue protein needs 64 MiB of gates on the CPU, not 625 MiB, for
// n = 4096. Row results are the same GEMM per row, equal up to float rounding.
#pragma once

#include <algorithm>
#include <optional>
#include <tuple>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include "common/checks.h"
#include "common/linear.h"
#include "common/lstm_plan.h"

namespace elmo_fast {

constexpr int64_t kLstmInputChunkRows = 1024;  // Note [chunked input GEMM]
// Note [fresh products]
// On the CPU, oneDNN's GEMM returns a new tensor (no out= variant). Copying it into a buffer costs
// ~4% of an fp32 biLM forward, so where a product is consumed once the driver keeps oneDNN's tensor
// itself (linear_once): the inference input GEMM of each chunk, and (backends with kSumsRecurrent)
// the recurrent product, which the pointwise pass adds to z in float (oneDNN's fused "add" epilogue
// was 12% slower than a plain product in bf16). Chunks stay under kFreshProductBytes (linear.h).

struct LstmDims {
  int64_t B, T, I, n, P;
};

// What a backend's run_steps needs to run steps [s_begin, s_end) of a forward by itself: the same
// buffers the driver's step loop uses (undefined tensors: not saved / no projection).
struct LstmSteps {
  const LstmPlan& plan;
  int64_t s_begin, s_end;
  const at::Tensor& g;  // input pre-activations with bias: row k = packed row g_base + k
  int64_t g_base;
  const at::Tensor& w_hh;
  const at::Tensor& w_proj;
  const at::Tensor& hbuf;       // (B + total, P)
  const at::Tensor& c_state;    // (B, n) acc, sorted rows
  const at::Tensor& gates_all;  // (total, 4n) acc, or undefined
  const at::Tensor& c_all;      // (total, n) acc, or undefined
  double cell_clip, proj_clip;
};

// The CPU's chunk of inference input GEMMs: oneDNN's fresh products up to kFreshProductBytes.
inline int64_t lstm_fresh_chunk_rows(int64_t n, int64_t elem_bytes) {
  return std::min(kLstmInputChunkRows, std::max<int64_t>(1, kFreshProductBytes / (4 * n * elem_bytes)));
}

inline LstmDims check_lstm_args(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_proj,
                                const at::Tensor& h0, const at::Tensor& c0) {
  TORCH_CHECK(x.dim() == 3, "lstm_projection: x must be 3-D (B, T, I), got shape ", x.sizes());
  TORCH_CHECK(c0.dim() == 2 && h0.dim() == 2, "lstm_projection: h0 and c0 must be 2-D");
  const LstmDims d{x.size(0), x.size(1), x.size(2), c0.size(1), h0.size(1)};
  check_shape(w_ih, {4 * d.n, d.I}, "lstm_projection: w_ih");
  check_shape(w_hh, {4 * d.n, d.P}, "lstm_projection: w_hh");
  check_shape(h0, {d.B, d.P}, "lstm_projection: h0");
  check_shape(c0, {d.B, d.n}, "lstm_projection: c0");
  for (auto* t : {&w_ih, &w_hh, &h0, &c0}) check_same_device_dtype(*t, x, "lstm_projection: every weight and state");
  if (bias.has_value()) {
    check_shape(*bias, {4 * d.n}, "lstm_projection: bias");
    check_same_device_dtype(*bias, x, "lstm_projection: bias");
  }
  if (w_proj.has_value()) {
    check_shape(*w_proj, {d.P, d.n}, "lstm_projection: w_proj");
    check_same_device_dtype(*w_proj, x, "lstm_projection: w_proj");
  } else {
    TORCH_CHECK(d.P == d.n, "lstm_projection: without w_proj, h0 must have n = ", d.n, " features, got ", d.P);
  }
  return d;
}

inline at::ScalarType lstm_acc_type(const at::Tensor& x) { return at::toOpMathType(x.scalar_type()); }

template <class Pointwise>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_driver(
    const at::Tensor& x_in, const at::Tensor& lengths, const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
    const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& w_proj_in, const at::Tensor& h0,
    const at::Tensor& c0, double cell_clip, double proj_clip, bool reverse, bool save, const Pointwise& pw) {
  const LstmDims d = check_lstm_args(x_in, w_ih_in, w_hh_in, bias_in, w_proj_in, h0, c0);
  const int64_t B = d.B, T = d.T, n = d.n, P = d.P;
  const LstmPlan plan = make_lstm_plan(lengths, B, T, reverse, x_in.device());
  const at::Tensor x = x_in.contiguous(), w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const bool has_proj = w_proj_in.has_value();
  const at::Tensor w_proj = has_proj ? w_proj_in->contiguous() : at::Tensor();
  const auto acc = x.options().dtype(lstm_acc_type(x));
  const bool same = acc.dtype() == x.dtype();

  at::Tensor out = at::zeros({B, T, P}, x.options());
  at::Tensor act = at::empty({save ? B * T * 5 * n : 0}, acc);
  if (save && plan.total < B * T) {  // rows past `total` are padding: zero them so outputs are deterministic
    act.narrow(0, plan.total * 4 * n, (B * T - plan.total) * 4 * n).zero_();
    act.narrow(0, B * T * 4 * n + plan.total * n, (B * T - plan.total) * n).zero_();
  }
  at::Tensor hbuf = at::empty({B + plan.total, P}, x.options());
  hbuf.narrow(0, 0, B).copy_(h0.index_select(0, plan.perm));
  at::Tensor c_state = c0.index_select(0, plan.perm).to(acc.dtype()).contiguous();  // (B, n), sorted rows

  if (plan.total > 0) {
    const int64_t total = plan.total;
    const at::Tensor x2 = x.view({B * T, d.I});
    const at::Tensor gates_all = save ? act.narrow(0, 0, total * 4 * n).view({total, 4 * n}) : at::Tensor();
    const at::Tensor c_all = save ? act.narrow(0, B * T * 4 * n, total * n).view({total, n}) : at::Tensor();
    // g holds the input pre-activations of steps [s, chunk_end), row r of g = packed row g_base + r:
    // when saving, all steps in the saved gates (or one buffer); else each chunk's own GEMM result
    // (Note [fresh products]).
    const int64_t chunk_rows = pw.input_chunk_rows(n, x.element_size());
    const int64_t g_rows = save ? total : std::min(total, std::max(chunk_rows, B));
    at::Tensor g = !save ? at::Tensor() : same ? gates_all : at::empty({g_rows, 4 * n}, x.options());
    at::Tensor m_buf;  // allocated when the driver steps with a projection
    const double out_clip = has_proj ? 0.0 : proj_clip;  // without projection the clip applies to m = h
    for (int64_t s0 = 0, chunk_end = 0; s0 < plan.steps; s0 = chunk_end) {
      // The input GEMM of the next steps that fit in g (all of them when saving).
      while (chunk_end < plan.steps && plan.offset[chunk_end + 1] - plan.offset[s0] <= g_rows) ++chunk_end;
      const int64_t g_base = plan.offset[s0];
      const int64_t rows = plan.offset[chunk_end] - g_base;
      const at::Tensor xs = x2.index_select(0, plan.pack_index.narrow(0, g_base, rows));
      if (save) {
        at::Tensor gc = g.narrow(0, 0, rows);
        linear_into(gc, xs, w_ih, bias);
      } else {
        g = linear_once(xs, w_ih, bias);
      }
      if (pw.run_steps(LstmSteps{plan, s0, chunk_end, g, g_base, w_hh, w_proj, hbuf, c_state, gates_all, c_all,
                                 cell_clip, proj_clip})) {
        continue;
      }
      if (has_proj && !m_buf.defined()) m_buf = at::empty({B, n}, x.options());
      for (int64_t s = s0; s < chunk_end; ++s) {
        const int64_t a = plan.active[s], off = plan.offset[s];
        at::Tensor z = g.narrow(0, off - g_base, a);
        const at::Tensor h_prev = s == 0 ? hbuf.narrow(0, 0, a) : hbuf.narrow(0, B + plan.offset[s - 1], a);
        at::Tensor z_rec;
        if constexpr (Pointwise::kSumsRecurrent) {
          z_rec = linear_once(h_prev, w_hh, at::Tensor());
        } else {
          add_linear_into(z, h_prev, w_hh);
        }
        at::Tensor h = hbuf.narrow(0, B + off, a);
        at::Tensor m = has_proj ? m_buf.narrow(0, 0, a) : h;
        pw.forward(z, z_rec, save ? gates_all.narrow(0, off, a) : at::Tensor(), c_state.narrow(0, 0, a),
                   save ? c_all.narrow(0, off, a) : at::Tensor(), m, cell_clip, out_clip);
        if (has_proj) {
          linear_into(h, m, w_proj, at::Tensor());
          if (proj_clip > 0) pw.clip(h, proj_clip);
        }
      }
    }
    out.view({B * T, P}).index_copy_(0, plan.pack_index, hbuf.narrow(0, B, total));
  }
  at::Tensor h_n = at::empty_like(h0, at::MemoryFormat::Contiguous);
  h_n.index_copy_(0, plan.perm, hbuf.index_select(0, plan.last_index));
  at::Tensor c_n = at::empty_like(c0, at::MemoryFormat::Contiguous);
  c_n.index_copy_(0, plan.perm, c_state.to(c0.scalar_type()));
  return {out, h_n, c_n, act};
}

// Returns grads for x, w_ih, w_hh, bias ((0,) when has_bias is false), w_proj ((0,) without it), h0, c0.
template <class Pointwise>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_driver(
    const at::Tensor& grad_out, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& x_in,
    const at::Tensor& lengths, const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
    const std::optional<at::Tensor>& w_proj_in, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& out,
    const at::Tensor& activations, bool has_bias, double cell_clip, double proj_clip, bool reverse,
    const Pointwise& pw) {
  const LstmDims d = check_lstm_args(x_in, w_ih_in, w_hh_in, std::nullopt, w_proj_in, h0, c0);
  const int64_t B = d.B, T = d.T, n = d.n, P = d.P;
  check_shape(grad_out, {B, T, P}, "lstm_projection_backward: grad_out");
  check_shape(out, {B, T, P}, "lstm_projection_backward: out");
  check_shape(grad_h_n, {B, P}, "lstm_projection_backward: grad_h_n");
  check_shape(grad_c_n, {B, n}, "lstm_projection_backward: grad_c_n");
  const LstmPlan plan = make_lstm_plan(lengths, B, T, reverse, x_in.device());
  const int64_t total = plan.total;
  TORCH_CHECK(total == 0 || activations.numel() == B * T * 5 * n,
              "lstm_projection_backward: the forward did not save activations (save_activations=False)");
  const at::Tensor x = x_in.contiguous(), w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const bool has_proj = w_proj_in.has_value();
  const at::Tensor w_proj = has_proj ? w_proj_in->contiguous() : at::Tensor();
  const auto acc = x.options().dtype(lstm_acc_type(x));

  at::Tensor dh_state = grad_h_n.index_select(0, plan.perm).contiguous();                 // (B, P)
  at::Tensor dc_state = grad_c_n.index_select(0, plan.perm).to(acc.dtype()).contiguous();  // (B, n)
  at::Tensor grad_w_ih, grad_w_hh, grad_bias, grad_w_proj;  // set below: zeros only when nothing ran
  at::Tensor grad_x = at::zeros({B, T, d.I}, x.options());
  if (total == 0) {
    grad_w_ih = at::zeros_like(w_ih);
    grad_w_hh = at::zeros_like(w_hh);
    grad_bias = at::zeros({has_bias ? 4 * n : 0}, x.options());
    grad_w_proj = has_proj ? at::zeros_like(w_proj) : at::empty({0}, x.options());
  } else {
    const at::Tensor act = activations.contiguous();
    const at::Tensor gates_all = act.narrow(0, 0, total * 4 * n).view({total, 4 * n});
    const at::Tensor c_all = act.narrow(0, B * T * 4 * n, total * n).view({total, n});
    const at::Tensor c0_sorted = c0.index_select(0, plan.perm).to(acc.dtype()).contiguous();
    at::Tensor hbuf = at::empty({B + total, P}, x.options());  // as in the forward (Note [LSTM packing])
    hbuf.narrow(0, 0, B).copy_(h0.index_select(0, plan.perm));
    hbuf.narrow(0, B, total).copy_(out.reshape({B * T, P}).index_select(0, plan.pack_index));
    // dL/dh per packed row: the upstream out grad, turned in place into the grad of the unclipped h.
    at::Tensor dh_all = grad_out.reshape({B * T, P}).index_select(0, plan.pack_index);
    // Saved activations are inputs of this op and stay untouched (backward may run twice).
    at::Tensor dz_all = at::empty({total, 4 * n}, x.options());
    at::Tensor m_all = has_proj ? at::empty({total, n}, x.options()) : at::Tensor();
    at::Tensor dm_buf = has_proj ? at::empty({B, n}, x.options()) : at::Tensor();
    for (int64_t s = plan.steps - 1; s >= 0; --s) {
      const int64_t a = plan.active[s], off = plan.offset[s];
      at::Tensor dh = dh_all.narrow(0, off, a);
      at::Tensor dh_future = dh_state.narrow(0, 0, a);
      pw.proj_backward(dh_future, dh, hbuf.narrow(0, B + off, a), proj_clip);
      at::Tensor dm = has_proj ? dm_buf.narrow(0, 0, a) : dh;
      if (has_proj) matmul_into(dm, dh, w_proj);
      const at::Tensor c_prev = s == 0 ? c0_sorted.narrow(0, 0, a) : c_all.narrow(0, plan.offset[s - 1], a);
      at::Tensor dz = dz_all.narrow(0, off, a);
      pw.backward(dm, gates_all.narrow(0, off, a), c_all.narrow(0, off, a), c_prev, dc_state.narrow(0, 0, a), dz,
                  has_proj ? m_all.narrow(0, off, a) : at::Tensor(), cell_clip);
      matmul_into(dh_future, dz, w_hh);  // dL/dh_prev: becomes the previous step's dh_future
    }
    // Weight gradients: one GEMM each over all packed rows.
    const at::Tensor xp = x.view({B * T, d.I}).index_select(0, plan.pack_index);
    grad_w_ih = matmul_tn(dz_all, xp);
    grad_w_hh = matmul_tn(dz_all, hbuf.index_select(0, plan.prev_index));
    grad_bias = has_bias ? dz_all.sum(0) : at::empty({0}, x.options());
    grad_w_proj = has_proj ? matmul_tn(dh_all, m_all) : at::empty({0}, x.options());
    grad_x.view({B * T, d.I}).index_copy_(0, plan.pack_index, at::mm(dz_all, w_ih));
  }
  at::Tensor grad_h0 = at::empty_like(h0, at::MemoryFormat::Contiguous);
  grad_h0.index_copy_(0, plan.perm, dh_state);
  at::Tensor grad_c0 = at::empty_like(c0, at::MemoryFormat::Contiguous);
  grad_c0.index_copy_(0, plan.perm, dc_state.to(c0.scalar_type()));
  return {grad_x, grad_w_ih, grad_w_hh, grad_bias, grad_w_proj, grad_h0, grad_c0};
}

}  // namespace elmo_fast
