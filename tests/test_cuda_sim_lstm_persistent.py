"""The persistent LSTM forward (csrc/cuda/lstm_persistent.cu, Note [persistent LSTM]) run in the CPU simulator
(Note [CUDA simulator]) over whole sequences, in float16 and bfloat16.

The inputs are built as the glue builds them (csrc/cuda/lstm_persistent_glue.cpp, csrc/common/lstm_driver.h,
Note [LSTM packing] in csrc/common/lstm_plan.h): rows sorted by length, packed step-major; g the hoisted input
GEMM with bias in the storage type, row k = packed row g_base + k, one buffer per launch; hbuf (B + total, P)
with the sorted initial h in rows [0, B); the float cell state of the sorted rows; the scratch m (B, n) and
partial (unit_groups, rows_pad, Pcols). Every buffer the kernel should write first is filled with NaN.

The kernel is compared with `emulate`: the same recurrence in float64, but rounding to the storage type
exactly where the kernel stores in it (g, m before the projection, h at every step), and reading each step's
h_prev from the kernel's own hbuf (teacher forcing). Nothing accumulates then, so h must match to one storage
ulp and the float results (c, saved gates and cell states) to float32 precision: far below what a wrong
index, a missed barrier or a lost rounding gives. The gathered outputs are also checked against
elmo_fast.reference.lstm_projection, and test_emulation_matches_reference ties `emulate` (without rounding)
and the packing bookkeeping (make_plan, unpack) to it exactly.
"""
import ctypes
from dataclasses import dataclass, field
from typing import List, Optional

import pytest
import torch

import elmo_fast.reference as R
from sim_util import check, code, f32, i64, ptr, sim  # noqa: F401 (fixture)
from util import make_plan

HALF_DTYPES = [torch.float16, torch.bfloat16]
ROWS = 32  # kLstmPtRows: rows_pad = B rounded up to it
LAYOUT_KEYS = ["units", "blocks", "Pp", "ldw", "lds", "col_groups", "cols", "unit_groups", "group_units", "ldm",
               "Pcols", "shared_bytes", "fits", "sms"]
NAN = float("nan")
GUARD = 4  # NaN rows around each launch's g


def layout(sim, n, P, has_proj, sms):
    """lstm_persistent_layout(n, P, has_proj, 2, sms) and whether it fits the simulated device."""
    out = (ctypes.c_int64 * len(LAYOUT_KEYS))()
    sim.sim_lstm_persistent_layout(*i64(n, P), ctypes.c_int(int(has_proj)), *i64(sms), out)
    return dict(zip(LAYOUT_KEYS, out))


@dataclass
class Case:
    """One call of lstm_projection: shapes, lengths and options. P None: no projection (P = n)."""
    B: int
    T: int
    n: int
    P: Optional[int]
    lengths: List[int]
    sms: int
    I: int = 6
    reverse: bool = False
    cell_clip: float = 0.0
    proj_clip: float = 0.0
    state: bool = False        # non-zero h0, c0
    save: bool = True          # gates_out / c_out (training)
    split: Optional[int] = None  # launch steps [0, split) and [split, steps) separately
    expect: dict = field(default_factory=dict)  # layout values the case is meant to cover

    @property
    def p(self):
        return self.n if self.P is None else self.P


# What each case adds; `expect` pins the layout it is meant to cover (units: cells per block). Without
# `split` the whole sequence is one launch with gates / c_out saved, as in training; the split cases run
# as inference does (nothing saved, g in chunks).
CASES = {
    # One row, one step, one block of 16 cells; P = 12 < n, not a multiple of 8 (element-wise staging).
    "B1_T1": Case(1, 1, 16, 12, [1], sms=1, expect=dict(units=16, blocks=1, unit_groups=1, col_groups=1)),
    # 40 rows (35, 30, 25.. active: two 32-row passes at step 0), ragged with rows of length 0, reversed,
    # both clips, initial state; n = 36: the last of 5 blocks has 4 real cells of 8, m staged element-wise.
    "ragged_reverse_clips": Case(40, 5, 36, 12, [5, 0, 3, 1, 5, 2, 4, 4] * 5, sms=8, reverse=True, cell_clip=0.5,
                                 proj_clip=0.3, state=True, expect=dict(units=8, blocks=5, unit_groups=3)),
    # 2 column groups x 4 unit groups of the projection (P = 76 > 64), element-wise h staging.
    "col_and_unit_groups": Case(20, 3, 64, 76, [3, 2, 3, 1] * 5, sms=8, state=True, cell_clip=0.7,
                                expect=dict(units=8, blocks=8, col_groups=2, unit_groups=4)),
    # P and n multiples of 8: the 16-byte vector staging of h, m and both weights; 3 blocks of 16 cells.
    "vector_staging": Case(9, 4, 40, 48, [4, 4, 2, 3, 1, 4, 0, 2, 3], sms=3, state=True, proj_clip=0.5,
                           expect=dict(units=16, blocks=3, col_groups=1, unit_groups=3)),
    # No projection (P = n): h = clip(m), written by phase 1; 3 blocks; the clip applies to h.
    "no_proj": Case(7, 4, 24, None, [4, 1, 3, 4, 0, 2, 4], sms=3, state=True, cell_clip=0.6, proj_clip=0.25,
                    reverse=True, expect=dict(units=8, blocks=3, col_groups=0)),
    # No projection, one block of 32 cells (every warp busy), 34 rows, vector staging, no clips.
    "no_proj_one_block": Case(34, 3, 32, None, [3] * 17 + [2] * 10 + [1] * 7, sms=1,
                              expect=dict(units=32, blocks=1)),
    # Two launches, steps [0, 2) and [2, 6), the second reading its own g buffer at g_base = offset[2].
    "split": Case(12, 6, 32, 20, [6, 5, 6, 2, 3, 1, 6, 4, 0, 6, 2, 5], sms=8, split=2, save=False, state=True,
                  cell_clip=0.8, expect=dict(units=4, blocks=8, unit_groups=2)),
    # The same without a projection, reversed, split at step 3.
    "split_no_proj": Case(5, 5, 16, None, [5, 3, 5, 1, 4], sms=3, split=3, save=False, reverse=True, state=True,
                          expect=dict(units=8, blocks=2)),
}


def make_inputs(case, seed, dtype):
    """float64 values of the op's inputs, each representable in `dtype` (what the kernel reads)."""
    gen = torch.Generator().manual_seed(seed)
    B, T, I, n, P = case.B, case.T, case.I, case.n, case.p

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return t.to(dtype).double() if dtype is not None else t

    t = dict(x=rand(B, T, I), w_ih=rand(4 * n, I, scale=1.5 / I ** 0.5), w_hh=rand(4 * n, P, scale=1.5 / P ** 0.5),
             bias=rand(4 * n, scale=0.5),
             w_proj=rand(P, n, scale=2.0 / n ** 0.5) if case.P is not None else None,
             h0=rand(B, P, scale=0.5 if case.state else 0.0), c0=rand(B, n, scale=1.0 if case.state else 0.0))
    t["bias"][n:2 * n] += 1.0  # the forget bias, as in ELMo
    return t


def clip(v, limit):
    return v.clamp(-limit, limit) if limit > 0 else v


def emulate(t, plan, case, dtype, h_source=None):
    """The kernel's recurrence in float64 over packed rows, rounding to `dtype` where the kernel stores in it
    (None: no rounding). Returns g (packed, rounded: the kernel's input), hbuf, c of the sorted rows,
    gates_all and c_all (packed). With h_source (an hbuf of the kernel), each step reads its h_prev from
    rows B.. of h_source instead of its own results (teacher forcing: each step is compared on its own)."""
    rnd = (lambda v: v.to(dtype).double()) if dtype is not None else (lambda v: v)
    B, T, n, P = case.B, case.T, case.n, case.p
    g = rnd(t["x"].reshape(B * T, -1)[plan.pack] @ t["w_ih"].T + t["bias"])  # the glue's input GEMM
    hbuf = torch.zeros(B + plan.total, P, dtype=torch.float64)
    hbuf[:B] = t["h0"][plan.perm]
    c = t["c0"][plan.perm].clone()
    gates_all = torch.zeros(plan.total, 4 * n, dtype=torch.float64)
    c_all = torch.zeros(plan.total, n, dtype=torch.float64)
    source = hbuf
    if h_source is not None:
        source = h_source.double().clone()
        source[:B] = hbuf[:B]
    for s in range(plan.steps):
        a, off = plan.active[s], plan.offset[s]
        z = source[plan.h_row(s):plan.h_row(s) + a] @ t["w_hh"].T + g[off:off + a]
        i, f, o = (torch.sigmoid(z[:, k * n:(k + 1) * n]) for k in (0, 1, 3))
        j = torch.tanh(z[:, 2 * n:3 * n])
        c[:a] = clip(f * c[:a] + i * j, case.cell_clip)
        m = o * torch.tanh(c[:a])
        h = clip(rnd(m) @ t["w_proj"].T, case.proj_clip) if t["w_proj"] is not None else clip(m, case.proj_clip)
        hbuf[B + off:B + off + a] = rnd(h)
        gates_all[off:off + a] = torch.cat([i, f, j, o], 1)
        c_all[off:off + a] = c[:a]
    return g, hbuf, c, gates_all, c_all


def unpack(plan, hbuf, c_sorted, T):
    """out (B, T, P), h_n, c_n from the packed results, as the driver gathers them."""
    B, P = plan.B, hbuf.shape[1]
    out = torch.zeros(B * T, P, dtype=hbuf.dtype)
    out[plan.pack] = hbuf[B:]
    h_n, c_n = torch.empty(B, P, dtype=hbuf.dtype), torch.empty(B, c_sorted.shape[1], dtype=c_sorted.dtype)
    h_n[plan.perm] = hbuf[plan.last]
    c_n[plan.perm] = c_sorted
    return out.view(B, T, P), h_n, c_n


def run_kernel(sim, case, t, plan, g, dtype, lay):
    """The glue's buffers and launches (one, or two with case.split); returns hbuf, c, gates_all, c_all."""
    B, n, P = case.B, case.n, case.p
    has_proj = t["w_proj"] is not None
    stored = lambda v: v.to(dtype).contiguous()  # noqa: E731 (exact: the values are representable)
    w_hh, w_proj = stored(t["w_hh"]), stored(t["w_proj"]) if has_proj else None
    hbuf = torch.full((B + plan.total, P), NAN, dtype=dtype)
    hbuf[:B] = stored(t["h0"][plan.perm])
    c = t["c0"][plan.perm].to(dtype).float().contiguous()  # c0 is in the storage type; the state is float
    gates_all = torch.full((plan.total, 4 * n), NAN) if case.save else None
    c_all = torch.full((plan.total, n), NAN) if case.save else None
    rows_pad = -(-B // ROWS) * ROWS
    m = torch.full((B, n), NAN, dtype=dtype) if has_proj else None
    partial = torch.full((lay["unit_groups"] * rows_pad * lay["Pcols"],), NAN) if has_proj else None
    offset = torch.tensor(plan.offset, dtype=torch.int64)
    bounds = [0, plan.steps] if case.split is None else [0, case.split, plan.steps]
    for s_begin, s_end in zip(bounds, bounds[1:]):
        g_base = plan.offset[s_begin]
        rows = plan.offset[s_end] - g_base  # this launch's rows only (the glue's inference chunks),
        guarded = torch.full((rows + 2 * GUARD, 4 * n), NAN, dtype=dtype)  # between NaN rows: a read outside shows
        guarded[GUARD:GUARD + rows] = stored(g[g_base:g_base + rows])
        g_chunk = guarded[GUARD:GUARD + rows]
        err = sim.sim_lstm_persistent(code(dtype), ptr(g_chunk), *i64(g_base), ptr(w_hh), ptr(w_proj), ptr(hbuf),
                                      ptr(c), ptr(gates_all), ptr(c_all), ptr(m), ptr(partial), ptr(offset),
                                      *i64(B, n, P, rows_pad, s_begin, s_end), *f32(case.cell_clip, case.proj_clip),
                                      *i64(case.sms))
        check(err, f"lstm_persistent steps [{s_begin}, {s_end})")
    return hbuf, c, gates_all, c_all


def check_close(got, want, rtol, atol, what):
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# Float32 arithmetic (tensor-core products accumulate in float; the simulator's expf is within 2 ulp of
# float's) against float64, over at most a few steps of accumulation into c: a few 1e-7, with headroom.
FLOAT_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_persistent_forward(sim, dtype, name):
    """Step by step, each step of the kernel matches the rounding emulation fed the kernel's own h_prev
    (teacher forcing, so nothing accumulates): h to one storage ulp, c and the saved gates / cell states
    to float32 precision. Then the gathered out, h_n, c_n match the float64 reference op."""
    case = CASES[name]
    lay = layout(sim, case.n, case.p, case.P is not None, case.sms)
    # Every case is sized to fit the simulated device: a skip here once hid a broken fit check.
    assert lay["fits"], f"the case no longer fits the simulated device: {lay}"
    assert {k: lay[k] for k in case.expect} == case.expect, lay  # the case still covers what it says
    t = make_inputs(case, seed=sum(map(ord, name)), dtype=dtype)
    plan = make_plan(case.lengths, case.T, case.reverse)
    g, *_ = emulate(t, plan, case, dtype)
    hbuf, c, gates_all, c_all = run_kernel(sim, case, t, plan, g, dtype, lay)
    _, want_hbuf, want_c, want_gates, want_c_all = emulate(t, plan, case, dtype, h_source=hbuf)

    # h: the kernel and the emulation round the same value, computed in float32 and float64, to the storage
    # type; they differ where that value lies within ~1e-6 of a rounding boundary, by one ulp (<= eps |h|).
    # With a projection, m is rounded too, and a flipped m_k moves h by |W_proj[:, k]| ulp(m_k) <=
    # |W_proj| eps / 2 (|m| < 1): atol allows two such flips in one output.
    eps = torch.finfo(dtype).eps
    atol = eps * t["w_proj"].abs().max().item() if t["w_proj"] is not None else 1e-7  # 1e-7: half's subnormals
    assert not hbuf.isnan().any(), "h rows left unwritten"
    check_close(hbuf, want_hbuf, eps, atol, "h")
    check_close(c, want_c, **FLOAT_TOL, what="c")
    if case.save:
        check_close(gates_all, want_gates, **FLOAT_TOL, what="gates")
        check_close(c_all, want_c_all, **FLOAT_TOL, what="c_out")

    # The gathered outputs against the reference op on the same (rounded) inputs, not teacher-forced: the
    # half-precision recurrence rounds m and h every step (each <= eps / 2 relative), and carries earlier
    # errors on with a gain below one at these weight scales: T eps (the worst seen is ~0.2 of it).
    out, h_n, c_n = unpack(plan, hbuf.double(), c.double(), case.T)
    ref = R.lstm_projection(t["x"], torch.tensor(case.lengths), t["w_ih"], t["w_hh"], t["bias"], t["w_proj"],
                            t["h0"], t["c0"], case.cell_clip, case.proj_clip, case.reverse)
    tol = case.T * eps
    for label, value, expected in zip(["out", "h_n", "c_n"], (out, h_n, c_n), ref):
        check_close(value, expected, tol, tol, f"reference {label}")


@pytest.mark.parametrize("name", list(CASES))
def test_emulation_matches_reference(name):
    """Without rounding, `emulate` and the packing bookkeeping (make_plan, unpack) are the reference
    op exactly; with the cases' clips, the clips change the result (so the kernel tests exercise them)."""
    case = CASES[name]
    t = make_inputs(case, seed=sum(map(ord, name)), dtype=None)
    plan = make_plan(case.lengths, case.T, case.reverse)
    _, hbuf, c, _, _ = emulate(t, plan, case, None)
    got = unpack(plan, hbuf, c, case.T)
    lengths = torch.tensor(case.lengths)
    want = R.lstm_projection(t["x"], lengths, t["w_ih"], t["w_hh"], t["bias"], t["w_proj"], t["h0"], t["c0"],
                             case.cell_clip, case.proj_clip, case.reverse)
    for label, value, expected in zip(["out", "h_n", "c_n"], got, want):
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"{label}: {m}")
    for clip_name in ("cell_clip", "proj_clip"):
        if getattr(case, clip_name) > 0:
            clips = dict(cell_clip=case.cell_clip, proj_clip=case.proj_clip)
            clips[clip_name] = 0.0
            unclipped = R.lstm_projection(t["x"], lengths, t["w_ih"], t["w_hh"], t["bias"], t["w_proj"], t["h0"],
                                          t["c0"], reverse=case.reverse, **clips)
            assert not torch.allclose(want[0], unclipped[0]), f"{clip_name} does not bind"
