// The packed-weight cache: Note [packed weight cache keys] in gemm_cache.h.
#include "cpu/gemm_cache.h"

#include <array>
#include <map>
#include <mutex>
#include <utility>

#include <c10/core/TensorImpl.h>
#include <c10/util/intrusive_ptr.h>

#include "cpu/onednn_ops.h"

namespace elmo_fast::cpu_gemm {
namespace {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

// What the packed copy was made from; any difference means the weight changed.
struct Fingerprint {
  uint32_t version = 0;
  const void* data = nullptr;
  std::array<int64_t, 2> sizes{}, strides{};  // weights are 2-D (linear.h); no allocation per call
  at::ScalarType dtype = at::kFloat;

  static Fingerprint of(const at::Tensor& w) {
    TORCH_CHECK(w.dim() == 2, "CPU GEMM layer: the weight operand must be 2-D, got shape ", w.sizes());
    return {w.unsafeGetTensorImpl()->version_counter().current_version(), w.data_ptr(),
            {w.size(0), w.size(1)}, {w.stride(0), w.stride(1)}, w.scalar_type()};
  }
  bool operator==(const Fingerprint& o) const {
    return version == o.version && data == o.data && sizes == o.sizes && strides == o.strides && dtype == o.dtype;
  }
};

struct Entry {
  WeakImpl owner;
  Fingerprint fingerprint;
  at::Tensor packed;  // undefined while this version has been seen but not packed yet
};

using Key = std::pair<const c10::TensorImpl*, Orientation>;

struct Cache {
  std::mutex mutex;
  std::map<Key, Entry> entries;
  CacheStats stats;

  // Forgets entries whose weight died, and drops packed copies of weights that changed since
  // (e.g. module.to(float64), which takes the mm path and would never refresh them), so the cache
  // holds packed copies of live, current weights only. Cheap: a handful of weights per model.
  void purge_locked() {
    for (auto it = entries.begin(); it != entries.end();) {
      c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> alive = it->second.owner.lock();
      if (!alive) {
        it = entries.erase(it);
        ++stats.purged;
        continue;
      }
      const at::Tensor weight(std::move(alive));
      if (it->second.packed.defined() && (weight.dim() != 2 || !(Fingerprint::of(weight) == it->second.fingerprint))) {
        it->second.packed = at::Tensor();
      }
      ++it;
    }
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // leaked on purpose: no destruction-order issues at exit
  return *c;
}

at::Tensor pack(const at::Tensor& weight, Orientation orientation) {
  // c10::NoGradGuard is not needed: the mkldnn ops have no autograd formula and weights arrive
  // below the autograd layer (inside our op).
  return onednn_pack(orientation == Orientation::kNK ? weight : weight.t());
}

}  // namespace

at::Tensor packed_weight(const at::Tensor& weight, Orientation orientation, bool pack_now) {
  if (weight.is_inference()) return at::Tensor();  // no version counter: cannot tell when it changes
  Cache& c = cache();
  const Fingerprint now = Fingerprint::of(weight);
  const Key key{weight.unsafeGetTensorImpl(), orientation};
  std::lock_guard<std::mutex> lock(c.mutex);
  auto it = c.entries.find(key);
  if (it == c.entries.end()) {
    c.purge_locked();  // a new weight appears: a good moment to forget dead ones
    it = c.entries.emplace(key, Entry{WeakImpl(weight.getIntrusivePtr()), now, at::Tensor()}).first;
  } else if (!(it->second.fingerprint == now)) {
    it->second.fingerprint = now;
    it->second.packed = at::Tensor();  // stale: drop it now, before packing the new version
    ++c.stats.refreshes;
  } else if (it->second.packed.defined()) {
    ++c.stats.hits;
    return it->second.packed;
  } else {
    pack_now = true;  // second use of the same version: it is reused, so packing pays
  }
  if (!pack_now) return at::Tensor();
  // Packed under the lock: two threads needing the same weight must not both pay for it.
  it->second.packed = pack(weight, orientation);
  ++c.stats.packs;
  return it->second.packed;
}

CacheStats cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.purge_locked();
  CacheStats s = c.stats;
  s.entries = static_cast<int64_t>(c.entries.size());
  s.packed = 0;
  for (const auto& kv : c.entries) s.packed += kv.second.packed.defined() ? 1 : 0;
  return s;
}

void clear_cache() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.entries.clear();
  c.stats = CacheStats();
}

}  // namespace elmo_fast::cpu_gemm
