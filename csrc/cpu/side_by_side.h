// Two independent CPU jobs (the two directions of an LSTM layer) run either one after the other,
// each with all of torch's intra-op threads, or side by side, each on half of them: whichever is faster on
// this machine for this shape, measured at run time (Note [side by side] in side_by_side.cpp).
#pragma once

#include <functional>
#include <string>

namespace elmo_fast::cpu_pair {

// Runs job(0) and job(1). `key` names the shape class whose timings are compared; `flops` is the
// work of one job (small jobs never go side by side). Exceptions of either job propagate.
void run(const std::string& key, double flops, const std::function<void(int)>& job);

// ELMO_FAST_CPU_DIRECTIONS: "auto" (measured choice) | "concurrent" | "serial". Read from the
// environment at the first call; set_mode overrides it (tests, benchmarks). Throws on other values.
void set_mode(const std::string& mode);
// {"mode", "threads", "decisions": {key: {"serial_ms", "concurrent_ms", "choice"}}} as JSON.
std::string info_json();
void reset();

}  // namespace elmo_fast::cpu_pair
