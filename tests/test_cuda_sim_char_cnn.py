"""The char-CNN kernels (csrc/cuda/char_cnn.cu, csrc/cuda/char_cnn_tc.cu) run in the CPU simulator
(Note [CUDA simulator]), with the arguments csrc/cuda/char_cnn_glue.cpp builds, against
elmo_fast.reference.char_cnn in float64 on the same stored-precision inputs."""
import ctypes
import dataclasses
from dataclasses import dataclass
from typing import List, Tuple

import pytest
import torch

import elmo_fast.reference as R
from sim_util import SIM_DTYPES, SIM_TOL, check, code, i64, int_array, ptr, sim  # noqa: F401 (fixture)

BOW, EOW, PAD = 259, 260, 261  # +1-shifted ids (elmo_fast/chars.py); 0 = whole padding token
HALF_DTYPES = [torch.float16, torch.bfloat16]
# Tolerances besides SIM_TOL (one kernel result against float64 on the stored inputs):
# a saved window's float64 conv value against the token's max: both come from the same stored inputs, so
# they differ only by the kernel's float accumulation (a near-tie may go either way);
WINDOW_TOL = dict(rtol=1e-5, atol=1e-5)
# the embedding gradient of two runs that differ only in the order of the float atomicAdds (Note [CUDA
# char-CNN non-determinism]): a few ulps;
ATOMIC_ORDER_TOL = dict(rtol=1e-5, atol=1e-5)
# the tensor-core and SIMT outputs: one storage ulp, as the two sum in different orders and a rounding
# boundary may fall between them; gradients (float sums of many (token, filter) terms): SIM_TOL's rtol, with
# an atol of rtol times the gradient's largest entry.


def one_ulp(dtype):
    eps = torch.finfo(dtype).eps
    return dict(rtol=eps, atol=eps)


@dataclass(frozen=True)
class Case:
    name: str
    n: int                          # tokens
    c: int                          # char slots
    d: int                          # char dim
    filters: Tuple[Tuple[int, int], ...]  # (width, count) per weight tensor, in the op's order
    activation: str


ELMO_LIKE = ((1, 4), (2, 8), (3, 12), (4, 5), (5, 9), (6, 6), (7, 11))  # counts not all multiples of 16
CASES = [
    Case("elmo", 20, 50, 16, ELMO_LIKE, "relu"),                  # 2 tensor-core blocks, the second of 4
    Case("one_token", 1, 50, 16, ELMO_LIKE, "relu"),
    Case("non_elmo", 18, 50, 12, ((1, 4), (3, 4)), "tanh"),       # d = 12: channels padded to 16 for TC
    Case("short", 9, 7, 4, ((7, 5), (1, 16), (2, 3)), "relu"),    # C = w_max; widths not sorted
    Case("wide", 5, 7, 4, ((1, 130), (3, 140)), "tanh"),          # F > 256 threads; > 16 TC tiles
]
CASE_IDS = [c.name for c in CASES]


def make_ids(g, n, c):
    """Tokens in the spec §3.1 layout, cycling through the kinds the padding shortcut and the tensor-core
    tiles must get right: a word whose live length L crosses a 16-window tile (13, 14, 29, 30 bytes), the
    longest word (no pad char: the trailing run is the end-of-word id alone), an empty word (BOW, EOW,
    pads), a whole padding token (all 0), a short word followed by a run of one byte id, and a word ending
    in a run of one byte (equal windows: the first must win; at C = 50 the run spans chars 10-18, so its
    first windows are in the second half of a 16-window tile and later ones in the next tile)."""
    ids = torch.full((n, c), PAD, dtype=torch.long)
    for i in range(n):
        kind = i % 6
        short = int(torch.randint(1, min(12, c - 2) + 1, (1,), generator=g))
        length = min(c - 2, [[13, 14, 29, 30][i // 6 % 4], c - 2, 0, 0, short, 18][kind])
        ids[i, 0] = BOW
        ids[i, 1:1 + length] = torch.randint(1, 257, (length,), generator=g)
        ids[i, 1 + length] = EOW
        if kind == 3:
            ids[i] = 0
        elif kind == 4:
            ids[i, 2 + length:] = int(torch.randint(1, 257, (1,), generator=g))
        elif kind == 5:
            ids[i, 1 + length // 2:1 + length] = ids[i, 1 + length // 2]
    return ids


def stored(t, dtype):
    """t in the storage type (what the kernel reads) and its exact float64 value."""
    s = t.to(dtype).contiguous()
    return s, s.double()


@dataclass
class Problem:
    """One case's inputs in the storage dtype and as float64."""
    case: Case
    dtype: torch.dtype
    ids: torch.Tensor
    emb: torch.Tensor
    weights: List[torch.Tensor]
    biases: List[torch.Tensor]
    emb64: torch.Tensor
    weights64: List[torch.Tensor]
    biases64: List[torch.Tensor]

    @property
    def widths(self):
        return [w for w, _ in self.case.filters]

    @property
    def F(self):
        return sum(m for _, m in self.case.filters)

    @property
    def f0s(self):
        """First filter of each weight tensor, in the op's order, then F."""
        f0 = [0]
        for _, m in self.case.filters:
            f0.append(f0[-1] + m)
        return f0

    def groups(self):
        """The launchers' CharCnnGroups as the glue builds them (to_groups): n, f0 (n + 1,), w (n,)."""
        return [len(self.case.filters), int_array(self.f0s), int_array(self.widths)]

    def reference(self):
        return R.char_cnn(self.ids, self.emb64, self.weights64, self.biases64, self.case.activation)


def make_problem(case, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = make_ids(g, case.n, case.c)
    emb, emb64 = stored(torch.randn(262, case.d, generator=g), dtype)
    weights = [stored(torch.randn(m, case.d, w, generator=g) * 0.3, dtype) for w, m in case.filters]
    biases = [stored(torch.randn(m, generator=g) * 0.5, dtype) for _, m in case.filters]
    return Problem(case, dtype, ids, emb, [w for w, _ in weights], [b for b, _ in biases], emb64,
                   [w for _, w in weights], [b for _, b in biases])


def pack(weights, d, k):
    """Note [char-CNN packed weight] (pack_char_cnn_weight): (F, K), row f = filter f as [k * d + c] =
    W[f - f0, c, k] for k < w, zeros beyond."""
    rows = []
    for w in weights:
        r = w.permute(0, 2, 1).reshape(w.shape[0], -1)
        rows.append(torch.nn.functional.pad(r, (0, k - r.shape[1])))
    return torch.cat(rows, 0).contiguous()


def run_simt(sim, p, save=True):
    """launch_char_cnn_forward with the glue's arguments: out (N, F) and windows (N, F) int16."""
    c = p.case
    k = max(p.widths) * c.d
    packed_t = pack(p.weights, c.d, k).t().contiguous()
    bias = torch.cat(p.biases).contiguous()
    out = torch.full((c.n, p.F), float("nan"), dtype=p.dtype)
    windows = torch.full((c.n, p.F), -7, dtype=torch.int16)
    check(sim.sim_char_cnn_forward(code(p.dtype), ptr(p.ids), ptr(p.emb), ptr(packed_t), ptr(bias), ptr(out),
                                   ptr(windows if save else None), *i64(c.n, c.c, 262, c.d, p.F, k),
                                   *p.groups(), int(c.activation == "tanh")), "char_cnn forward")
    return out, windows


def tc_layout(sim, p):
    """sim_char_cnn_tc_layout: dict of dp, Kp, Fp, ksteps, slot, shared_bytes, grid_y, fits."""
    values = (ctypes.c_int64 * 8)()
    sim.sim_char_cnn_tc_layout(*i64(p.case.c, p.case.d, min(p.widths), max(p.widths), p.F), values)
    return dict(zip(["dp", "Kp", "Fp", "ksteps", "slot", "shared_bytes", "grid_y", "fits"], values))


def run_tc(sim, p, save=True):
    """launch_char_cnn_forward_tc with the inputs padded as pad_for_tensor_core does: emb (V, d) -> (V, dp),
    weights' channels to dp, packed to (F, w_max * dp), then zero-padded to (Fp, Kp) and transposed."""
    c = p.case
    lay = tc_layout(sim, p)
    assert lay["fits"], f"{c.name}: the tensor-core kernel does not take this shape: {lay}"
    extra = lay["dp"] - c.d
    emb_p = torch.nn.functional.pad(p.emb, (0, extra)).contiguous()
    padded = [torch.nn.functional.pad(w, (0, 0, 0, extra)) for w in p.weights]  # (m, dp, w)
    packed = pack(padded, lay["dp"], max(p.widths) * lay["dp"])
    packed_p = torch.nn.functional.pad(packed, (0, lay["Kp"] - packed.shape[1], 0, lay["Fp"] - p.F))
    packed_p = packed_p.t().contiguous()
    bias = torch.cat(p.biases).contiguous()
    out = torch.full((c.n, p.F), float("nan"), dtype=p.dtype)
    windows = torch.full((c.n, p.F), -7, dtype=torch.int16)
    check(sim.sim_char_cnn_forward_tc(code(p.dtype), ptr(p.ids), ptr(emb_p), ptr(packed_p), ptr(bias), ptr(out),
                                      ptr(windows if save else None),
                                      *i64(c.n, c.c, 262, c.d, p.F, min(p.widths), max(p.widths)),
                                      *p.groups(), int(c.activation == "tanh")), "char_cnn forward (tensor cores)")
    return out, windows


def conv_windows(p):
    """Per weight tensor, every window's conv value in float64 (no bias): (N, m, C - w + 1)."""
    chars = p.emb64[p.ids]  # (N, C, d)
    result = []
    for w64 in p.weights64:
        w = w64.shape[2]
        win = chars.unfold(1, w, 1)  # (N, C - w + 1, d, w)
        result.append(torch.einsum("ntck,mck->nmt", win, w64))
    return result


def first_of_its_content(ids, w):
    """(N, C - w + 1) bool: window t is the first window of its token with exactly its w ids. Equal ids
    give equal values, so the first maximal window the kernels keep is one of these; the constant
    trailing run's windows (t >= L) all hold the same ids, so this also says it is recorded at t = L."""
    win = ids.unfold(1, w, 1)  # (N, T, w)
    same = (win[:, :, None, :] == win[:, None, :, :]).all(-1)  # (N, T, T)
    earlier = torch.ones(same.shape[1:], dtype=torch.bool).tril(-1)
    return ~(same & earlier).any(-1)


def check_windows(p, windows, rows=None):
    """Each saved window is a valid start whose float64 conv value is the token's max, and the first
    window with its content (Note [char-CNN padding shortcut]: the constant window is recorded at t = L)."""
    rows = torch.arange(p.case.n) if rows is None else torch.as_tensor(rows)
    for conv, w, f0 in zip(conv_windows(p), p.widths, p.f0s):
        t = windows[rows, f0:f0 + conv.shape[1]].long()
        assert ((t >= 0) & (t <= p.case.c - w)).all(), f"width {w}: a window start out of range"
        picked = conv[rows].gather(2, t[:, :, None])[..., 0]
        torch.testing.assert_close(picked, conv[rows].amax(2), **WINDOW_TOL, msg=lambda s: f"width {w}: {s}")
        first = first_of_its_content(p.ids, w)[rows]
        assert first.gather(1, t).all(), f"width {w}: a window after an earlier one with the same chars"


@pytest.mark.parametrize("dtype", SIM_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_simt_forward(sim, dtype, case):
    """char_cnn.cu's forward: outputs against the float64 reference; saved windows are maximal and
    follow the first-window convention; without windows to save the outputs are the same."""
    p = make_problem(case, dtype)
    out, windows = run_simt(sim, p)
    torch.testing.assert_close(out.double(), p.reference(), **SIM_TOL[dtype])
    check_windows(p, windows)
    out_unsaved, _ = run_simt(sim, p, save=False)
    assert torch.equal(out_unsaved, out)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_tensor_core_forward(sim, dtype, case):
    """char_cnn_tc.cu's forward on the glue's padded inputs: outputs against the float64 reference and
    within one storage rounding of the SIMT kernel's; saved windows as for SIMT."""
    p = make_problem(case, dtype)
    out, windows = run_tc(sim, p)
    torch.testing.assert_close(out.double(), p.reference(), **SIM_TOL[dtype])
    check_windows(p, windows)
    simt, _ = run_simt(sim, p)
    torch.testing.assert_close(out.double(), simt.double(), **one_ulp(dtype))
    out_unsaved, _ = run_tc(sim, p, save=False)
    assert torch.equal(out_unsaved, out)


def test_cases_reach_tensor_core_layout_corners(sim):
    """The cases above exercise the layout's corners: channel padding (dp > d), several filter-tile
    groups (grid_y > 1), more than one 16-token block, and a ragged filter tile (F not a multiple of 16)."""
    layouts = {c.name: tc_layout(sim, make_problem(c, torch.float16)) for c in CASES}
    assert all(lay["fits"] for lay in layouts.values())
    assert any(lay["dp"] > c.d for c, lay in zip(CASES, layouts.values()))
    assert any(lay["grid_y"] > 1 for lay in layouts.values())
    assert any(c.n > 16 for c in CASES) and any(sum(m for _, m in c.filters) % 16 for c in CASES)


def float64_windows(p):
    """(N, F) int16: each (token, filter)'s first maximal window in float64 (torch.argmax takes the first);
    torch.max's backward may pick another only among windows of equal chars, which give equal gradients."""
    return torch.cat([conv.argmax(2) for conv in conv_windows(p)], 1).to(torch.int16).contiguous()


def run_backward(sim, p, grad_out, out, windows, splits):
    """launch_char_cnn_backward with the glue's workspaces (filled with NaN here: the kernels must write
    every element they read) and a zeroed grad_emb: grad_emb (V, d), grad_packed_t (K, F), grad_bias (F,)."""
    c = p.case
    k = max(p.widths) * c.d
    packed_t = pack(p.weights, c.d, k).t().contiguous()
    nan = float("nan")
    g = torch.full((c.n, p.F), nan)
    part = torch.full((splits, k, p.F), nan)
    part_bias = torch.full((splits, p.F), nan)
    grad_packed_t = torch.full((k, p.F), nan)
    grad_bias = torch.full((p.F,), nan)
    grad_emb = torch.zeros(262, c.d)
    check(sim.sim_char_cnn_backward(code(p.dtype), ptr(grad_out), ptr(out), ptr(windows), ptr(p.ids), ptr(p.emb),
                                    ptr(packed_t), ptr(g), ptr(part), ptr(part_bias), *i64(splits),
                                    ptr(grad_packed_t), ptr(grad_bias), ptr(grad_emb),
                                    *i64(c.n, c.c, 262, c.d, p.F, k), *p.groups(), int(c.activation == "tanh")),
          "char_cnn backward")
    return grad_emb, grad_packed_t, grad_bias


def glue_splits(n):
    """char_cnn_backward_cuda's token splits of the weight-gradient pass."""
    return max(1, min(16, n // 32))


def ragged_splits(n):
    """A split count that does not divide n (its last splits may hold no token at all)."""
    return next(s for s in range(3, n + 4) if n % s)


BACKWARD_CASES = [Case("elmo", 70, 50, 16, ELMO_LIKE, "relu")] + CASES[1:]  # 70 tokens: the glue splits in 2


@pytest.mark.parametrize("dtype", SIM_DTYPES, ids=str)
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=[c.name for c in BACKWARD_CASES])
def test_backward(sim, dtype, case):
    """char_cnn.cu's backward, given float64 argmax windows and the reference's output rounded as the
    forward stores it: the char table, packed weight and bias gradients against float64 autograd of the
    reference, with the glue's split count, one split, and a count that does not divide N."""
    p = make_problem(case, dtype, seed=1)
    emb64 = p.emb64.clone().requires_grad_()
    weights64 = [w.clone().requires_grad_() for w in p.weights64]
    biases64 = [b.clone().requires_grad_() for b in p.biases64]
    ref = R.char_cnn(p.ids, emb64, weights64, biases64, case.activation)
    grad_out, grad_out64 = stored(torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)), dtype)
    want_emb, *want_params = torch.autograd.grad(ref, [emb64, *weights64, *biases64], grad_out64)
    k = max(p.widths) * case.d
    want_packed_t = pack(want_params[:len(p.widths)], case.d, k).t()
    want_bias = torch.cat(want_params[len(p.widths):])
    out = ref.detach().to(dtype).contiguous()
    windows = float64_windows(p)
    rtol = SIM_TOL[dtype]["rtol"]
    for splits in sorted({glue_splits(case.n), 1, ragged_splits(case.n)}):
        grad_emb, grad_packed_t, grad_bias = run_backward(sim, p, grad_out, out, windows, splits)
        for name, got, want in [("embedding", grad_emb, want_emb), ("packed weight", grad_packed_t, want_packed_t),
                                ("bias", grad_bias, want_bias)]:
            torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * want.abs().max(),
                                       msg=lambda s: f"{name}, {splits} splits: {s}")


def nan_problem(dtype):
    """17 tokens where the char table row 258 (not a byte id) is NaN: inside a word past the first windows
    (token 2: the running max is finite when it comes) and as a token's trailing run (token 10: the
    constant window). Returns the problem and those tokens."""
    p = make_problem(Case("nan", 17, 50, 16, ELMO_LIKE, "relu"), dtype)
    for row, word in [(2, 12), (10, 11)]:
        p.ids[row] = PAD
        p.ids[row, 0], p.ids[row, 1 + word] = BOW, EOW
        p.ids[row, 1:1 + word] = torch.randint(1, 257, (word,), generator=torch.Generator().manual_seed(row))
    p.ids[2, 9] = 258
    p.ids[10, 13:] = 258
    p.emb[258] = p.emb64[258] = float("nan")
    return p, [2, 10]


def saved_window_values(p, windows, rows):
    """(len(rows), F) float64: the conv value of each saved window."""
    return torch.cat([conv[rows].gather(2, windows[rows, f0:f0 + conv.shape[1]].long()[:, :, None])[..., 0]
                      for conv, f0 in zip(conv_windows(p), p.f0s)], 1)


@pytest.mark.parametrize("kernel,dtype", [("simt", t) for t in SIM_DTYPES] + [("tensor_core", t) for t in HALF_DTYPES],
                         ids=str)
def test_forward_propagates_nan(sim, kernel, dtype):
    """A NaN in the char table goes through the max and relu as torch.max and torch.relu let it: the tokens
    that hold the NaN char are NaN in every filter (each char lies in some window of every width); the
    others match the reference, with maximal windows."""
    p, nan_rows = nan_problem(dtype)
    out, windows = (run_simt if kernel == "simt" else run_tc)(sim, p)
    ref = p.reference()
    keep = [i for i in range(p.case.n) if i not in nan_rows]
    assert torch.isnan(ref[nan_rows]).all() and not torch.isnan(ref[keep]).any()  # the case is as described
    assert torch.isnan(out[nan_rows]).all()
    torch.testing.assert_close(out[keep].double(), ref[keep], **SIM_TOL[dtype])
    check_windows(p, windows, keep)
    # As torch.max: a NaN output's saved window is one whose conv is NaN, so the tanh backward sends the
    # NaN gradient to that window's chars. (The tensor-core kernel once saved the first window within
    # w_max chars of the NaN char, for every width: its tile reads w_max chars against zero weights.)
    assert torch.isnan(saved_window_values(p, windows, nan_rows)).all(), "a NaN output's window lacks the NaN"
    first_nan = torch.cat([conv[nan_rows].isnan().int().argmax(2) for conv in conv_windows(p)], 1)
    assert torch.equal(windows[nan_rows].long(), first_nan), "not the first NaN window, as torch.max"


@pytest.mark.parametrize("kernel", ["simt", "tensor_core"])
def test_inf_in_char_table(sim, kernel):
    """An inf channel in a used char's row gives +-inf or finite values, as in the reference (the
    tensor-core kernel once gave NaN in every filter of that token: inf * 0 in the chars past a narrower
    filter's width)."""
    p = make_problem(CASES[0], torch.float16)
    p.ids[1, 9] = 258
    p.emb[258], p.emb64[258] = 0.0, 0.0
    p.emb[258, 0] = p.emb64[258, 0] = float("inf")
    out, _ = (run_simt if kernel == "simt" else run_tc)(sim, p)
    ref = p.reference()
    assert not torch.isnan(ref).any() and torch.isinf(ref[1]).any()  # the case is as described
    torch.testing.assert_close(out.double(), ref, **SIM_TOL[torch.float16])


@pytest.mark.parametrize("kernel", ["simt", "tensor_core"])
def test_out_of_range_ids_are_clamped(sim, kernel):
    """The launchers' contract (char_cnn_launch.h): an id outside 0..V-1 reads row 0 or V-1, in the
    forward and in the backward, exactly as the clamped id would."""
    p = make_problem(CASES[0], torch.float16)
    p.ids[0, 3], p.ids[4, 1], p.ids[5, 20:30] = -5, 262, 1000  # token 5: its trailing pads begin with V - 1
    clamped = dataclasses.replace(p, ids=p.ids.clamp(0, 261))
    run = run_simt if kernel == "simt" else run_tc
    out, windows = run(sim, p)
    want_out, want_windows = run(sim, clamped)
    assert torch.equal(out, want_out) and torch.equal(windows, want_windows)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    got = run_backward(sim, p, grad_out, out, windows, 1)
    want = run_backward(sim, clamped, grad_out, out, windows, 1)
    torch.testing.assert_close(got[0], want[0], **ATOMIC_ORDER_TOL)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
