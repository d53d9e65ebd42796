// Scalar math shared by the CPU loops and the CUDA kernels: exp, sigmoid, tanh, relu, clip.
// Arithmetic is done in the accumulation type (float for float/half/bfloat16, double for double).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "elmo_fast/hd.h"

namespace elmo_fast {

#if !defined(__CUDA_ARCH__)
// Note [vectorizable expf]: libm's expf is an opaque call that stops gcc from vectorizing the
// pointwise loops. This is Cephes' expf (range reduction by ln 2, degree-6 polynomial, exponent
// built from bits): branch-free, within 2 ulp of expf on [-87.3, 88.3], and gcc vectorizes it.
// The polynomial sees inputs clamped to that range, where 2^n stays a normal float; outside it the
// result is 0 or inf (expf's subnormal tail below -87.3 is flushed to 0). always_inline like EF_HD: as a
// plain inline function gcc 12 left calls to it in some of the big float loop clones (-fopt-info-vec:
// "statement clobbers memory"), and a call per element keeps a loop scalar.
inline __attribute__((always_inline)) float exp_host_float(float x_in) {
  // Ternaries, not fmaxf/fminf: their NaN rules keep gcc from vectorizing them (maxps/minps are these).
  float x = x_in < -87.3f ? -87.3f : x_in;
  x = x > 88.3f ? 88.3f : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick: floorf does not vectorize without -fno-trapping-math.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  // Outside the range, saturate as expf does (0 and inf), not at the clamp's 1.2e-38 and 2.2e38:
  // sigmoid(-inf) must be exactly 0 so that the highway's gate * (-inf) is NaN, as in torch.
  const float big = __builtin_huge_valf();
  const float result = y * scale;
  return x_in < -87.3f ? 0.0f : (x_in > 88.3f ? big : result);
}
#endif

EF_HD float ef_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_host_float(x);
#endif
}
EF_HD double ef_exp(double x) { return exp(x); }

template <typename T>
EF_HD T ef_sigmoid(T x) {
  return T(1) / (T(1) + ef_exp(-x));
}

// tanh through the same exp: tanh(x) = 2 sigmoid(2x) - 1 loses relative accuracy near 0 but stays
// within ~1e-7 absolute in float, which is what the LSTM needs. double uses the library tanh.
EF_HD float ef_tanh(float x) { return 2.0f * ef_sigmoid(2.0f * x) - 1.0f; }
EF_HD double ef_tanh(double x) { return tanh(x); }

// A NaN passes through, as in torch.relu: a diverged input stays visible downstream.
template <typename T>
EF_HD T ef_relu(T x) {
  return x < T(0) ? T(0) : x;
}

// Clip to [-limit, limit]; limit <= 0 means "no clip" (the spec's None / 0).
template <typename T>
EF_HD T ef_clip(T x, T limit) {
  if (limit <= T(0)) return x;
  return x < -limit ? -limit : (x > limit ? limit : x);
}

}  // namespace elmo_fast
