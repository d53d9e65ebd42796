// The packed-weight cache of the CPU GEMM layer (gemm.h): one oneDNN-packed copy per weight tensor,
// orientation and VERSION, so that a weight is packed once and re-packed only when it changes.
//
// Note [packed weight cache keys]
// An entry is found by (TensorImpl*, orientation) and is valid only while the weight still has the
// same version counter value (tensor._version: bumped by every in-place write that autograd sees:
// optimizer steps, load_state_dict's copy_, p.add_() under no_grad), data_ptr (`.data =` / set_
// swaps the storage), sizes, strides and dtype. The entry holds a weak_intrusive_ptr to the
// TensorImpl: it does not keep the weight alive, but it keeps the TensorImpl's address from being
// reused, so a freed weight can never alias a new one; entries whose weight died are purged.
// Writes the version counter cannot see (through `w.data` or from another framework sharing the
// memory) are not detected: call elmo_fast::_cpu_gemm_clear_cache after such writes. Inference
// tensors have no version counter and are never cached (they take the mm path).
#pragma once

#include <cstdint>
#include <string>

#include <ATen/core/Tensor.h>

namespace elmo_fast::cpu_gemm {

// How the weight is used: kNK is linear_into's weight (N, K); kKN is add_matmul_into's b (K, N),
// packed as b^T.
enum class Orientation : int { kNK = 0, kKN = 1 };

struct CacheStats {
  int64_t entries = 0, packed = 0, packs = 0, hits = 0, refreshes = 0, purged = 0;
};

// The packed weight for `weight` in `orientation`, or an undefined tensor when the caller should
// use mm this time: the weight cannot be cached (inference tensor), or `pack_now` is false and
// this version of the weight has not been seen before (Note [when to pack] in gemm.cpp).
at::Tensor packed_weight(const at::Tensor& weight, Orientation orientation, bool pack_now);

CacheStats cache_stats();  // also purges entries of dead weights
void clear_cache();  // drops every packed weight and zeroes the stats

}  // namespace elmo_fast::cpu_gemm
