// A CUDA execution model on the CPU, so that the kernels in csrc/cuda run in every test session,
// GPU or not (Note [CUDA simulator] in tests/cuda_sim/__init__.py). translate.py rewrites a .cu file
// into C++ that includes this header first: every CUDA thread of a block is an OS thread, and
// __syncthreads, __syncwarp and grid.sync are real barriers, so a missing barrier or a thread that
// skips one shows up as a wrong result or a hang. Warp collectives (shuffles, WMMA) meet at a warp
// barrier and check what CUDA requires of them: every lane present with the same arguments, WMMA
// pointers 32-byte aligned and leading dimensions a multiple of 16 bytes. Device memory is host
// memory; built with -fsanitize=address, an out-of-bounds access in a kernel is an ASan report.
#pragma once

#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda_runtime_api.h>
#include <vector_types.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// cuda_runtime_api.h defines the qualifiers as attributes for nvcc's host pass; g++ knows none of them.
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define CUDART_INF_F std::numeric_limits<float>::infinity()

namespace ef_sim {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_sim: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// One launch's shared state.
struct Grid;

struct Block {
  explicit Block(int threads, size_t dynamic_bytes)
      : sync(threads), dynamic(new (std::align_val_t(128)) unsigned char[dynamic_bytes ? dynamic_bytes : 1]) {
    std::memset(dynamic, 0xFF, dynamic_bytes);  // garbage, as uninitialised shared memory: NaN as float or half
    const int warps = (threads + 31) / 32;
    for (int w = 0; w < warps; ++w) {
      const int lanes = threads - 32 * w < 32 ? threads - 32 * w : 32;
      warp_sync.emplace_back(std::make_unique<std::barrier<>>(lanes));
      warp_lanes.push_back(lanes);
    }
    exchange.resize(size_t(warps) * 32);
  }
  ~Block() { operator delete[](dynamic, std::align_val_t(128)); }
  std::barrier<> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warp_sync;
  std::vector<int> warp_lanes;
  std::vector<uint64_t> exchange;  // one slot per lane, for shuffles and uniformity checks
  unsigned char* dynamic;
  std::mutex statics_mutex;
  std::map<int, std::unique_ptr<unsigned char[]>> statics;
};

struct Grid {
  explicit Grid(int threads) : sync(threads) {}
  std::barrier<> sync;
};

struct ThreadContext {
  Block* block = nullptr;
  Grid* grid = nullptr;  // cooperative launches only
  int lane = 0, warp = 0;
};

inline thread_local ThreadContext context;

}  // namespace ef_sim

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

inline void __syncthreads() { ef_sim::context.block->sync.arrive_and_wait(); }

namespace ef_sim {

inline void warp_barrier() { context.block->warp_sync[context.warp]->arrive_and_wait(); }

// Every lane of the warp must arrive with the full mask (the kernels use 0xffffffff only).
inline void check_full_mask(unsigned mask) {
  const int lanes = context.block->warp_lanes[context.warp];
  if (lanes != 32 || mask != 0xffffffffu) fail("warp collective with a partial warp or mask");
}

// Publishes v for the warp; returns what lane `from` published (after a barrier both ways).
inline uint64_t exchange(uint64_t v, int from) {
  uint64_t* slots = context.block->exchange.data() + size_t(context.warp) * 32;
  slots[context.lane] = v;
  warp_barrier();
  const uint64_t got = slots[from];
  warp_barrier();
  return got;
}

// Aborts unless every lane passed the same value (WMMA arguments are warp-uniform).
inline void check_uniform(uint64_t v, const char* what) {
  if (exchange(v, 0) != v) fail(what);
}

// A static __shared__ array of the running block: count elements, allocated exactly (ASan sees an
// overrun), filled with garbage as uninitialised shared memory is.
template <typename T>
T* block_static(int key, size_t count) {
  Block* b = context.block;
  std::lock_guard<std::mutex> lock(b->statics_mutex);
  auto& slot = b->statics[key];
  if (!slot) {
    slot.reset(new unsigned char[count * sizeof(T)]);
    std::memset(slot.get(), 0xFF, count * sizeof(T));
  }
  return reinterpret_cast<T*>(slot.get());
}

}  // namespace ef_sim

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ef_sim::check_full_mask(mask);
  ef_sim::warp_barrier();
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  ef_sim::check_full_mask(mask);
  if (width != 32) ef_sim::fail("__shfl_xor_sync: only width 32 is simulated");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const uint64_t got = ef_sim::exchange(bits, (ef_sim::context.lane ^ lane_mask) & 31);
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

template <typename T>
T __ldg(const T* p) { return *p; }
template <typename T>
T __ldcg(const T* p) { return *p; }

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline int atomicOr(int* p, int v) { return std::atomic_ref<int>(*p).fetch_or(v); }

[[noreturn]] inline void __trap() { ef_sim::fail("__trap"); }

namespace ef_sim {

constexpr size_t kDefaultDynamicShared = 48 * 1024;  // without the opt-in attribute
constexpr size_t kOptinShared = 227 * 1024;          // sm_90's per-block opt-in maximum
constexpr int kMultiprocessors = 8;                  // what cudaDeviceGetAttribute reports
constexpr int kMaxCooperativeBlocks = 32;            // all resident at once: each block is 256 OS threads here

inline cudaError_t& last_error() {
  static thread_local cudaError_t err = cudaSuccess;
  return err;
}

inline std::map<const void*, size_t>& dynamic_limits() {
  static std::map<const void*, size_t> limits;
  return limits;
}

struct LaunchConfig {
  LaunchConfig(dim3 grid, dim3 block, size_t shared = 0, cudaStream_t stream = nullptr)
      : grid(grid), block(block), shared(shared) { (void)stream; }
  dim3 grid, block;
  size_t shared;
};

// Aborts the process when a launch runs longer than ELMO_FAST_SIM_TIMEOUT seconds (default 300): a
// barrier that some threads never reach deadlocks here as it would on a GPU, and a hung test run tells
// nobody which kernel it was.
class Watchdog {
 public:
  Watchdog() : thread_([this] { watch(); }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }

 private:
  void watch() {
    const char* env = std::getenv("ELMO_FAST_SIM_TIMEOUT");
    const int seconds = env ? std::atoi(env) : 300;
    std::unique_lock<std::mutex> lock(mutex_);
    if (!cv_.wait_for(lock, std::chrono::seconds(seconds), [this] { return done_; })) {
      fail("a kernel launch did not finish in time (deadlock: a barrier that some threads never reach?)");
    }
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

// Runs every block's threads; blocks one after another, or all at once for a cooperative launch.
inline cudaError_t run(const LaunchConfig& cfg, const std::function<void()>& body, bool cooperative,
                       size_t dynamic_limit) {
  const int64_t threads = int64_t(cfg.block.x) * cfg.block.y * cfg.block.z;
  const int64_t blocks = int64_t(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  if (threads < 1 || threads > 1024 || cfg.grid.y > 65535 || cfg.grid.z > 65535 || blocks < 1) {
    return last_error() = cudaErrorInvalidConfiguration;
  }
  if (cfg.shared > dynamic_limit) return last_error() = cudaErrorInvalidValue;
  if (cooperative && blocks > kMaxCooperativeBlocks) return last_error() = cudaErrorCooperativeLaunchTooLarge;
  auto one = [&](Block* block, Grid* grid, uint3 bidx, int tid) {
    context = ThreadContext{block, grid, tid % 32, tid / 32};
    threadIdx = uint3{unsigned(tid % cfg.block.x), unsigned(tid / cfg.block.x % cfg.block.y),
                      unsigned(tid / (cfg.block.x * cfg.block.y))};
    blockIdx = bidx;
    blockDim = cfg.block;
    gridDim = cfg.grid;
    body();
    // A thread that has returned no longer takes part in barriers (CUDA counts exited threads as arrived).
    block->sync.arrive_and_drop();
    block->warp_sync[context.warp]->arrive_and_drop();
    if (grid) grid->sync.arrive_and_drop();
  };
  Watchdog watchdog;
  auto block_index = [&](int64_t b) {
    return uint3{unsigned(b % cfg.grid.x), unsigned(b / cfg.grid.x % cfg.grid.y),
                 unsigned(b / (int64_t(cfg.grid.x) * cfg.grid.y))};
  };
  if (cooperative) {
    Grid grid(static_cast<int>(threads * blocks));
    std::vector<std::unique_ptr<Block>> all;
    std::vector<std::thread> pool;
    for (int64_t b = 0; b < blocks; ++b) all.emplace_back(std::make_unique<Block>(int(threads), cfg.shared));
    for (int64_t b = 0; b < blocks; ++b) {
      for (int t = 0; t < threads; ++t) pool.emplace_back(one, all[b].get(), &grid, block_index(b), t);
    }
    for (auto& t : pool) t.join();
  } else {
    // One OS thread per thread of a block, reused for the blocks in turn: the barrier between blocks
    // swaps in a fresh one (new barriers, shared memory refilled with garbage).
    auto block = std::make_unique<Block>(int(threads), cfg.shared);
    int64_t next_block = 0;
    auto swap_block = [&]() noexcept {
      if (++next_block < blocks) block = std::make_unique<Block>(int(threads), cfg.shared);
    };
    std::barrier<decltype(swap_block)> between(threads, swap_block);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        for (int64_t b = 0; b < blocks; ++b) {
          one(block.get(), nullptr, block_index(b), t);
          between.arrive_and_wait();
        }
      });
    }
    for (auto& t : pool) t.join();
  }
  return last_error() = cudaSuccess;
}

inline void launch(const LaunchConfig& cfg, const std::function<void()>& body) {
  run(cfg, body, false, kDefaultDynamicShared);
}

template <typename T>
T* dynamic_shared() { return reinterpret_cast<T*>(context.block->dynamic); }

template <typename... Args>
cudaError_t launch_cooperative(void (*kernel)(Args...), dim3 grid, dim3 block, void** params, size_t shared,
                               cudaStream_t stream) {
  (void)stream;
  auto limit = dynamic_limits().find(reinterpret_cast<const void*>(kernel));
  const size_t dynamic_limit = limit == dynamic_limits().end() ? kDefaultDynamicShared : limit->second;
  auto call = [&]<size_t... I>(std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<Args>>*>(params[I])...);
  };
  return run(LaunchConfig(grid, block, shared), [&] { call(std::index_sequence_for<Args...>{}); }, true,
             dynamic_limit);
}

}  // namespace ef_sim

namespace cooperative_groups {
struct grid_group {
  void sync() const {
    if (ef_sim::context.grid == nullptr) ef_sim::fail("grid.sync() outside a cooperative launch");
    ef_sim::context.grid->sync.arrive_and_wait();
  }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

// The runtime calls the launchers make (declared by cuda_runtime_api.h; defined here).
extern "C" inline cudaError_t cudaGetLastError() {
  const cudaError_t err = ef_sim::last_error();
  ef_sim::last_error() = cudaSuccess;
  return err;
}
extern "C" inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
extern "C" inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  (void)device;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = int(ef_sim::kOptinShared); return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = ef_sim::kMultiprocessors; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, F* kernel) {
  (void)kernel;
  *attributes = cudaFuncAttributes{};
  attributes->sharedSizeBytes = 0;  // the kernels keep their static shared memory small
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || size_t(value) > ef_sim::kOptinShared) return cudaErrorInvalidValue;
  ef_sim::dynamic_limits()[reinterpret_cast<const void*>(kernel)] = size_t(value);
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F* kernel, int threads, size_t shared) {
  auto limit = ef_sim::dynamic_limits().find(reinterpret_cast<const void*>(kernel));
  const size_t dynamic_limit = limit == ef_sim::dynamic_limits().end() ? ef_sim::kDefaultDynamicShared : limit->second;
  *blocks = (threads <= 1024 && shared <= dynamic_limit) ? 1 : 0;
  return cudaSuccess;
}

// WMMA: each lane holds the whole 16 x 16 tile (a valid choice of CUDA's unspecified fragment layout, as
// long as code treats the elements uniformly); every call is a warp collective with uniform arguments.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "cuda_sim: only 16x16x16 WMMA shapes");
  static constexpr int num_elements = 256;
  using element_type = T;
  T x[256];  // logical row-major (rows, cols) of the tile: A is (M, K), B is (K, N), C is (M, N)
};

namespace detail {
template <typename T>
float f(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}
template <typename T>
void check_pointer(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) ef_sim::fail(what);
  if ((ldm * sizeof(T)) % 16 != 0) ef_sim::fail("wmma: ldm is not a multiple of 16 bytes");
  ef_sim::check_uniform(reinterpret_cast<uint64_t>(p) ^ (uint64_t(ldm) << 48), "wmma: lanes disagree on ptr/ldm");
}
}  // namespace detail

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& a, const T* p, unsigned ldm) {
  ef_sim::check_full_mask(0xffffffffu);
  detail::check_pointer(p, ldm, "wmma::load_matrix_sync: pointer not 32-byte aligned");
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      a.x[r * 16 + c] = std::is_same_v<Layout, row_major> ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
    }
  }
  ef_sim::warp_barrier();
}

template <typename T>
void fill_fragment(T& frag, typename T::element_type v) {
  ef_sim::check_full_mask(0xffffffffu);
  for (auto& e : frag.x) e = v;
}

template <typename TA, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TA, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  ef_sim::check_full_mask(0xffffffffu);
  float out[256];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float acc = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) acc += detail::f(a.x[i * 16 + k]) * detail::f(b.x[k * 16 + j]);
      out[i * 16 + j] = acc;
    }
  }
  std::memcpy(d.x, out, sizeof(out));
  ef_sim::warp_barrier();
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& a, unsigned ldm,
                              layout_t layout) {
  ef_sim::check_full_mask(0xffffffffu);
  detail::check_pointer(p, ldm, "wmma::store_matrix_sync: pointer not 32-byte aligned");
  if (ef_sim::context.lane == 0) {
    for (int r = 0; r < 16; ++r) {
      for (int c = 0; c < 16; ++c) {
        (layout == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r]) = a.x[r * 16 + c];
      }
    }
  }
  ef_sim::warp_barrier();
}
}  // namespace wmma
}  // namespace nvcuda
