// Persistent lstm_projection forward (Note [persistent LSTM] in elmo_fast/lstm_persistent_layout.h),
// torch-free: one cooperative launch runs a range of steps; each block keeps its slices of W_hh and
// W_proj in shared memory throughout and the blocks step together through grid-wide barriers. The
// per-cell math is lstm_math.h's, shared with the CPU and the stepwise kernels.
#include <cstdint>
#include <mutex>
#include <set>

#include <cooperative_groups.h>
#include <mma.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "elmo_fast/cuda_types.cuh"
#include "elmo_fast/lstm_launch.h"
#include "elmo_fast/lstm_math.h"

namespace elmo_fast {
namespace cuda {
namespace {

namespace wmma = nvcuda::wmma;

[[maybe_unused]] __device__ __forceinline__ bool aligned16(const void* p) {  // unused below sm_80
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Stages a zero-padded tile: dst[r * ld + k] = row_ptr(r)[k] for k < valid where row_ptr(r) is not
// null, else 0, over rows r < rows and columns k < width (a multiple of 16). vec: valid is a
// multiple of 8 and every row pointer is 16-byte aligned, so 8 elements move per load. Data that
// other blocks wrote earlier in this launch (kCrossBlock) is read through L2 (ld.global.cg): L1 is
// not coherent across multiprocessors and may hold the previous step's lines.
template <bool kCrossBlock, typename T, class RowPtr>
__device__ void stage_rows(T* dst, int ld, int rows, int width, int valid, bool vec, const RowPtr& row_ptr) {
  if (vec) {
    const int per_row = width / 8;
    for (int e = threadIdx.x; e < rows * per_row; e += blockDim.x) {
      const int r = e / per_row, k = (e - r * per_row) * 8;
      const T* src = row_ptr(r);
      int4 v = make_int4(0, 0, 0, 0);
      if (src != nullptr && k < valid) {
        const int4* p = reinterpret_cast<const int4*>(src + k);
        v = kCrossBlock ? __ldcg(p) : __ldg(p);
      }
      *reinterpret_cast<int4*>(dst + r * ld + k) = v;
    }
  } else {
    for (int e = threadIdx.x; e < rows * width; e += blockDim.x) {
      const int r = e / width, k = e - r * width;
      const T* src = row_ptr(r);
      T v = from_float<T>(0.f);
      if (src != nullptr && k < valid) v = kCrossBlock ? __ldcg(src + k) : src[k];
      dst[r * ld + k] = v;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kLstmPtThreads, 1)
    lstm_persistent_kernel(const LstmPersistentArgs<T> a, const LstmPersistentLayout l) {
#if ELMO_FAST_TENSOR_CORE_ARCH
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  extern __shared__ __align__(128) unsigned char smem[];
  T* s_w = reinterpret_cast<T*>(smem);                     // (4u, ldw): W_hh rows {g n + cell}
  T* s_wp = reinterpret_cast<T*>(smem + l.w_hh_bytes);     // (cols, ldm): W_proj[outputs, cells of the group]
  unsigned char* stage = smem + l.w_hh_bytes + l.w_proj_bytes;
  T* s_h = reinterpret_cast<T*>(stage);                    // (kLstmPtRows, ldw): staged h_prev
  float* s_z = reinterpret_cast<float*>(stage);            // (kLstmPtRows, lds): h_prev . W_slice^T
  T* s_m = reinterpret_cast<T*>(stage);                    // (kLstmPtRows, ldm): staged m

  const int64_t n = a.n, P = a.P, B = a.B;
  const int u = static_cast<int>(l.units), Pp = static_cast<int>(l.Pp), ldw = static_cast<int>(l.ldw),
            lds = static_cast<int>(l.lds), ldm = static_cast<int>(l.ldm), ug = static_cast<int>(l.group_units);
  const int warp = threadIdx.x / 32;
  const int64_t cell0 = int64_t(blockIdx.x) * u;
  const bool has_proj = a.w_proj != nullptr;
  const float out_clip = has_proj ? 0.f : a.proj_clip;  // without a projection the clip applies to m = h
  const bool vec_h = P % 8 == 0 && aligned16(a.hbuf);
  const bool vec_m = n % 8 == 0 && aligned16(a.m);
  // Phase 2 role: cells [c0, c0 + group_units) x outputs [q cols, (q + 1) cols).
  const bool proj_block = has_proj && blockIdx.x < l.unit_groups * l.col_groups;
  const int64_t pg = has_proj ? blockIdx.x / l.col_groups : 0, q = has_proj ? blockIdx.x % l.col_groups : 0;
  const int64_t c0 = pg * l.group_units;
  const int m_valid = proj_block ? static_cast<int>(n - c0 < ug ? n - c0 : ug) : 0;

  stage_rows<false>(s_w, ldw, 4 * u, Pp, static_cast<int>(P), P % 8 == 0 && aligned16(a.w_hh),
                    [&](int row) -> const T* {
                      const int64_t cell = cell0 + row % u;
                      return cell < n ? a.w_hh + ((row / u) * n + cell) * P : nullptr;
                    });
  if (proj_block) {
    stage_rows<false>(s_wp, ldm, static_cast<int>(l.cols), ug, m_valid, n % 8 == 0 && aligned16(a.w_proj),
                      [&](int r) -> const T* {
                        const int64_t out = q * l.cols + r;
                        return out < P ? a.w_proj + out * n + c0 : nullptr;
                      });
  }
  __syncthreads();

  for (int64_t s = a.s_begin; s < a.s_end; ++s) {
    const int64_t off = a.offset[s], active = a.offset[s + 1] - off;
    const int64_t h_row = s == 0 ? 0 : B + a.offset[s - 1];  // Hbuf row of h_prev (Note [LSTM packing])

    // Phase 1: gates, cell state and m of this block's cells, kLstmPtRows batch rows per pass.
    for (int64_t r0 = 0; r0 < active; r0 += kLstmPtRows) {
      const int rows = static_cast<int>(active - r0 < kLstmPtRows ? active - r0 : kLstmPtRows);
      stage_rows<true>(s_h, ldw, kLstmPtRows, Pp, static_cast<int>(P), vec_h,
                       [&](int r) -> const T* { return r < rows ? a.hbuf + (h_row + r0 + r) * P : nullptr; });
      __syncthreads();
      const int row_tiles = (rows + 15) / 16;
      const bool busy = warp < u / 4;  // 4u gate columns = u / 4 tiles of 16
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
      if (busy) {
        wmma::fill_fragment(acc[0], 0.f);
        wmma::fill_fragment(acc[1], 0.f);
        for (int k = 0; k < Pp; k += 16) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> w;
          wmma::load_matrix_sync(w, s_w + warp * 16 * ldw + k, ldw);
#pragma unroll
          for (int rt = 0; rt < 2; ++rt) {
            if (rt < row_tiles) {
              wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> x;
              wmma::load_matrix_sync(x, s_h + rt * 16 * ldw + k, ldw);
              wmma::mma_sync(acc[rt], x, w, acc[rt]);
            }
          }
        }
      }
      __syncthreads();  // the gate scratch overwrites the staged h
      if (busy) {
#pragma unroll
        for (int rt = 0; rt < 2; ++rt) {
          if (rt < row_tiles) wmma::store_matrix_sync(s_z + rt * 16 * lds + warp * 16, acc[rt], lds, wmma::mem_row_major);
        }
      }
      __syncthreads();
      for (int i = threadIdx.x; i < rows * u; i += blockDim.x) {
        const int r = i / u, k = i - r * u;
        const int64_t cell = cell0 + k;
        if (cell >= n) continue;
        const int64_t row = off + r0 + r, sorted = r0 + r;  // packed row; row of the sorted state
        const T* g = a.g + (row - a.g_base) * 4 * n + cell;
        const float* z = s_z + r * lds + k;
        float* c = a.c + sorted * n + cell;
        float cu = *c, gi, gf, gj, go;
        const float mu = lstm_point_forward(z[0] + to_float(g[0]), z[u] + to_float(g[n]), z[2 * u] + to_float(g[2 * n]),
                                            z[3 * u] + to_float(g[3 * n]), &cu, a.cell_clip, out_clip, &gi, &gf, &gj,
                                            &go);
        *c = cu;
        if (a.gates_out != nullptr) {
          float* saved = a.gates_out + row * 4 * n + cell;
          saved[0] = gi;
          saved[n] = gf;
          saved[2 * n] = gj;
          saved[3 * n] = go;
        }
        if (a.c_out != nullptr) a.c_out[row * n + cell] = cu;
        if (has_proj) {
          a.m[sorted * n + cell] = from_float<T>(mu);
        } else {
          a.hbuf[(B + row) * P + cell] = from_float<T>(mu);
        }
      }
      __syncthreads();  // the next pass restages
    }
    grid.sync();
    if (!has_proj) continue;

    // Phase 2: this block's partial sums of the projection.
    if (proj_block) {
      const int col_tiles = static_cast<int>(l.cols / 16);
      for (int64_t r0 = 0; r0 < active; r0 += kLstmPtRows) {
        const int rows = static_cast<int>(active - r0 < kLstmPtRows ? active - r0 : kLstmPtRows);
        stage_rows<true>(s_m, ldm, kLstmPtRows, ug, m_valid, vec_m,
                         [&](int r) -> const T* { return r < rows ? a.m + (r0 + r) * n + c0 : nullptr; });
        __syncthreads();
        const int row_tiles = (rows + 15) / 16;
        for (int t = warp; t < row_tiles * col_tiles; t += kLstmPtWarps) {
          const int rt = t / col_tiles, ct = t - rt * col_tiles;
          wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
          wmma::fill_fragment(acc, 0.f);
          for (int k = 0; k < ug; k += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> x;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> w;
            wmma::load_matrix_sync(x, s_m + rt * 16 * ldm + k, ldm);
            wmma::load_matrix_sync(w, s_wp + ct * 16 * ldm + k, ldm);
            wmma::mma_sync(acc, x, w, acc);
          }
          float* dst = a.partial + (pg * a.rows_pad + r0 + rt * 16) * l.Pcols + q * l.cols + ct * 16;
          wmma::store_matrix_sync(dst, acc, static_cast<unsigned>(l.Pcols), wmma::mem_row_major);
        }
        __syncthreads();  // the next pass restages
      }
    }
    grid.sync();

    // Phase 3: h = clip(sum of the partials), summed in group order.
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < active * P;
         i += int64_t(gridDim.x) * blockDim.x) {
      const int64_t r = i / P, col = i - r * P;
      const float* src = a.partial + r * l.Pcols + col;
      float sum = 0.f;
      for (int64_t p = 0; p < l.unit_groups; ++p) sum += __ldcg(src + p * a.rows_pad * l.Pcols);
      a.hbuf[(B + off + r) * P + col] = from_float<T>(ef_clip(sum, a.proj_clip));
    }
    grid.sync();
  }
#else
  __trap();
#endif
}

// The dynamic shared-memory limit belongs to the kernel (per device), not to a launch: were it set to
// each call's size, a thread launching a smaller layout could lower it between another thread's set and
// launch. So it is raised once per device to the device's opt-in maximum, which the layouts never exceed
// (persistent_obstacle checks them against it), and never lowered.
template <typename T>
cudaError_t allow_shared() {
  static std::mutex mutex;
  static std::set<int> raised;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(mutex);
  if (raised.count(device) != 0) return cudaSuccess;
  int max_optin = 0;
  err = cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  cudaFuncAttributes attributes{};
  err = cudaFuncGetAttributes(&attributes, lstm_persistent_kernel<T>);
  if (err != cudaSuccess) return err;
  const int dynamic_max = max_optin - static_cast<int>(attributes.sharedSizeBytes);  // static + dynamic <= opt-in
  err = cudaFuncSetAttribute(lstm_persistent_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_max);
  if (err == cudaSuccess) raised.insert(device);
  return err;
}

}  // namespace

template <typename T>
cudaError_t launch_lstm_persistent(const LstmPersistentArgs<T>& args, const LstmPersistentLayout& layout,
                                   cudaStream_t stream) {
  if (args.s_begin >= args.s_end) return cudaSuccess;
  cudaError_t err = allow_shared<T>();
  if (err != cudaSuccess) return err;
  LstmPersistentArgs<T> a = args;
  LstmPersistentLayout l = layout;
  void* params[] = {&a, &l};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&lstm_persistent_kernel<T>),
                                     dim3(static_cast<unsigned>(layout.blocks)), dim3(kLstmPtThreads), params,
                                     layout.shared_bytes, stream);
}

template <typename T>
cudaError_t lstm_persistent_blocks_per_sm(size_t shared_bytes, int* blocks) {
  *blocks = 0;
  const cudaError_t err = allow_shared<T>();
  if (err != cudaSuccess) return err;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, lstm_persistent_kernel<T>, kLstmPtThreads,
                                                       shared_bytes);
}

#define EF_INSTANTIATE(T)                                                                                    \
  template cudaError_t launch_lstm_persistent<T>(const LstmPersistentArgs<T>&, const LstmPersistentLayout&, \
                                                 cudaStream_t);                                              \
  template cudaError_t lstm_persistent_blocks_per_sm<T>(size_t, int*);
EF_INSTANTIATE(__half)
EF_INSTANTIATE(__nv_bfloat16)
#undef EF_INSTANTIATE

}  // namespace cuda
}  // namespace elmo_fast
