// ctypes entry points of the CUDA simulator (Note [CUDA simulator] in tests/cuda_sim/__init__.py): each
// calls one launcher of csrc/cuda with the storage type picked by a dtype code (0 float, 1 half,
// 2 bfloat16) and returns its cudaError_t. Pointers are CPU tensors' data.
#include "cuda_sim.h"  // first, as in the translated kernels: the simulated device's limits and runtime

#include <cstdint>

#include "elmo_fast/char_cnn_launch.h"
#include "elmo_fast/char_cnn_tc_layout.h"
#include "elmo_fast/highway_launch.h"
#include "elmo_fast/lstm_launch.h"
#include "elmo_fast/lstm_persistent_layout.h"

using namespace elmo_fast;
using namespace elmo_fast::cuda;

namespace {

template <typename F>
int by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: return int(f(float{}));
    case 1: return int(f(__half{}));
    case 2: return int(f(__nv_bfloat16{}));
    default: return int(cudaErrorInvalidValue);
  }
}

template <typename F>
int by_half_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 1: return int(f(__half{}));
    case 2: return int(f(__nv_bfloat16{}));
    default: return int(cudaErrorInvalidValue);
  }
}

#define T_OF(tag) using T = decltype(tag)

CharCnnGroups groups_of(int n, const int* f0, const int* w) {
  CharCnnGroups g{};
  g.n = n;
  for (int i = 0; i <= n; ++i) g.f0[i] = f0[i];
  for (int i = 0; i < n; ++i) g.w[i] = w[i];
  return g;
}

}  // namespace

extern "C" {

int sim_highway_forward(int dtype, void* proj, const void* x, void* y, int64_t N, int64_t F, int save) {
  return by_dtype(dtype, [&](auto tag) {
    T_OF(tag);
    return launch_highway_forward<T>(static_cast<T*>(proj), static_cast<const T*>(x), static_cast<T*>(y), N, F,
                                     save != 0, nullptr);
  });
}

int sim_highway_mix(int dtype, const void* act, const void* x, void* y, int64_t N, int64_t F) {
  return by_dtype(dtype, [&](auto tag) {
    T_OF(tag);
    return launch_highway_mix<T>(static_cast<const T*>(act), static_cast<const T*>(x), static_cast<T*>(y), N, F,
                                 nullptr);
  });
}

int sim_highway_backward(int dtype, const void* dy, const void* x, const void* act, void* d_proj, void* dx, int64_t N,
                         int64_t F) {
  return by_dtype(dtype, [&](auto tag) {
    T_OF(tag);
    return launch_highway_backward<T>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(act),
                                      static_cast<T*>(d_proj), static_cast<T*>(dx), N, F, nullptr);
  });
}

int sim_lstm_forward(int dtype, const void* z, float* gates, float* c, float* c_save, void* m, int64_t A, int64_t n,
                     float cell_clip, float out_clip) {
  return by_dtype(dtype, [&](auto tag) {
    T_OF(tag);
    return launch_lstm_forward<T>(static_cast<const T*>(z), gates, c, c_save, static_cast<T*>(m), A, n, cell_clip,
                                  out_clip, nullptr);
  });
}

int sim_lstm_clip(int dtype, void* h, int64_t count, float limit) {
  return by_dtype(dtype, [&](auto tag) {
    T_OF(tag);
    return launch_lstm_clip<T>(static_cast<T*>(h), count, limit, nullptr);
  });
}

int sim_lstm_proj_backward(int dtype, const void* dh_future, void* d, const void* h, int64_t count, float proj_clip) {
  return by_dtype(dtype, [&](auto tag) {
    T_OF(tag);
    return launch_lstm_proj_backward<T>(static_cast<const T*>(dh_future), static_cast<T*>(d),
                                        static_cast<const T*>(h), count, proj_clip, nullptr);
  });
}

int sim_lstm_backward(int dtype, const void* dm, const float* gates, const float* c, const float* c_prev, float* dc,
                      void* dz, void* m, int64_t A, int64_t n, float cell_clip) {
  return by_dtype(dtype, [&](auto tag) {
    T_OF(tag);
    return launch_lstm_backward<T>(static_cast<const T*>(dm), gates, c, c_prev, dc, static_cast<T*>(dz),
                                   static_cast<T*>(m), A, n, cell_clip, nullptr);
  });
}

// groups: n groups, f0 (n + 1,), w (n,).
int sim_char_cnn_forward(int dtype, const int64_t* ids, const void* emb, const void* packed_t, const void* bias,
                         void* out, int16_t* windows, int64_t N, int64_t C, int64_t V, int64_t d, int64_t F, int64_t K,
                         int groups_n, const int* f0, const int* w, int use_tanh) {
  const CharCnnGroups groups = groups_of(groups_n, f0, w);
  return by_dtype(dtype, [&](auto tag) {
    T_OF(tag);
    return launch_char_cnn_forward<T>(ids, static_cast<const T*>(emb), static_cast<const T*>(packed_t),
                                      static_cast<const T*>(bias), static_cast<T*>(out), windows, N, C, V, d, F, K,
                                      groups, use_tanh != 0, nullptr);
  });
}

int sim_char_cnn_backward(int dtype, const void* grad_out, const void* out, const int16_t* windows, const int64_t* ids,
                          const void* emb, const void* packed_t, float* g, float* part, float* part_bias,
                          int64_t splits, float* grad_packed_t, float* grad_bias, float* grad_emb, int64_t N,
                          int64_t C, int64_t V, int64_t d, int64_t F, int64_t K, int groups_n, const int* f0,
                          const int* w, int use_tanh) {
  const CharCnnGroups groups = groups_of(groups_n, f0, w);
  return by_dtype(dtype, [&](auto tag) {
    T_OF(tag);
    return launch_char_cnn_backward<T>(static_cast<const T*>(grad_out), static_cast<const T*>(out), windows, ids,
                                       static_cast<const T*>(emb), static_cast<const T*>(packed_t), g, part,
                                       part_bias, splits, grad_packed_t, grad_bias, grad_emb, N, C, V, d, F, K,
                                       groups, use_tanh != 0, nullptr);
  });
}

// layout (out): dp, Kp, Fp, ksteps, slot, shared_bytes, grid_y, fits.
void sim_char_cnn_tc_layout(int64_t C, int64_t d, int64_t w_min, int64_t w_max, int64_t F, int64_t* layout) {
  const CharCnnTcLayout l = char_cnn_tc_layout(C, d, w_min, w_max, F);
  const int64_t values[] = {l.dp, l.Kp, l.Fp, l.ksteps, l.slot, int64_t(l.shared_bytes), l.grid_y,
                            char_cnn_tc_fits(l) ? 1 : 0};
  for (int i = 0; i < 8; ++i) layout[i] = values[i];
}

int sim_char_cnn_forward_tc(int dtype, const int64_t* ids, const void* emb_p, const void* packed_p, const void* bias,
                            void* out, int16_t* windows, int64_t N, int64_t C, int64_t V, int64_t d, int64_t F,
                            int64_t w_min, int64_t w_max, int groups_n, const int* f0, const int* w, int use_tanh) {
  const CharCnnGroups groups = groups_of(groups_n, f0, w);
  const CharCnnTcLayout layout = char_cnn_tc_layout(C, d, w_min, w_max, F);
  return by_half_dtype(dtype, [&](auto tag) {
    T_OF(tag);
    return launch_char_cnn_forward_tc<T>(ids, static_cast<const T*>(emb_p), static_cast<const T*>(packed_p),
                                         static_cast<const T*>(bias), static_cast<T*>(out), windows, N, C, V, F,
                                         w_min, layout, groups, use_tanh != 0, nullptr);
  });
}

// layout (out, 14 values): units, blocks, Pp, ldw, lds, col_groups, cols, unit_groups, group_units, ldm, Pcols,
// shared_bytes, fits (on the simulated device), sms.
void sim_lstm_persistent_layout(int64_t n, int64_t P, int has_proj, int64_t sms, int64_t* layout) {
  const LstmPersistentLayout l = lstm_persistent_layout(n, P, has_proj != 0, 2, sms);
  const int64_t values[] = {l.units,       l.blocks, l.Pp,    l.ldw,  l.lds,  l.col_groups, l.cols,
                            l.unit_groups, l.group_units, l.ldm, l.Pcols, int64_t(l.shared_bytes),
                            lstm_persistent_fits(l, sms, ef_sim::kOptinShared, sms) ? 1 : 0, sms};
  for (int i = 0; i < 14; ++i) layout[i] = values[i];
}

// One launch over steps [s_begin, s_end) (Note [persistent LSTM]); sms picks the layout as the glue does.
int sim_lstm_persistent(int dtype, const void* g, int64_t g_base, const void* w_hh, const void* w_proj, void* hbuf,
                        float* c, float* gates_out, float* c_out, void* m, float* partial, const int64_t* offset,
                        int64_t B, int64_t n, int64_t P, int64_t rows_pad, int64_t s_begin, int64_t s_end,
                        float cell_clip, float proj_clip, int64_t sms) {
  const LstmPersistentLayout layout = lstm_persistent_layout(n, P, w_proj != nullptr, 2, sms);
  return by_half_dtype(dtype, [&](auto tag) {
    T_OF(tag);
    int per_sm = 0;
    cudaError_t err = lstm_persistent_blocks_per_sm<T>(layout.shared_bytes, &per_sm);
    if (err != cudaSuccess) return err;
    if (!lstm_persistent_fits(layout, sms, ef_sim::kOptinShared, int64_t(per_sm) * sms)) {
      return cudaErrorInvalidConfiguration;
    }
    LstmPersistentArgs<T> a;
    a.g = static_cast<const T*>(g);
    a.g_base = g_base;
    a.w_hh = static_cast<const T*>(w_hh);
    a.w_proj = static_cast<const T*>(w_proj);
    a.hbuf = static_cast<T*>(hbuf);
    a.c = c;
    a.gates_out = gates_out;
    a.c_out = c_out;
    a.m = static_cast<T*>(m);
    a.partial = partial;
    a.offset = offset;
    a.B = B;
    a.n = n;
    a.P = P;
    a.rows_pad = rows_pad;
    a.s_begin = s_begin;
    a.s_end = s_end;
    a.cell_clip = cell_clip;
    a.proj_clip = proj_clip;
    return launch_lstm_persistent<T>(a, layout, nullptr);
  });
}

}  // extern "C"
