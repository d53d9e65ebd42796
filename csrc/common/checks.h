// TORCH_CHECK helpers: the last line of defence behind elmo_fast/functional.py's Python checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace elmo_fast {

inline void check_same_device_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have dtype ", ref.scalar_type(), ", got ",
              t.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", expected, ", got ", t.sizes());
}

}  // namespace elmo_fast
