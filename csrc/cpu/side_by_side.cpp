// Note [side by side]
// The two directions of an LSTM layer are independent chains of small GEMMs. With two or more intra-op
// threads there are two ways to run them: one after the other, every GEMM split over all T threads,
// or side by side, each direction on its own team of about T/2 threads (Note [thread teams] in
// cpu/thread_teams.cpp; 1 each on a 2-thread machine). Which wins depends on the machine, not the
// code: on one of our 2-core machines two threads ran a GEMM 3x slower than one, on another (a Zen 4)
// they scale almost perfectly and the split gains ~3%, and at batch 1 (GEMV-like steps) it loses;
// on many cores a GEMM split T ways has less to do per thread per step than a T/2 split, so the
// split should gain there (not measured: no many-core machine). So in "auto" the choice is measured
// per shape class and thread count: the first kWarmup calls run one after the other untimed (they
// pay for packing weights, cpu/gemm.cpp), then kTrials calls of each way alternate, and from then on
// the faster way runs (still timed; each way keeps its best). Inside a job at::get_num_threads() is
// the team's size, so the GEMM layer's measured path (Note [measured path]) is decided per team size.
#include "cpu/side_by_side.h"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "cpu/thread_teams.h"
#include "cpu/timed_choice.h"

namespace elmo_fast::cpu_pair {
namespace {

enum class Mode : int { kAuto = 0, kConcurrent = 1, kSerial = 2 };

constexpr int kWarmup = 2;
constexpr int kTrials = 2;
// Below this many FLOPs per job (about 1 ms of GEMM) the two ways differ by less than the noise.
constexpr double kMinAutoFlops = 1e8;

Mode parse_mode(const std::string& s, const char* what) {
  if (s == "auto") return Mode::kAuto;
  if (s == "concurrent") return Mode::kConcurrent;
  if (s == "serial") return Mode::kSerial;
  TORCH_CHECK(false, what, " must be 'auto', 'concurrent' or 'serial', got '", s, "'");
}

std::atomic<int> g_mode{-1};

Mode mode() {
  int m = g_mode.load(std::memory_order_relaxed);
  if (m < 0) {
    const char* env = std::getenv("ELMO_FAST_CPU_DIRECTIONS");
    m = static_cast<int>(env != nullptr && *env != '\0' ? parse_mode(env, "ELMO_FAST_CPU_DIRECTIONS") : Mode::kAuto);
    g_mode.store(m, std::memory_order_relaxed);
  }
  return static_cast<Mode>(m);
}

// Per shape class a TimedChoice (cpu/timed_choice.h) of one after the other and side by side.
constexpr int kSerialWay = TimedChoice::kDefault, kConcurrentWay = TimedChoice::kAlternative;

std::mutex g_mutex;
std::map<std::string, TimedChoice> g_records;

bool concurrent_wins(const TimedChoice& r) { return r.best[kConcurrentWay] < r.best[kSerialWay]; }  // ties: serial

struct Choice {
  bool side_by_side = false, timed = false;
};

Choice choose(const std::string& key, double flops, int threads) {
  if (threads < 2 || at::in_parallel_region()) return {};
  switch (mode()) {
    case Mode::kSerial:
      return {};
    case Mode::kConcurrent:
      return {true, false};
    case Mode::kAuto:
      break;
  }
  if (flops < kMinAutoFlops) return {};
  std::lock_guard<std::mutex> lock(g_mutex);
  TimedChoice& r = g_records[key];
  if (r.calls++ < kWarmup) return {};
  if (!r.decided(kTrials)) return {r.next_trial() == kConcurrentWay, true};
  return {concurrent_wins(r), true};
}

void record(const std::string& key, bool side_by_side, double seconds) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_records[key].add(side_by_side ? kConcurrentWay : kSerialWay, seconds);
}

}  // namespace

void run(const std::string& key, double flops, const std::function<void(int)>& job) {
  const int threads = at::get_num_threads();
  const std::string full_key = key + "/threads=" + std::to_string(threads);
  const Choice choice = choose(full_key, flops, threads);
  const auto start = std::chrono::steady_clock::now();
  // A second Python thread's call finds the helpers busy and runs one after the other.
  const bool side_by_side = choice.side_by_side && cpu_teams::try_run(cpu_teams::split(threads, 2), job);
  if (!side_by_side) {
    job(0);
    job(1);
  }
  if (choice.timed) {
    record(full_key, side_by_side,
           std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
}

void set_mode(const std::string& m) {
  g_mode.store(static_cast<int>(parse_mode(m, "elmo_fast CPU directions mode")), std::memory_order_relaxed);
}

std::string info_json() {
  static const char* names[] = {"auto", "concurrent", "serial"};
  std::ostringstream s;
  s << "{\"mode\": \"" << names[static_cast<int>(mode())] << "\", \"threads\": " << at::get_num_threads()
    << ", \"decisions\": {";
  std::lock_guard<std::mutex> lock(g_mutex);
  bool first = true;
  for (const auto& [key, r] : g_records) {
    s << (first ? "" : ", ") << "\"" << key << "\": {\"serial_ms\": " << r.best_in(kSerialWay, 1e3)
      << ", \"concurrent_ms\": " << r.best_in(kConcurrentWay, 1e3) << ", \"choice\": \""
      << (!r.decided(kTrials) ? "measuring" : concurrent_wins(r) ? "concurrent" : "serial") << "\"}";
    first = false;
  }
  s << "}}";
  return s.str();
}

void reset() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_records.clear();
}

}  // namespace elmo_fast::cpu_pair
