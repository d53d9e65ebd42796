// Note [timed choice]
// Two ways of doing the same CPU work whose speed depends on the machine, not the code (the GEMM
// path, Note [measured path] in gemm.cpp; the two LSTM directions side by side, Note [side by side]
// in side_by_side.cpp) are chosen by timing both per shape class: after the warm-up calls, timed
// trials alternate, the alternative first, until each way has its trials; then the way with the
// better best time runs. TimedChoice is one class's record; the callers keep the map, the warm-up
// and what a decided class does next.
#pragma once

#include <algorithm>
#include <limits>

namespace elmo_fast {

struct TimedChoice {
  static constexpr int kDefault = 0, kAlternative = 1;  // e.g. mm / oneDNN, serial / side by side

  int calls = 0;        // calls of this class counted so far (the warm-up included)
  int runs[2] = {0, 0};  // timed runs per way
  double best[2] = {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity()};

  bool decided(int trials) const { return runs[kDefault] >= trials && runs[kAlternative] >= trials; }
  // The way of the next trial while undecided: the alternative first, then taking turns.
  int next_trial() const { return runs[kAlternative] <= runs[kDefault] ? kAlternative : kDefault; }
  void add(int way, double seconds) {
    ++runs[way];
    best[way] = std::min(best[way], seconds);
  }
  // Best time of a way in `unit`s per second (1e3: ms, 1e6: us); -1 before its first run.
  double best_in(int way, double unit) const { return runs[way] ? best[way] * unit : -1.0; }
};

}  // namespace elmo_fast
