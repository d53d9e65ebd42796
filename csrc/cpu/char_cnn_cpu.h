// What the CPU char-CNN forward and backward share: the per-token scan of the ids.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace elmo_fast {

// Per token: live length L and the index (into `distinct`) of its trailing id
// (Note [char-CNN padding shortcut]); distinct: the trailing ids in order of first appearance.
struct CharCnnTokens {
  std::vector<int64_t> live, slot, distinct;
};

// ids (N, C) contiguous int64 with C >= 1. Checks every id lies in 0..V-1 (no read out of bounds).
CharCnnTokens scan_char_cnn_tokens(const at::Tensor& ids, int64_t V);

}  // namespace elmo_fast
