"""The tensor-core char-CNN forward (csrc/cuda/char_cnn_tc.cu) and the kernel switch.

Without a GPU the kernel cannot run, so its design is checked here: the layout's invariants, and a
float64 emulation of exactly what the kernel computes (char slots zero past C,
overlapping 16-row tiles read with leading dimension dp, the max over rows 0..min(L, C - w)),
against the CPU op, values and winning windows. The CUDA tests run the kernel itself.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import elmo_fast
import elmo_fast.functional as F
import elmo_fast.reference as R
from test_char_cnn import PUBLISHED, SMALL, assert_nan_rows, make_ids, make_params, nan_case

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
# (C, d, filters) of the emulation and CUDA cases.
SHAPES = {
    "published": (50, 16, PUBLISHED),
    "small": (50, 16, SMALL),
    "odd_dim": (50, 5, [(1, 4), (3, 4)]),              # dp = 8: padded channels
    "short_tokens": (17, 12, [(2, 3), (5, 7), (6, 2)]),
    "one_slot_per_width": (7, 16, SMALL),              # C = the widest filter
}


def layout(C, d, w_min, w_max, F):
    keys = ["dp", "Kp", "Fp", "ksteps", "slot", "shared_bytes", "grid_y", "fits"]
    return dict(zip(keys, torch.ops.elmo_fast._char_cnn_tc_layout(C, d, w_min, w_max, F)))


def round_up(x, m):
    return (x + m - 1) // m * m


@pytest.mark.parametrize("seed", range(40))
def test_layout_invariants(seed):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    C = rnd(1, 80)
    w_max = rnd(1, min(C, 9))
    w_min = rnd(1, w_max)
    d, F = rnd(1, 40), rnd(1, 3000)
    lay = layout(C, d, w_min, w_max, F)
    dp, Kp, Fp, slot = lay["dp"], lay["Kp"], lay["Fp"], lay["slot"]
    assert dp % 8 == 0 and d <= dp < d + 8                      # WMMA: ldm a multiple of 8 halves
    assert Kp % 16 == 0 and w_max * dp <= Kp < w_max * dp + 16
    assert Fp % 16 == 0 and F <= Fp < F + 16 and lay["ksteps"] == Kp // 16
    assert slot % 2 == 0 and slot >= C + 1                      # every token tile starts 32-byte aligned
    last_row = round_up(C - w_min + 1, 16) - 1                  # the last row any tile computes
    assert last_row * dp + Kp <= slot * dp                      # its reads stay in the token's slot
    assert lay["shared_bytes"] == 16 * slot * dp * 2 + 8 * 16 * 16 * 4
    assert lay["grid_y"] == math.ceil(Fp // 16 / 16)
    assert lay["fits"] == int(lay["ksteps"] <= 8 and lay["shared_bytes"] <= 47 * 1024)


def test_layout_of_the_published_model_fits():
    lay = layout(50, 16, 1, 7, 2048)
    assert lay == dict(dp=16, Kp=112, Fp=2048, ksteps=7, slot=72, shared_bytes=45056, grid_y=8, fits=1)
    assert layout(50, 64, 1, 7, 2048)["fits"] == 0  # 28 k-steps: the SIMT kernel's shape


def live_length(row):
    p, L = row[-1], len(row)
    while L > 0 and row[L - 1] == p:
        L -= 1
    return L


def emulate_tensor_core(ids, emb, weights, biases, activation):
    """What char_cnn_tc_forward_kernel computes, in float64 (Note [char-CNN on tensor cores])."""
    N, C = ids.shape
    V, d = emb.shape
    widths = [w.shape[2] for w in weights]
    f_total = sum(w.shape[0] for w in weights)
    lay = layout(C, d, min(widths), max(widths), f_total)
    dp, Kp, Fp, slot = lay["dp"], lay["Kp"], lay["Fp"], lay["slot"]
    b_matrix = torch.zeros(Kp, Fp, dtype=torch.float64)        # row k * dp + c of filter f = W[f, c, k]
    col_width, col = [], 0
    for w in weights:
        m, _, width = w.shape
        for k in range(width):
            b_matrix[k * dp:k * dp + d, col:col + m] = w[:, :, k].t().double()
        col_width += [width] * m
        col += m
    emb_p = torch.zeros(V, dp, dtype=torch.float64)
    emb_p[:, :d] = emb.double()
    staged = torch.zeros(N, slot, dp, dtype=torch.float64)    # char slots past C are zeros
    staged[:, :C] = emb_p[ids]
    staged = staged.reshape(N, slot * dp)
    bias = torch.cat([b.double() for b in biases])
    act = torch.relu if activation == "relu" else torch.tanh
    out = torch.empty(N, f_total, dtype=torch.float64)
    windows = torch.empty(N, f_total, dtype=torch.long)
    for n in range(N):
        L = live_length(ids[n].tolist())
        rows = min(L, C - min(widths)) + 1
        tile_rows = round_up(rows, 16)
        assert (tile_rows - 1) * dp + Kp <= slot * dp, "a tile would read past the token's slot"
        a = torch.stack([staged[n, t * dp:t * dp + Kp] for t in range(tile_rows)])  # overlapping rows
        acc = a @ b_matrix                                     # (tile_rows, Fp)
        for f in range(f_total):
            last = min(L, C - col_width[f])
            values = acc[:last + 1, f]
            t = int(torch.argmax(values))                      # the first maximal row
            out[n, f] = act(values[t] + bias[f])
            windows[n, f] = t
    return out, windows, acc_at(staged, b_matrix, dp, Kp)


def acc_at(staged, b_matrix, dp, Kp):
    """conv value of (token, window t, filter f), for comparing tied windows."""
    def value(n, t, f):
        return float(staged[n, t * dp:t * dp + Kp] @ b_matrix[:, f])
    return value


@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_emulation_matches_cpu_op(case, activation):
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    c, d, filters = SHAPES[case]
    n = {"published": 24, "one_slot_per_width": 33}.get(case, 40)
    ids = make_ids(g, n, c)
    emb, weights, biases = make_params(g, d, filters, torch.float64)
    out, windows = torch.ops.elmo_fast.char_cnn(ids, emb, weights, biases, activation, True)
    emu_out, emu_windows, value = emulate_tensor_core(ids, emb, weights, biases, activation)
    torch.testing.assert_close(emu_out, out, rtol=1e-12, atol=1e-12)
    for n_, f_ in (emu_windows != windows.long()).nonzero().tolist():  # only exact ties may differ
        assert value(n_, int(emu_windows[n_, f_]), f_) == pytest.approx(value(n_, int(windows[n_, f_]), f_),
                                                                         abs=1e-12)


def test_set_kernel_rejects_bad_values():
    with pytest.raises(ValueError, match="must be one of 'auto', 'simt', 'tensor_core', got 'fast'"):
        elmo_fast.set_kernel("char_cnn", "fast")
    with pytest.raises(ValueError, match="unknown kernel family 'lstm_cell'"):
        elmo_fast.set_kernel("lstm_cell", "auto")
    with pytest.raises(TypeError, match="two strings"):
        elmo_fast.set_kernel("char_cnn", None)


def test_kernel_info_and_set_kernel():
    info = elmo_fast.kernel_info()["char_cnn"]
    assert info["env"] == "ELMO_FAST_CHAR_CNN_KERNEL"
    assert info["choices"] == ["simt", "tensor_core"]
    assert set(info["validated"]) <= set(info["choices"])
    try:
        elmo_fast.set_kernel("char_cnn", "simt")
        assert elmo_fast.kernel_info()["char_cnn"]["mode"] == "simt"
    finally:
        elmo_fast.set_kernel("char_cnn", "auto")


def test_bad_environment_value_is_a_clear_error():
    env = dict(os.environ, ELMO_FAST_CHAR_CNN_KERNEL="tensorcore")
    code = "import elmo_fast; elmo_fast.kernel_info()"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "ELMO_FAST_CHAR_CNN_KERNEL must be one of 'auto', 'simt', 'tensor_core', got 'tensorcore'" in result.stderr


@pytest.fixture
def kernel(request):
    elmo_fast.set_kernel("char_cnn", request.param)
    yield request.param
    elmo_fast.set_kernel("char_cnn", "auto")


def full_conv(ids, emb, weights):
    """(N, F, C) float64 conv value of every (token, filter, window start); -inf past C - w."""
    x = torch.nn.functional.embedding(ids, emb.double()).transpose(1, 2)
    parts = []
    for w in weights:
        conv = torch.nn.functional.conv1d(x, w.double())
        parts.append(torch.nn.functional.pad(conv, (0, ids.shape[1] - conv.shape[2]), value=-math.inf))
    return torch.cat(parts, 1)


@needs_cuda
@pytest.mark.parametrize("kernel", ["simt", "tensor_core"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(SHAPES) + ["tiny"])
def test_cuda_low_precision_kernels(kernel, dtype, case):
    # flash-attention's rule for the values; for the windows, the conv value at the chosen window
    # (float64, from the same low-precision inputs) must be the max up to low-precision accumulation.
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    c, d, filters = SHAPES["small" if case == "tiny" else case]
    n = {"published": 1000, "small": 77, "short_tokens": 17, "one_slot_per_width": 33, "tiny": 1}.get(case, 40)
    ids = make_ids(g, n, c).cuda()
    emb, weights, biases = make_params(g, d, filters, torch.float64, "cuda", scale=0.1)
    low = lambda t: t.to(dtype)  # noqa: E731
    lemb, lw, lb = low(emb), [low(w) for w in weights], [low(b) for b in biases]
    exact = R.char_cnn(ids, lemb.double(), [w.double() for w in lw], [b.double() for b in lb], "relu")
    out, windows = torch.ops.elmo_fast.char_cnn(ids, lemb, lw, lb, "relu", True)
    ref = R.char_cnn(ids, lemb, lw, lb, "relu")
    err, ref_err = (out.double() - exact).abs().max(), (ref.double() - exact).abs().max()
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)
    conv = full_conv(ids, lemb, lw)
    chosen = conv.gather(2, windows.long().unsqueeze(2)).squeeze(2)
    assert torch.isfinite(chosen).all(), "a window outside 0..C-w"
    best = conv.max(2).values
    assert ((best - chosen) <= 1e-2 * best.abs().clamp(min=1)).all()


@needs_cuda
@pytest.mark.parametrize("kernel", ["simt", "tensor_core"], indirect=True)
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_cuda_low_precision_kernels_propagate_nan(kernel, activation):
    g = torch.Generator().manual_seed(12)
    emb, weights, biases = make_params(g, 16, PUBLISHED, torch.bfloat16, "cuda", scale=0.1)
    emb[258] = float("nan")
    ids, nan_rows = nan_case(g, 40)
    ids = ids.cuda()
    out = F.char_cnn(ids, emb, weights, biases, activation)
    assert_nan_rows(out, R.char_cnn(ids, emb, weights, biases, activation), nan_rows)


@needs_cuda
@pytest.mark.parametrize("kernel", ["tensor_core"], indirect=True)
def test_cuda_tensor_core_windows_drive_the_backward(kernel):
    # The backward kernel is shared with the SIMT forward and reads only the windows: given the
    # tensor-core windows, the CUDA gradients must be the CPU backward's (float64) on those windows.
    g = torch.Generator().manual_seed(3)
    ids = make_ids(g, 50).cuda()
    emb, weights, biases = make_params(g, 16, SMALL, torch.bfloat16, "cuda")
    out, windows = torch.ops.elmo_fast.char_cnn(ids, emb, weights, biases, "relu", True)
    grad = torch.randn(out.shape, generator=g).to(out)
    got = torch.ops.elmo_fast.char_cnn_backward(grad, ids, emb, weights, out, windows, "relu")
    cpu = lambda t: t.double().cpu()  # noqa: E731
    want = torch.ops.elmo_fast.char_cnn_backward(cpu(grad), ids.cpu(), cpu(emb), [cpu(w) for w in weights],
                                                 cpu(out), windows.cpu(), "relu")
    for a, b in zip([got[0]] + list(got[1]) + list(got[2]), [want[0]] + list(want[1]) + list(want[2])):
        torch.testing.assert_close(a.double().cpu(), b, rtol=2e-2, atol=2e-2 * max(1.0, b.abs().max().item()))
    torch.library.opcheck(torch.ops.elmo_fast.char_cnn.default, (ids, emb, weights, biases, "relu", True))


@needs_cuda
@pytest.mark.parametrize("kernel", ["tensor_core"], indirect=True)
def test_cuda_tensor_core_refuses_float32(kernel):
    g = torch.Generator().manual_seed(4)
    ids = make_ids(g, 8).cuda()
    emb, weights, biases = make_params(g, 16, SMALL, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="tensor_core kernel was asked for .* float16 or bfloat16"):
        F.char_cnn(ids, emb, weights, biases, "relu")
