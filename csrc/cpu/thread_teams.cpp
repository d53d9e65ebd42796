// Note [thread teams]
// ATen's parallel_for, oneDNN and libgomp all size a parallel region by the calling thread's OpenMP
// nthreads ICV (omp_get_max_threads; at::get_num_threads() returns it), and a region opened inside
// another runs inline on one thread. So to give two jobs T/2 threads each, each job must be the
// outermost region of its own native thread with that thread's ICV set to T/2: job 0 runs on the
// caller (its ICV lowered for the job and restored), the others on helper std::threads of ours.
// Each native thread keeps its own libgomp pool, so a helper's team is made once and reused.
// Two things would undo the ICV:
//  - ATen sets a thread's ICV from the process-wide count at the thread's first parallel call
//    (at::internal::lazy_init_num_threads): TeamSize makes that happen before it sets its own.
//  - MKL (torch's fp32 mm on x86) keeps a process-wide count set by torch.set_num_threads and would
//    start T threads from each job: TeamSize also sets MKL's count for the thread
//    (MKL_Set_Num_Threads_Local, exported by libtorch_cpu; a weak symbol, so builds without MKL
//    simply skip it).
// Helpers live as long as the process and sleep on a condition variable between calls. A forked
// child has no helpers (threads do not survive fork), so it forgets the parent's and makes new ones.
#include "cpu/thread_teams.h"

#include <omp.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/Exception.h>

// MKL's C entry points (mkl_service.h maps mkl_set_num_threads_local to these; the lower-case
// symbols libtorch_cpu exports are the Fortran ones, which take pointers).
extern "C" {
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
int MKL_Get_Max_Threads() __attribute__((weak));
}

namespace elmo_fast::cpu_teams {
namespace {

// The calling thread's intra-op thread count for the object's lifetime.
class TeamSize {
 public:
  explicit TeamSize(int threads) {
    (void)at::get_num_threads();  // ATen's lazy first-call initialisation, before ours
    at::internal::lazy_init_num_threads();
    omp_before_ = omp_get_max_threads();
    omp_set_num_threads(threads);
    if (MKL_Set_Num_Threads_Local != nullptr) mkl_before_ = MKL_Set_Num_Threads_Local(threads);
  }
  ~TeamSize() {
    omp_set_num_threads(omp_before_);
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_before_);  // 0: MKL's global again
  }
  TeamSize(const TeamSize&) = delete;
  TeamSize& operator=(const TeamSize&) = delete;

 private:
  int omp_before_ = 1, mkl_before_ = 0;
};

// One helper thread running one task at a time. Never destroyed: its thread refers to it for the
// life of the process.
class Helper {
 public:
  Helper() { std::thread([this] { loop(); }).detach(); }

  void start(std::function<void()> task) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      task_ = std::move(task);
      done_ = false;
    }
    cv_.notify_all();
  }

  // Waits for the task started last and rethrows what it threw.
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [this] { return done_; });
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  void loop() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [this] { return !done_ && task_; });
        task = std::exchange(task_, nullptr);
      }
      std::exception_ptr error;
      try {
        task();
      } catch (...) {
        error = std::current_exception();
      }
      {
        const std::lock_guard<std::mutex> lock(mutex_);
        error_ = error;
        done_ = true;
      }
      cv_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  std::function<void()> task_;
  bool done_ = true;
  std::exception_ptr error_;
};

struct Pool {
  std::atomic<bool> busy{false};  // not a mutex: a job on the caller's thread may call try_run again
  std::vector<Helper*> helpers;
};

std::atomic<Pool*> g_pool{nullptr};

void forget_helpers_in_child() { g_pool.store(new Pool); }  // the parent's are leaked: never touched again

Pool& pool() {
  static const bool registered = [] {
    pthread_atfork(nullptr, nullptr, forget_helpers_in_child);
    return true;
  }();
  (void)registered;
  Pool* p = g_pool.load();
  if (p == nullptr) {
    Pool* fresh = new Pool;
    if (!g_pool.compare_exchange_strong(p, fresh)) delete fresh;  // another thread won; p is its pool
    else p = fresh;
  }
  return *p;
}

}  // namespace

std::vector<int> split(int threads, int jobs) {
  TORCH_CHECK(jobs >= 1 && threads >= jobs, "elmo_fast thread teams: cannot split ", threads, " threads into ",
              jobs, " teams");
  std::vector<int> sizes(jobs, threads / jobs);
  for (int i = 0; i < threads % jobs; ++i) ++sizes[i];
  return sizes;
}

bool try_run(const std::vector<int>& sizes, const std::function<void(int)>& job) {
  const int jobs = static_cast<int>(sizes.size());
  const at::ThreadLocalState state;
  if (std::all_of(sizes.begin(), sizes.end(), [](int size) { return size == 1; })) {
    // Teams of one: the caller's own OpenMP team runs the jobs (inside its region ATen, oneDNN and MKL
    // run on one thread). Its threads are awake already; a helper would compete with them while they
    // spin down (13% slower at batch 1 on 2 threads, Zen 2).
    at::parallel_for(0, jobs, 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard guard(state);
      for (int64_t i = begin; i < end; ++i) job(static_cast<int>(i));
    });
    return true;
  }
  Pool& p = pool();
  bool expected = false;
  if (!p.busy.compare_exchange_strong(expected, true)) return false;
  struct Release {  // also when making a helper throws (no task has started then)
    std::atomic<bool>& busy;
    ~Release() { busy.store(false); }
  } release{p.busy};
  while (static_cast<int>(p.helpers.size()) < jobs - 1) p.helpers.push_back(new Helper);
  for (int i = 1; i < jobs; ++i) {
    p.helpers[i - 1]->start([&, i] {
      const at::ThreadLocalStateGuard guard(state);
      const TeamSize team(sizes[i]);
      job(i);
    });
  }
  std::exception_ptr error;
  try {
    const TeamSize team(sizes[0]);
    job(0);
  } catch (...) {
    error = std::current_exception();
  }
  for (int i = 1; i < jobs; ++i) {  // every helper is waited for: their tasks refer to this frame
    try {
      p.helpers[i - 1]->wait();
    } catch (...) {
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
  return true;
}

std::vector<int64_t> probe(int threads, int jobs) {
  std::vector<int64_t> out(4 * static_cast<size_t>(jobs), 0);
  std::atomic<int> arrived{0};
  const bool ran = try_run(split(threads, jobs), [&](int i) {
    arrived.fetch_add(1);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (arrived.load() < jobs && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
    // Inside an OpenMP region (teams of one) ATen, oneDNN and MKL run on the calling thread alone.
    const bool nested = at::in_parallel_region();
    out[4 * i] = nested ? 1 : at::get_num_threads();
    std::atomic<int> chunks{0};  // grain 1: one chunk per thread of the team
    at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) { chunks.fetch_add(1); });
    out[4 * i + 1] = chunks.load();
    out[4 * i + 2] = arrived.load() == jobs ? 1 : 0;
    out[4 * i + 3] = MKL_Get_Max_Threads == nullptr ? -1 : nested ? 1 : MKL_Get_Max_Threads();
  });
  TORCH_CHECK(ran, "elmo_fast thread teams: the helpers are busy");
  return out;
}

}  // namespace elmo_fast::cpu_teams
