// Independent CPU jobs run at the same time, each on its own OpenMP team of a chosen size, so that
// torch's T intra-op threads can be split among them (Note [thread teams] in thread_teams.cpp).
#pragma once

#include <functional>
#include <vector>

namespace elmo_fast::cpu_teams {

// `threads` split into `jobs` team sizes as evenly as possible, larger first (5, 2 -> {3, 2});
// every size is at least 1 (callers split only when threads >= jobs).
std::vector<int> split(int threads, int jobs);

// Runs job(i) for every i < sizes.size() at the same time, job i with sizes[i] intra-op threads
// (OpenMP, so ATen's parallel_for and oneDNN, and MKL): job 0 on the calling thread, the others on
// helper threads that carry the caller's thread-local state (grad mode, dispatch keys). Teams of one
// each run in the caller's own OpenMP team instead (one after another if it has fewer threads than
// jobs). Returns after every job has finished and rethrows the first exception. Returns false without
// running anything when another call holds the helpers (a second Python thread): run the jobs another way.
bool try_run(const std::vector<int>& sizes, const std::function<void(int)>& job);

// For the tests: per job {its intra-op threads (at::get_num_threads(), 1 inside a parallel region),
// how many threads a parallel_for inside it ran on, whether all jobs were running at the same moment
// (1/0), MKL's thread count there (-1: no MKL)}.
std::vector<int64_t> probe(int threads, int jobs);

}  // namespace elmo_fast::cpu_teams
