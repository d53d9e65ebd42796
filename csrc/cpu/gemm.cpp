// The CPU GEMM layer's path choice (gemm.h): oneDNN with a packed weight, or at::addmm.
//
// Note [when to pack]
// oneDNN with a packed weight runs ELMo's shapes 1.5-3x faster than mm on machines whose MKL path
// is weak (../shared/cpu-gemm.md), but packing costs about as much as ~200 rows of the GEMM
// (15-17 ms for 8M fp32 weights, 1 thread), and per call oneDNN has a fixed overhead that loses to
// mm on tiny products. So, in "auto":
//  - products with M*N*K < kMinWork take mm (fixed overhead dominates; measured in
//    bench/results/cpu-gemm-*.md);
//  - a weight version is packed at its first use when M >= kPackNowRows (the pack pays for itself
//    within the call), otherwise at its second use (it is being reused: inference, the recurrent
//    steps of an LSTM); a weight that changes after every single use (training with small batches)
//    thus never pays for a pack it cannot amortise.
// "onednn" packs at first use and ignores kMinWork (tests exercise the oneDNN path on every shape);
// it still falls back to mm where oneDNN is absent (torch without it, bf16 without CPU support).
//
// Note [measured path]
// Which of the two is faster for a product that passes the policy above depends on the machine, not
// only on its size: on an AMD Zen 4 packed oneDNN won every ELMo shape (MKL takes a narrower code
// path there); on an Intel Xeon with AMX mm won fp32 at large M (the highway, 156 vs 134 GFLOP/s)
// and fp32 batch-1 steps on 2 threads (24 vs 20), and lost everything else
// (bench/results/cpu-intel-amx-2026-12-02.md). So "auto" measures: per shape class (ShapeClass)
// that oneDNN would take, after kWarmup untimed calls, 2 * kTrials calls alternate between the two
// paths, timed, and from then on the one with the better best time runs. A class costs a few calls
// on its slower path once per process; the products are >= kMinWork, so the clock's cost is noise.
// Results differ between the paths only by float rounding (tests/test_cpu_gemm.py forces each).
#include "cpu/gemm.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <tuple>

#include <ATen/Parallel.h>

#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

#include "cpu/gemm_cache.h"
#include "cpu/onednn_ops.h"
#include "cpu/timed_choice.h"

namespace elmo_fast::cpu_gemm {
namespace {

// oneDNN's fixed cost per call is ~25 us (mm's ~8 us, Zen 4, 1 thread); it starts to win around
// M*N*K = 2-4M (16 x 512 x 512: 100 vs 122 us; 64 x 128 x 128: 57 vs 34 us). Every GEMM of the
// original model at batch >= 1 is above it; batch-1 steps of the small model are below it.
constexpr int64_t kMinWork = int64_t{1} << 21;
constexpr int64_t kPackNowRows = 256;

enum Mode : int { kUnset = -1, kAuto = 0, kMm = 1, kOnednn = 2 };
enum Path : int { kNone = 0, kPathMm = 1, kPathOnednn = 2 };

std::atomic<int> g_mode{kUnset};
std::atomic<int> g_last_path{kNone};
std::atomic<int64_t> g_mm_calls{0}, g_onednn_calls{0};

Mode parse_mode(const std::string& s, const char* where) {
  if (s.empty() || s == "auto") return kAuto;
  if (s == "mm") return kMm;
  if (s == "onednn") return kOnednn;
  TORCH_CHECK(false, where, " must be auto, mm or onednn, got '", s, "'");
  return kAuto;  // not reached
}

Mode mode() {
  int m = g_mode.load(std::memory_order_relaxed);
  if (m == kUnset) {
    const char* env = std::getenv("ELMO_FAST_CPU_GEMM");
    m = parse_mode(env ? env : "", "ELMO_FAST_CPU_GEMM");
    g_mode.store(m, std::memory_order_relaxed);
  }
  return static_cast<Mode>(m);
}

const char* mode_name(int m) { return m == kMm ? "mm" : m == kOnednn ? "onednn" : "auto"; }

// Note [measured path]: per shape class a TimedChoice (cpu/timed_choice.h) of mm and oneDNN.
// The first kWarmup calls of a class run oneDNN untimed: a path's first calls pay for page faults on
// fresh outputs and cold packed weights (up to 2x its steady time, measured).
constexpr int kWarmup = 4;
constexpr int kTrials = 3;
constexpr int kMmWay = TimedChoice::kDefault, kOnednnWay = TimedChoice::kAlternative;

// dtype, orientation, M rounded down to a power of two (exact below 8), N, K, threads in use.
struct ShapeClass {
  at::ScalarType dtype;
  Orientation orientation;
  int64_t m, n, k;
  int threads;
  auto tie() const { return std::tie(dtype, orientation, m, n, k, threads); }
  bool operator<(const ShapeClass& o) const { return tie() < o.tie(); }
  std::string name() const {
    std::ostringstream s;
    s << c10::toString(dtype) << (orientation == Orientation::kNK ? " NK" : " KN") << " M>=" << m << " N=" << n
      << " K=" << k << " threads=" << threads;
    return s.str();
  }
};

ShapeClass shape_class(const at::Tensor& weight, Orientation orientation, int64_t M, int64_t N, int64_t K) {
  int64_t m_class = M;
  if (M >= 8) {
    m_class = 8;
    while (m_class * 2 <= M) m_class *= 2;
  }
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  return {weight.scalar_type(), orientation, m_class, N, K, threads};
}

std::atomic<bool> g_measure{true};
std::mutex g_records_mutex;
std::map<ShapeClass, TimedChoice> g_records;

bool onednn_wins(const TimedChoice& r) { return r.best[kOnednnWay] <= r.best[kMmWay]; }  // ties: oneDNN

// What one call runs: oneDNN with `packed` when defined, else mm; with `trial` set the call is one
// of the timed trials of that shape class (Timer records it).
struct Pick {
  at::Tensor packed;
  std::optional<ShapeClass> trial;
};

Pick choose(const at::Tensor& weight, Orientation orientation, int64_t M, int64_t N, int64_t K) {
  const Mode m = mode();
  if (m == kMm || M == 0 || N == 0 || K == 0) return {};  // empty products: mm is exact and free
  if (!onednn_available(weight.scalar_type())) return {};
  if (m == kAuto && M * N * K < kMinWork) return {};
  if (m == kOnednn || !g_measure.load(std::memory_order_relaxed)) {
    return {packed_weight(weight, orientation, m == kOnednn || M >= kPackNowRows), {}};
  }
  std::optional<ShapeClass> trial = shape_class(weight, orientation, M, N, K);
  bool trial_onednn = true;
  {
    std::lock_guard<std::mutex> lock(g_records_mutex);
    TimedChoice& r = g_records[*trial];
    if (r.decided(kTrials)) {
      if (!onednn_wins(r)) return {};
      trial.reset();
    } else if (r.calls++ < kWarmup) {
      trial.reset();
    } else {
      trial_onednn = r.next_trial() == kOnednnWay;
    }
  }
  if (!trial_onednn) return {at::Tensor(), trial};
  at::Tensor packed = packed_weight(weight, orientation, M >= kPackNowRows);
  if (!packed.defined()) return {};  // not packed yet (first sight of this version): mm, untimed
  return {std::move(packed), trial};
}

// Times the rest of the enclosing scope and records it as one trial of the pick's shape class.
class Timer {
 public:
  explicit Timer(const Pick& pick) : pick_(pick), start_(std::chrono::steady_clock::now()) {}
  ~Timer() {
    if (!pick_.trial.has_value()) return;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    std::lock_guard<std::mutex> lock(g_records_mutex);
    g_records[*pick_.trial].add(pick_.packed.defined() ? kOnednnWay : kMmWay, s);
  }
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;

 private:
  const Pick& pick_;
  std::chrono::steady_clock::time_point start_;
};

// Note [row blocks]
// _linear_pointwise has no out= variant: it returns a new tensor that we copy into `out`. Running
// it on blocks of rows bounds that temporary to ~kTempBytes (it stays in the allocator's heap and
// the cache instead of being a fresh, page-faulting copy of the whole output) at no cost in GEMM
// speed: a block has >= kMinBlockRows rows, where packed oneDNN is already near its peak.
constexpr int64_t kTempBytes = int64_t{8} << 20;
constexpr int64_t kMinBlockRows = 64;

template <class Fn>
void by_row_blocks(at::Tensor& out, const at::Tensor& x, const Fn& gemm_block) {
  const int64_t M = x.size(0), N = out.size(1);
  const int64_t rows = std::max(kMinBlockRows, kTempBytes / std::max<int64_t>(1, N * out.element_size()));
  for (int64_t r0 = 0; r0 < M; r0 += rows) {
    const int64_t r = std::min(rows, M - r0);
    at::Tensor out_rows = out.narrow(0, r0, r);
    out_rows.copy_(gemm_block(x.narrow(0, r0, r), out_rows));
  }
}

void count(Path p) {
  g_last_path.store(p, std::memory_order_relaxed);
  (p == kPathMm ? g_mm_calls : g_onednn_calls).fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

void linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const Pick pick = choose(weight, Orientation::kNK, x.size(0), weight.size(0), x.size(1));
  const Timer timer(pick);
  const at::Tensor& packed = pick.packed;
  if (!packed.defined()) {
    count(kPathMm);
    if (bias.defined()) {
      at::addmm_out(out, bias, x, weight.t());
    } else {
      at::mm_out(out, x, weight.t());
    }
    return;
  }
  count(kPathOnednn);
  by_row_blocks(out, x, [&](const at::Tensor& xs, const at::Tensor&) { return onednn_linear(xs, packed, bias); });
}

at::Tensor linear_once(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const Pick pick = choose(weight, Orientation::kNK, x.size(0), weight.size(0), x.size(1));
  const Timer timer(pick);
  const at::Tensor& packed = pick.packed;
  if (!packed.defined()) {
    count(kPathMm);
    return bias.defined() ? at::addmm(bias, x, weight.t()) : at::mm(x, weight.t());
  }
  count(kPathOnednn);
  return onednn_linear(x, packed, bias);
}

void add_matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const Pick pick = choose(b, Orientation::kKN, a.size(0), b.size(1), a.size(1));
  const Timer timer(pick);
  const at::Tensor& packed = pick.packed;
  if (!packed.defined()) {
    count(kPathMm);
    out.addmm_(a, b);
    return;
  }
  count(kPathOnednn);
  // The += happens in oneDNN's epilogue (its "add" post-op reads the old out block).
  by_row_blocks(out, a, [&](const at::Tensor& as, const at::Tensor& os) { return onednn_linear_add(as, packed, os); });
}

void add_linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight) {
  const Pick pick = choose(weight, Orientation::kNK, x.size(0), weight.size(0), x.size(1));
  const Timer timer(pick);
  const at::Tensor& packed = pick.packed;
  if (!packed.defined()) {
    count(kPathMm);
    out.addmm_(x, weight.t());
    return;
  }
  count(kPathOnednn);
  by_row_blocks(out, x, [&](const at::Tensor& xs, const at::Tensor& os) { return onednn_linear_add(xs, packed, os); });
}

void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const Pick pick = choose(b, Orientation::kKN, a.size(0), b.size(1), a.size(1));
  const Timer timer(pick);
  const at::Tensor& packed = pick.packed;
  if (!packed.defined()) {
    count(kPathMm);
    at::mm_out(out, a, b);
    return;
  }
  count(kPathOnednn);
  by_row_blocks(out, a, [&](const at::Tensor& as, const at::Tensor&) { return onednn_linear(as, packed, at::Tensor()); });
}

void set_mode(const std::string& m) { g_mode.store(parse_mode(m, "elmo_fast CPU GEMM mode"), std::memory_order_relaxed); }

void set_measure(bool on) { g_measure.store(on, std::memory_order_relaxed); }

void reset_counters() {
  g_mm_calls = 0;
  g_onednn_calls = 0;
  g_last_path = kNone;
  std::lock_guard<std::mutex> lock(g_records_mutex);
  g_records.clear();
}

namespace {
// {"<shape class>": {"mm_us", "onednn_us" (best so far; -1 before the first run), "choice"}}.
std::string decisions_json() {
  std::ostringstream s;
  s << "{";
  std::lock_guard<std::mutex> lock(g_records_mutex);
  bool first = true;
  for (const auto& [key, r] : g_records) {
    s << (first ? "" : ", ") << "\"" << key.name() << "\": {\"mm_us\": " << r.best_in(kMmWay, 1e6)
      << ", \"onednn_us\": " << r.best_in(kOnednnWay, 1e6) << ", \"choice\": \""
      << (!r.decided(kTrials) ? "measuring" : onednn_wins(r) ? "onednn" : "mm") << "\"}";
    first = false;
  }
  s << "}";
  return s.str();
}
}  // namespace

std::string info_json() {
  const CacheStats s = cache_stats();
  const int last = g_last_path.load();
  auto num = [](const char* k, int64_t v) { return std::string("\"") + k + "\": " + std::to_string(v); };
  auto boolean = [](const char* k, bool v) { return std::string("\"") + k + "\": " + (v ? "true" : "false"); };
  auto str = [](const char* k, const char* v) { return std::string("\"") + k + "\": \"" + v + "\""; };
  return "{" + str("mode", mode_name(mode())) + ", " + boolean("onednn_fp32", onednn_available(at::kFloat)) + ", " +
         boolean("onednn_bf16", onednn_available(at::kBFloat16)) + ", " +
         str("last_path", last == kPathMm ? "mm" : last == kPathOnednn ? "onednn" : "none") + ", " +
         num("mm_calls", g_mm_calls.load()) + ", " + num("onednn_calls", g_onednn_calls.load()) + ", " +
         num("entries", s.entries) + ", " + num("packed", s.packed) + ", " + num("packs", s.packs) + ", " +
         num("hits", s.hits) + ", " + num("refreshes", s.refreshes) + ", " + num("purged", s.purged) + ", " +
         num("min_work", kMinWork) + ", " + num("pack_now_rows", kPackNowRows) + ", " +
         boolean("measure", g_measure.load()) + ", \"decisions\": " + decisions_json() + "}";
}

}  // namespace elmo_fast::cpu_gemm
