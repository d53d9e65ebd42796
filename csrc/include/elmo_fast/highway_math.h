// The highway layer's pointwise part (spec §4.2 step 4, AllenNLP's gate convention), shared by
// csrc/cpu/highway.cpp and csrc/cuda/highway.cu. A layer computes proj = x W^T + b (N, 2F) by GEMM;
// per element f of a row: h = relu(proj[f]), g = sigmoid(proj[F + f]), y = g x + (1 - g) h.
// Activations saved for backward are [h | g] in place of proj; relu'(nl) = (h > 0).
#pragma once

#include "elmo_fast/math.h"

namespace elmo_fast {

template <typename T>
EF_HD T highway_mix(T x, T h, T g) {
  return g * x + (T(1) - g) * h;
}

// Forward for one element: writes h and g (the saved activations) and returns y.
template <typename T>
EF_HD T highway_point_forward(T nonlinear, T gate, T x, T* h, T* g) {
  *h = ef_relu(nonlinear);
  *g = ef_sigmoid(gate);
  return highway_mix(x, *h, *g);
}

// Backward for one element given dy = dL/dy: the gradients of the two proj halves and the part of
// dL/dx that does not go through the GEMM (dy * g).
template <typename T>
EF_HD void highway_point_backward(T dy, T x, T h, T g, T* d_nonlinear, T* d_gate, T* dx_direct) {
  *d_nonlinear = h > T(0) ? dy * (T(1) - g) : T(0);
  *d_gate = dy * (x - h) * g * (T(1) - g);
  *dx_direct = dy * g;
}

}  // namespace elmo_fast
