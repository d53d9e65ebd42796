// The char-CNN op's argument checks and weight packing, shared by the CPU and CUDA implementations.
// Shapes: char_ids (N, C) int64; embedding (V, d); weight[i] (m_i, d, w_i) (Conv1d layout);
// bias[i] (m_i,). F = sum m_i filters, K = w_max * d packed columns.
// Note [char-CNN packed weight]: all groups' filters are packed into one (F, K) matrix whose row f
// holds filter f as [k * d + c] = W_i[f - f0_i, c, k] for k < w_i and zeros beyond, so that a
// window of w_max embedded chars (contiguous in a token's (C, d) embedding) times the packed
// matrix gives every width's conv at once; narrower filters ignore the extra chars.
#pragma once

#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "common/checks.h"

namespace elmo_fast {

struct CharCnnGroup {
  int64_t f0;  // first output column of the group
  int64_t m;   // filters
  int64_t w;   // width
};

struct CharCnnShape {
  int64_t N = 0, C = 0, V = 0, d = 0, F = 0, K = 0, w_min = 0, w_max = 0;
  std::vector<CharCnnGroup> groups;
};

inline bool char_cnn_use_tanh(c10::string_view activation) {
  TORCH_CHECK(activation == "relu" || activation == "tanh", "char_cnn: activation must be 'relu' or 'tanh', got '",
              std::string(activation), "'");
  return activation == "tanh";
}

// Checks everything but the id values (read by the implementations, which see them anyway on the CPU).
inline CharCnnShape check_char_cnn_args(const at::Tensor& char_ids, const at::Tensor& embedding,
                                        at::TensorList weight) {
  TORCH_CHECK(char_ids.dim() == 2, "char_cnn: char_ids must be 2-D (N, C), got shape ", char_ids.sizes());
  TORCH_CHECK(char_ids.scalar_type() == at::kLong, "char_cnn: char_ids must be int64, got ", char_ids.scalar_type());
  TORCH_CHECK(embedding.dim() == 2, "char_cnn: embedding must be 2-D (V, d), got shape ", embedding.sizes());
  TORCH_CHECK(char_ids.device() == embedding.device(), "char_cnn: char_ids must be on ", embedding.device(),
              ", got ", char_ids.device());
  CharCnnShape s;
  s.N = char_ids.size(0);
  s.C = char_ids.size(1);
  s.V = embedding.size(0);
  s.d = embedding.size(1);
  TORCH_CHECK(s.V >= 1 && s.d >= 1, "char_cnn: embedding must be non-empty, got shape ", embedding.sizes());
  TORCH_CHECK(s.C <= 32767, "char_cnn: at most 32767 char slots (argmax is int16), got ", s.C);
  for (size_t i = 0; i < weight.size(); ++i) {
    const at::Tensor& w = weight[i];
    TORCH_CHECK(w.dim() == 3 && w.size(1) == s.d && w.size(2) >= 1, "char_cnn: weight[", i,
                "] must have shape (m, d=", s.d, ", width >= 1), got ", w.sizes());
    check_same_device_dtype(w, embedding, "char_cnn: weight");
    const int64_t width = w.size(2);
    s.groups.push_back({s.F, w.size(0), width});
    s.F += w.size(0);
    s.w_min = i == 0 ? width : std::min(s.w_min, width);
    s.w_max = std::max(s.w_max, width);
  }
  TORCH_CHECK(s.C >= s.w_max && s.C >= 1, "char_cnn: char_ids has ", s.C,
              " char slots, fewer than the widest filter (", s.w_max, ")");
  s.K = s.w_max * s.d;
  return s;
}

inline void check_char_cnn_bias(at::TensorList bias, const at::Tensor& embedding, const CharCnnShape& s) {
  TORCH_CHECK(bias.size() == s.groups.size(), "char_cnn: got ", s.groups.size(), " weights but ", bias.size(),
              " biases");
  for (size_t i = 0; i < bias.size(); ++i) {
    check_shape(bias[i], {s.groups[i].m}, "char_cnn: bias");
    check_same_device_dtype(bias[i], embedding, "char_cnn: bias");
  }
}

// (F, K) packed weight (Note [char-CNN packed weight]), contiguous, in `dtype`.
// The forward's outputs, uninitialised: out (N, F) in the embedding's dtype and, when saving for
// backward, the winning window start per (token, filter) as int16 (N, F); else an empty (0, 0).
inline std::tuple<at::Tensor, at::Tensor> empty_char_cnn_outputs(const CharCnnShape& s, const at::Tensor& embedding,
                                                                 bool save_activations) {
  return {at::empty({s.N, s.F}, embedding.options()),
          at::empty({save_activations ? s.N : 0, save_activations ? s.F : 0}, embedding.options().dtype(at::kShort))};
}

inline at::Tensor pack_char_cnn_weight(at::TensorList weight, const CharCnnShape& s, at::ScalarType dtype) {
  std::vector<at::Tensor> rows;
  rows.reserve(weight.size());
  for (size_t i = 0; i < weight.size(); ++i) {
    const CharCnnGroup& g = s.groups[i];
    at::Tensor r = weight[i].permute({0, 2, 1}).to(dtype).reshape({g.m, g.w * s.d});  // [k * d + c]
    rows.push_back(at::constant_pad_nd(r, {0, s.K - g.w * s.d}, 0));
  }
  if (rows.empty()) return at::empty({0, s.K}, weight.empty() ? at::TensorOptions() : weight[0].options());
  return at::cat(rows, 0).contiguous();
}

// Inverse of the packing for gradients: (F, K) -> weight[i]'s layout (m_i, d, w_i) in `dtype`.
inline std::vector<at::Tensor> unpack_char_cnn_weight(const at::Tensor& packed, const CharCnnShape& s,
                                                      at::ScalarType dtype) {
  std::vector<at::Tensor> out;
  for (const CharCnnGroup& g : s.groups) {
    out.push_back(packed.narrow(0, g.f0, g.m)
                      .narrow(1, 0, g.w * s.d)
                      .reshape({g.m, g.w, s.d})
                      .permute({0, 2, 1})
                      .to(dtype)
                      .clone(at::MemoryFormat::Contiguous));  // a copy even when already contiguous:
                                                              // op outputs must not alias each other
  }
  return out;
}

}  // namespace elmo_fast
