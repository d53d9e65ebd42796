// The LSTM cell's pointwise part (spec §5.1, AllenNLP gate order [i, f, j, o]), shared by
// csrc/cpu/lstm.cpp and csrc/cuda/lstm.cu. Per step the GEMMs give z = x W_ih^T + h W_hh^T + b (4n);
// per unit u of a row:
//   i = sig(z_i), f = sig(z_f), j = tanh(z_j), o = sig(z_o)
//   c = clip(f c_prev + i j, cell_clip);  m = o tanh(c)            (m: the unprojected output, n)
//   h = clip(m W_proj^T, proj_clip)   (with projection; else h = clip(m, proj_clip))
// A is the arithmetic type (float for float/half/bfloat16 storage, double for double).
// Note [clip masks]: clip <= 0 means "no clip". Backward recovers the clip mask from the clipped
// value (|v| < clip passes the gradient), so only clipped values are saved; torch.clamp also passes
// the gradient at exactly +-clip, a measure-zero difference.
#pragma once

#include "elmo_fast/math.h"

namespace elmo_fast {

template <typename A>
EF_HD bool lstm_clip_passes(A clipped, A limit) {
  return limit <= A(0) || (clipped < limit && clipped > -limit);
}

// Forward for one unit: activates the gates (written to *gi.. for backward), updates *c in place
// (c_prev in, c out) and returns m = o tanh(c), clipped by out_clip (proj_clip when there is no
// projection, 0 otherwise).
template <typename A>
EF_HD A lstm_point_forward(A zi, A zf, A zj, A zo, A* c, A cell_clip, A out_clip, A* gi, A* gf, A* gj, A* go) {
  const A i = ef_sigmoid(zi), f = ef_sigmoid(zf), j = ef_tanh(zj), o = ef_sigmoid(zo);
  const A c_new = ef_clip(f * *c + i * j, cell_clip);
  *c = c_new;
  *gi = i;
  *gf = f;
  *gj = j;
  *go = o;
  return ef_clip(o * ef_tanh(c_new), out_clip);
}

// Backward of the projection clip for one element: dh = (dh_future + dh_out) masked by the clip.
template <typename A>
EF_HD A lstm_proj_backward(A dh_future, A dh_out, A h_clipped, A proj_clip) {
  return lstm_clip_passes(h_clipped, proj_clip) ? dh_future + dh_out : A(0);
}

// Backward for one unit. dm = dL/dm (already through the projection and its clip); *dc holds
// dL/dc from later steps on entry and dL/dc_prev on exit. i, f, j, o are the activated gates,
// c the (clipped) cell state of this step, c_prev the previous one. Writes the pre-activation
// gradients dz_* and returns m = o tanh(c) (recomputed for the projection's weight gradient).
template <typename A>
EF_HD A lstm_point_backward(A dm, A* dc, A i, A f, A j, A o, A c, A c_prev, A cell_clip, A* dzi, A* dzf, A* dzj,
                            A* dzo) {
  const A tc = ef_tanh(c);
  A dcell = *dc + dm * o * (A(1) - tc * tc);
  if (!lstm_clip_passes(c, cell_clip)) dcell = A(0);
  *dzi = dcell * j * i * (A(1) - i);
  *dzf = dcell * c_prev * f * (A(1) - f);
  *dzj = dcell * i * (A(1) - j * j);
  *dzo = dm * tc * o * (A(1) - o);
  *dc = dcell * f;
  return o * tc;
}

}  // namespace elmo_fast
