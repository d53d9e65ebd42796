// Kernel selection per op family (csrc/common/kernel_choice.h) and its private ops.
#include "common/kernel_choice.h"

#include "elmo_fast/char_cnn_tc_layout.h"
#include "elmo_fast/lstm_persistent_layout.h"

#include <array>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/library.h>

namespace elmo_fast::kernels {
namespace {

struct FamilyInfo {
  const char* name;
  const char* env;
  std::vector<std::string> choices;    // without "auto"
  std::vector<std::string> validated;  // Note [validated kernels]: the fast paths auto may pick
};

constexpr size_t kFamilies = 4;  // the order of Family in kernel_choice.h

const std::array<FamilyInfo, kFamilies>& families() {
  // tensor_core, streams and on: written without a GPU (2026-12-02), persistent (2026-12-05); none
  // has run on one yet.
  static const std::array<FamilyInfo, kFamilies> all{{
      {"char_cnn", "ELMO_FAST_CHAR_CNN_KERNEL", {"simt", "tensor_core"}, {}},
      {"cuda_directions", "ELMO_FAST_CUDA_DIRECTIONS", {"serial", "streams"}, {}},
      {"cuda_graphs", "ELMO_FAST_CUDA_GRAPHS", {"off", "on"}, {}},
      {"lstm", "ELMO_FAST_LSTM_KERNEL", {"stepwise", "persistent"}, {}},
  }};
  return all;
}

std::mutex g_mutex;
std::array<std::string, kFamilies> g_modes;  // "" = not read from the environment yet

const FamilyInfo& info_of(Family f) { return families()[static_cast<int>(f)]; }

std::string checked(const FamilyInfo& fam, const std::string& value, const char* source) {
  if (value == "auto") return value;
  for (const std::string& c : fam.choices) {
    if (value == c) return value;
  }
  std::ostringstream allowed;
  allowed << "'auto'";
  for (const std::string& c : fam.choices) allowed << ", '" << c << "'";
  TORCH_CHECK_VALUE(false, source, " must be one of ", allowed.str(), ", got '", value, "'");
}

std::string mode_locked(Family f) {
  std::string& m = g_modes[static_cast<int>(f)];
  if (m.empty()) {
    const FamilyInfo& fam = info_of(f);
    const char* env = std::getenv(fam.env);
    m = env != nullptr && *env != '\0' ? checked(fam, env, fam.env) : "auto";
  }
  return m;
}

}  // namespace

std::string mode(Family f) {
  std::lock_guard<std::mutex> lock(g_mutex);
  return mode_locked(f);
}

Family family_named(const std::string& family) {
  for (size_t i = 0; i < families().size(); ++i) {
    if (family == families()[i].name) return static_cast<Family>(i);
  }
  std::ostringstream known;
  for (size_t i = 0; i < families().size(); ++i) known << (i ? ", '" : "'") << families()[i].name << "'";
  TORCH_CHECK_VALUE(false, "elmo_fast: unknown kernel family '", family, "' (known: ", known.str(), ")");
}

void set_mode(const std::string& family, const std::string& value) {
  const Family f = family_named(family);
  const std::string m = checked(info_of(f), value, ("elmo_fast kernel for " + family).c_str());
  std::lock_guard<std::mutex> lock(g_mutex);
  g_modes[static_cast<int>(f)] = m;
}

bool validated(Family f, const std::string& kernel) {
  for (const std::string& v : info_of(f).validated) {
    if (v == kernel) return true;
  }
  return false;
}

bool take(Family f, const std::string& kernel, const char* op, const std::function<std::string()>& obstacle) {
  if (!chosen(f, kernel)) return false;
  const std::string why = obstacle();
  if (why.empty()) return true;
  const FamilyInfo& fam = info_of(f);
  std::ostringstream others;
  others << "'auto'";
  for (const std::string& c : fam.choices) {
    if (c != kernel) others << " or '" << c << "'";
  }
  TORCH_CHECK(mode(f) == "auto", op, ": the ", kernel, " kernel was asked for (", fam.env,
              " or elmo_fast.set_kernel) but ", why, "; use ", others.str());
  return false;
}

std::string info_json() {
  std::ostringstream s;
  s << "{";
  for (size_t i = 0; i < families().size(); ++i) {
    const FamilyInfo& fam = families()[i];
    auto list = [&](const std::vector<std::string>& v) {
      s << "[";
      for (size_t k = 0; k < v.size(); ++k) s << (k ? ", " : "") << "\"" << v[k] << "\"";
      s << "]";
    };
    s << (i ? ", " : "") << "\"" << fam.name << "\": {\"env\": \"" << fam.env << "\", \"mode\": \""
      << mode(static_cast<Family>(i)) << "\", \"choices\": ";
    list(fam.choices);
    s << ", \"validated\": ";
    list(fam.validated);
    s << "}";
  }
  s << "}";
  return s.str();
}

}  // namespace elmo_fast::kernels

namespace {

void set_kernel_op(c10::string_view family, c10::string_view mode) {
  elmo_fast::kernels::set_mode(std::string(family), std::string(mode));
}

std::string kernel_info_op() { return elmo_fast::kernels::info_json(); }

bool kernel_chosen_op(c10::string_view family, c10::string_view kernel) {
  return elmo_fast::kernels::chosen(elmo_fast::kernels::family_named(std::string(family)), std::string(kernel));
}

// [dp, Kp, Fp, ksteps, slot, shared_bytes, grid_y, fits] of the tensor-core char-CNN for a shape,
// so that the layout's invariants are tested in every build (the kernel itself needs a GPU).
std::vector<int64_t> char_cnn_tc_layout_op(int64_t C, int64_t d, int64_t w_min, int64_t w_max, int64_t F) {
  TORCH_CHECK(d >= 1 && F >= 1 && 1 <= w_min && w_min <= w_max && w_max <= C,
              "_char_cnn_tc_layout: needs d, F >= 1 and 1 <= w_min <= w_max <= C");
  const elmo_fast::CharCnnTcLayout l = elmo_fast::char_cnn_tc_layout(C, d, w_min, w_max, F);
  return {l.dp, l.Kp, l.Fp, l.ksteps, l.slot, static_cast<int64_t>(l.shared_bytes), l.grid_y,
          elmo_fast::char_cnn_tc_fits(l) ? 1 : 0};
}

// The persistent LSTM's layout for n cells, P recurrent inputs and `sms` multiprocessors with
// `max_shared` bytes of shared memory per block (one block per multiprocessor): [units, blocks, Pp,
// ldw, lds, col_groups, cols, unit_groups, group_units, ldm, Pcols, w_hh_bytes, w_proj_bytes,
// stage_bytes, shared_bytes, fits], so that every build tests it (the kernel itself needs a GPU).
std::vector<int64_t> lstm_persistent_layout_op(int64_t n, int64_t P, bool has_proj, int64_t sms, int64_t max_shared) {
  TORCH_CHECK(n >= 1 && P >= 1 && sms >= 1 && max_shared >= 0, "_lstm_persistent_layout: needs n, P, sms >= 1");
  const elmo_fast::LstmPersistentLayout l = elmo_fast::lstm_persistent_layout(n, P, has_proj, 2, sms);
  const bool fits = elmo_fast::lstm_persistent_fits(l, sms, static_cast<size_t>(max_shared), sms);
  return {l.units, l.blocks, l.Pp, l.ldw, l.lds, l.col_groups, l.cols, l.unit_groups, l.group_units, l.ldm, l.Pcols,
          static_cast<int64_t>(l.w_hh_bytes), static_cast<int64_t>(l.w_proj_bytes),
          static_cast<int64_t>(l.stage_bytes), static_cast<int64_t>(l.shared_bytes), fits ? 1 : 0};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(elmo_fast, m) {
  m.def("_set_kernel(str family, str mode) -> ()", &set_kernel_op);
  m.def("_kernel_info() -> str", &kernel_info_op);
  m.def("_kernel_chosen(str family, str kernel) -> bool", &kernel_chosen_op);
  m.def("_char_cnn_tc_layout(int C, int d, int w_min, int w_max, int F) -> int[]", &char_cnn_tc_layout_op);
  m.def("_lstm_persistent_layout(int n, int P, bool has_proj, int sms, int max_shared) -> int[]",
        &lstm_persistent_layout_op);
}
