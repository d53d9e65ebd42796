"""The fused LSTM-with-projection op (torch.ops.elmo_fast.lstm_projection) against reference.lstm_projection."""
import pytest
import torch

from elmo_fast import functional as F
from elmo_fast import reference as R
from util import assert_close_verbose

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW_PRECISION = [torch.float16, torch.bfloat16]
# float32: the fused op and the reference differ by GEMM blocking order and the vectorised
# exp/tanh (a few ulp per step), compounded over the recurrence.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}


def noncontiguous(t):
    """The same values with a last-dim stride of 2 (a slice of a wider tensor)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2].requires_grad_(t.requires_grad)


def make_case(gen, B, T, I, n, P, lengths, *, dtype=torch.float64, device="cpu", bias=True, state=True,
              scale=1.0, requires_grad=True):
    """Random inputs in float64 cast to dtype/device. P=None: no projection (P = n)."""
    p = n if P is None else P
    r = lambda *s, fan=1: torch.randn(*s, generator=gen, dtype=torch.float64) * (scale / max(fan, 1)**0.5)  # noqa: E731
    tensors = dict(
        x=r(B, T, I), w_ih=r(4 * n, I, fan=I), w_hh=r(4 * n, p, fan=p), bias=r(4 * n) if bias else None,
        w_proj=r(p, n, fan=n) if P is not None else None,
        h0=r(B, p) if state else torch.zeros(B, p, dtype=torch.float64),
        c0=r(B, n) if state else torch.zeros(B, n, dtype=torch.float64),
    )
    cast = {k: None if v is None else v.to(device=device, dtype=dtype).requires_grad_(requires_grad)
            for k, v in tensors.items()}
    return cast, torch.tensor(lengths, dtype=torch.int64)


ORDER = ["x", "w_ih", "w_hh", "bias", "w_proj", "h0", "c0"]


def run(fn, t, lengths, cell_clip=None, proj_clip=None, reverse=False):
    return fn(t["x"], lengths, t["w_ih"], t["w_hh"], t["bias"], t["w_proj"], t["h0"], t["c0"], cell_clip, proj_clip,
              reverse)


def detached(t, dtype=None):
    return {k: None if v is None else v.detach().to(dtype or v.dtype).clone().requires_grad_(v.requires_grad)
            for k, v in t.items()}


# (B, T, I, n, P, lengths): batch 1, length 1, ragged, zero-length rows, sizes off the vector width.
CASES = [
    (1, 1, 3, 5, 2, [1]),
    (1, 4, 2, 3, None, [4]),
    (4, 6, 5, 7, 3, [6, 2, 0, 5]),
    (5, 9, 17, 33, 11, [3, 9, 9, 1, 0]),
    (3, 7, 8, 16, None, [7, 7, 7]),
    (6, 5, 4, 129, 31, [0, 5, 2, 2, 4, 1]),
    (2, 3, 4, 5, 3, [0, 0]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_lstm_projection_matches_reference(device, case, reverse, clip):
    B, T, I, n, P, lengths = CASES[case]
    dtypes = [torch.float64, torch.float32] if device == "cpu" else [torch.float32]
    for dtype in dtypes:
        gen = torch.Generator().manual_seed(case * 10 + 2 * reverse + clip)
        t, lens = make_case(gen, B, T, I, n, P, lengths, dtype=dtype, device=device, bias=case % 3 != 1,
                            state=case % 2 == 0, scale=2.0 if clip else 1.0)
        clips = (0.6, 0.4) if clip else (None, 0.0)
        ref_t = detached(t)
        got = run(F.lstm_projection, t, lens, *clips, reverse)
        want = run(R.lstm_projection, ref_t, lens, *clips, reverse)
        for name, g, w in zip(["out", "h_n", "c_n"], got, want):
            assert g.shape == w.shape and g.dtype == dtype
            assert_close_verbose(g, w, f"{name} {dtype}", **TOL[dtype])
        ups = [torch.randn(g.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for g in got]
        inputs = [t[k] for k in ORDER if t[k] is not None]
        ref_inputs = [ref_t[k] for k in ORDER if ref_t[k] is not None]
        grads = torch.autograd.grad(got, inputs, ups)
        ref_grads = torch.autograd.grad(want, ref_inputs, ups)
        names = [k for k in ORDER if t[k] is not None]
        # weight grads sum over B x T terms: scale atol with their count.
        tol = dict(TOL[dtype], atol=TOL[dtype]["atol"] * max(1, B * T) ** 0.5)
        for name, g, w in zip(names, grads, ref_grads):
            assert_close_verbose(g, w, f"grad {name} {dtype}", **tol)


def test_lstm_projection_clips_bite():
    """The clipped cases above do clip: each clip changes the reference's output on its own."""
    B, T, I, n, P, lengths = CASES[3]
    gen = torch.Generator().manual_seed(3 * 10 + 1)
    t, lens = make_case(gen, B, T, I, n, P, lengths, scale=2.0, requires_grad=False)
    both = run(R.lstm_projection, t, lens, 0.6, 0.4)[0]
    no_cell = run(R.lstm_projection, t, lens, None, 0.4)[0]
    no_proj = run(R.lstm_projection, t, lens, 0.6, None)[0]
    assert (both - no_cell).abs().max() > 1e-3, "cell clip does not bite"
    assert (both - no_proj).abs().max() > 1e-3, "proj clip does not bite"
    assert run(F.lstm_projection, t, lens, 0.6, 0.4)[0].abs().max() <= 0.4


@pytest.mark.parametrize("device", DEVICES)
def test_lstm_projection_zero_length_rows_keep_state(device):
    gen = torch.Generator().manual_seed(5)
    t, lens = make_case(gen, 3, 4, 3, 6, 2, [0, 4, 0], device=device, requires_grad=False,
                        dtype=torch.float64 if device == "cpu" else torch.float32)
    for reverse in (False, True):
        out, h_n, c_n = run(F.lstm_projection, t, lens, 1.0, 1.0, reverse)
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
        assert torch.equal(h_n[[0, 2]], t["h0"][[0, 2]]) and torch.equal(c_n[[0, 2]], t["c0"][[0, 2]])


@pytest.mark.parametrize("B,T,lengths", [(0, 3, []), (2, 0, [0, 0]), (0, 0, [])])
def test_lstm_projection_empty(B, T, lengths):
    gen = torch.Generator().manual_seed(6)
    t, lens = make_case(gen, B, T, 3, 4, 2, lengths)
    out, h_n, c_n = run(F.lstm_projection, t, lens, 1.0, 1.0)
    assert out.shape == (B, T, 2) and h_n.shape == (B, 2) and c_n.shape == (B, 4)
    assert torch.equal(h_n, t["h0"]) and torch.equal(c_n, t["c0"])
    grads = torch.autograd.grad((out.sum() + h_n.sum() + c_n.sum()), [t[k] for k in ORDER])
    assert torch.equal(grads[0], torch.zeros_like(t["x"])) and torch.equal(grads[5], torch.ones_like(t["h0"]))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:5])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,P", [(0, None), (4, 0), (0, 3), (0, 0)])
def test_lstm_projection_zero_width(device, n, P):
    """No cells, or a projection to nothing: empty outputs and states, and the reference's gradients
    (the kernels' layouts must not divide by these sizes)."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    t, lens = make_case(torch.Generator().manual_seed(8), 3, 4, 5, n, P, [4, 2, 0], dtype=dtype, device=device)
    got = run(F.lstm_projection, t, lens, 1.0, 1.0, True)
    want = run(R.lstm_projection, t, lens, 1.0, 1.0, True)
    inputs = [t[k] for k in ORDER if t[k] is not None]
    got_grads = torch.autograd.grad(sum(o.sum() for o in got), inputs, allow_unused=True, materialize_grads=True)
    want_grads = torch.autograd.grad(sum(o.sum() for o in want), inputs, allow_unused=True, materialize_grads=True)
    for name, g, w in zip(["out", "h_n", "c_n"] + [k for k in ORDER if t[k] is not None], [*got, *got_grads],
                          [*want, *want_grads]):
        assert g.shape == w.shape, name
        assert_close_verbose(g, w, name, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_lstm_projection_noncontiguous_inputs(device):
    gen = torch.Generator().manual_seed(7)
    dtype = torch.float64 if device == "cpu" else torch.float32
    t, lens = make_case(gen, 4, 5, 6, 7, 3, [5, 3, 0, 4], dtype=dtype, device=device, requires_grad=False)
    strided = {k: noncontiguous(v) for k, v in t.items()}
    assert not strided["x"].is_contiguous() and not strided["w_hh"].is_contiguous()
    got = run(F.lstm_projection, strided, lens, 0.8, 0.5, True)
    want = run(R.lstm_projection, t, lens, 0.8, 0.5, True)
    for g, w in zip(got, want):
        assert_close_verbose(g, w, **TOL[dtype])


def test_lstm_projection_no_grad_saves_nothing():
    gen = torch.Generator().manual_seed(8)
    t, lens = make_case(gen, 2, 3, 4, 5, 3, [3, 1], requires_grad=False)
    args = [t["x"], lens, t["w_ih"], t["w_hh"], t["bias"], t["w_proj"], t["h0"], t["c0"], 0.0, 0.0, False]
    assert torch.ops.elmo_fast.lstm_projection(*args, False)[3].numel() == 0
    assert torch.ops.elmo_fast.lstm_projection(*args, True)[3].numel() == 2 * 3 * 5 * 5
    out = F.lstm_projection(*args)[0]
    assert not out.requires_grad


INPUT_CHUNK_ROWS = 1024  # kLstmInputChunkRows in csrc/common/lstm_driver.h (Note [chunked input GEMM])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_projection_long_no_grad_chunks_match_saved_path(device, dtype, reverse):
    # 2 * 600 + 1 + 1000 packed rows: three input-GEMM chunks without saving, one with; ragged rows end
    # inside chunks. The chunked path must give the saved (all-steps-at-once) path's numbers.
    gen = torch.Generator().manual_seed(11)
    lengths = [1000, 600, 600, 1]
    t, lens = make_case(gen, 4, 1000, 6, 8, 5, lengths, dtype=dtype, device=device, requires_grad=False)
    assert sum(lengths) > 2 * INPUT_CHUNK_ROWS
    args = [t["x"], lens, t["w_ih"], t["w_hh"], t["bias"], t["w_proj"], t["h0"], t["c0"], 3.0, 3.0, reverse]
    chunked = torch.ops.elmo_fast.lstm_projection(*args, False)
    whole = torch.ops.elmo_fast.lstm_projection(*args, True)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for got, want, name in zip(chunked[:3], whole[:3], ["out", "h_n", "c_n"]):
        assert_close_verbose(got, want, name, **tol)
    want = run(R.lstm_projection, detached(t, torch.float64), lens, 3.0, 3.0, reverse)
    assert_close_verbose(chunked[0].double(), want[0], "out vs reference", **TOL[dtype])


@pytest.mark.parametrize("proj", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_projection_gradcheck(proj, reverse):
    gen = torch.Generator().manual_seed(9)
    t, lens = make_case(gen, 3, 4, 3, 4, 2 if proj else None, [4, 0, 2], scale=1.5)
    names = [k for k in ORDER if t[k] is not None]

    def fn(*tensors):
        d = dict(t, **dict(zip(names, tensors)))
        return run(F.lstm_projection, d, lens, 0.9, 0.7, reverse)

    assert torch.autograd.gradcheck(fn, [t[k] for k in names])


def _sample_args(requires_grad):
    gen = torch.Generator().manual_seed(10)
    samples = []
    for P, bias in ((3, True), (None, False)):
        t, lens = make_case(gen, 3, 4, 2, 5, P, [4, 0, 2], bias=bias, requires_grad=requires_grad)
        for save in (False, True):
            samples.append((t["x"], lens, t["w_ih"], t["w_hh"], t["bias"], t["w_proj"], t["h0"], t["c0"], 0.5, 0.3,
                            bool(P), save))
    return samples


@pytest.mark.parametrize("requires_grad", [False, True])
def test_lstm_projection_opcheck(requires_grad):
    for args in _sample_args(requires_grad):
        torch.library.opcheck(torch.ops.elmo_fast.lstm_projection.default, args)


def test_lstm_projection_backward_opcheck():
    t, lens = make_case(torch.Generator().manual_seed(11), 3, 4, 2, 5, 3, [4, 0, 2], requires_grad=False)
    x, w_ih, w_hh, bias, w_proj, h0, c0 = (t[k] for k in ORDER)
    out, h_n, c_n, act = torch.ops.elmo_fast.lstm_projection(x, lens, w_ih, w_hh, bias, w_proj, h0, c0, 0.5, 0.3,
                                                             False, True)
    args = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), x, lens, w_ih, w_hh, w_proj, h0, c0,
            out, act, True, 0.5, 0.3, False)
    torch.library.opcheck(torch.ops.elmo_fast.lstm_projection_backward.default, args)


def test_lstm_projection_torch_compile():
    gen = torch.Generator().manual_seed(12)
    t, lens = make_case(gen, 3, 5, 4, 6, 3, [5, 2, 0], requires_grad=False)

    @torch.compile(fullgraph=True)
    def fn(x, lengths, w_ih, w_hh, bias, w_proj, h0, c0):
        out, h, c = F.lstm_projection(x, lengths, w_ih, w_hh, bias, w_proj, h0, c0, 0.5, 0.4, True)
        return out * 2, h, c

    got = fn(*(t[k] if k != "lengths" else lens for k in ["x", "lengths"] + ORDER[1:]))
    want = run(R.lstm_projection, t, lens, 0.5, 0.4, True)
    assert_close_verbose(got[0], want[0] * 2, **TOL[torch.float64])
    assert_close_verbose(got[1], want[1], **TOL[torch.float64])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_projection_low_precision_cuda(dtype, reverse):
    check_low_precision_cuda(dtype, reverse)


def check_low_precision_cuda(dtype, reverse):
    """fp16/bf16: error against the float64 reference at most ~2x the reference's own in dtype;
    gradients within 5% of the float64 reference's."""
    gen = torch.Generator().manual_seed(13)
    t, lens = make_case(gen, 5, 9, 17, 64, 16, [3, 9, 9, 1, 0], device="cuda", scale=1.5)
    exact = run(R.lstm_projection, detached(t), lens, 0.6, 0.4, reverse)
    low = detached(t, dtype)
    got = run(F.lstm_projection, low, lens, 0.6, 0.4, reverse)
    ref_low = run(R.lstm_projection, detached(t, dtype), lens, 0.6, 0.4, reverse)
    for g, r, e in zip(got, ref_low, exact):
        err, ref_err = (g.double() - e).abs().max(), (r.double() - e).abs().max()
        assert err <= 2 * ref_err + 1e-3, (err, ref_err)
    ups = [torch.randn(g.shape, device="cuda", dtype=dtype) for g in got]
    names = [k for k in ORDER if t[k] is not None]
    grads = torch.autograd.grad(got, [low[k] for k in names], ups)
    ex_t = detached(t)
    ex = run(R.lstm_projection, ex_t, lens, 0.6, 0.4, reverse)
    ex_grads = torch.autograd.grad(ex, [ex_t[k] for k in names], [u.double() for u in ups])
    for name, g, e in zip(names, grads, ex_grads):
        rel = (g.double() - e).norm() / e.norm().clamp_min(1e-6)
        assert rel < 5e-2, (name, rel)


# --- bad inputs: clear exceptions naming the argument ------------------------------------------

def _good():
    t, lens = make_case(torch.Generator().manual_seed(14), 2, 3, 4, 5, 3, [3, 1], requires_grad=False)
    return dict(t, lengths=lens)


def _call(**over):
    a = dict(_good(), **over)
    return F.lstm_projection(a["x"], a["lengths"], a["w_ih"], a["w_hh"], a["bias"], a["w_proj"], a["h0"], a["c0"],
                             a.get("cell_clip"), a.get("proj_clip"))


@pytest.mark.parametrize("over,error,match", [
    (dict(lengths=torch.tensor([4, 1])), ValueError, "lengths"),
    (dict(lengths=torch.tensor([-1, 1])), ValueError, "lengths"),
    (dict(lengths=torch.tensor([3, 1], dtype=torch.int32)), TypeError, "lengths"),
    (dict(lengths=torch.tensor([3, 1, 1])), ValueError, "lengths"),
    (dict(lengths=torch.tensor([[3, 1]])), ValueError, "lengths"),
    (dict(lengths=[3, 1]), TypeError, "lengths"),
    (dict(x=torch.zeros(2, 3, dtype=torch.float64)), ValueError, "x"),
    (dict(x=torch.zeros(2, 3, 5, dtype=torch.float64)), ValueError, "w_ih"),
    (dict(h0=torch.zeros(3, 3, dtype=torch.float64)), ValueError, "h0"),
    (dict(c0=torch.zeros(2, 4, dtype=torch.float64)), ValueError, "c0"),
    (dict(w_hh=torch.zeros(20, 4, dtype=torch.float64)), ValueError, "w_hh"),
    (dict(w_proj=torch.zeros(3, 4, dtype=torch.float64)), ValueError, "w_proj"),
    (dict(bias=torch.zeros(19, dtype=torch.float64)), ValueError, "bias"),
    (dict(w_ih=torch.zeros(20, 4, dtype=torch.float32)), TypeError, "w_ih"),
    (dict(c0=torch.zeros(2, 5, dtype=torch.float32)), TypeError, "c0"),
    (dict(x=torch.zeros(2, 3, 4, dtype=torch.int64)), TypeError, "x"),
    (dict(cell_clip="3"), TypeError, "cell_clip"),
])
def test_lstm_projection_bad_inputs(over, error, match):
    with pytest.raises(error, match=match):
        _call(**over)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_lstm_projection_lengths_on_cuda_rejected():
    a = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _good().items()}
    with pytest.raises(ValueError, match="lengths"):
        _call(**{k: v.float() if k != "lengths" and v is not None else v for k, v in a.items()})


def test_lstm_projection_cpp_checks_are_last_defence():
    a = _good()
    with pytest.raises(RuntimeError, match="lengths"):
        torch.ops.elmo_fast.lstm_projection(a["x"], torch.tensor([9, 1]), a["w_ih"], a["w_hh"], a["bias"],
                                            a["w_proj"], a["h0"], a["c0"], 0.0, 0.0, False, False)


@pytest.mark.parametrize("gemm", ["mm", "onednn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inference_input_gemm_in_chunks(dtype, gemm):
    """Note [chunked input GEMM]: without grad, more packed rows than a chunk (1024 here) run the input
    GEMM chunk by chunk on oneDNN's own results; same numbers as the saved, one-GEMM path."""
    gen = torch.Generator().manual_seed(21)
    t, lens = make_case(gen, 3, 400, 4, 5, 3, [400, 350, 300], dtype=dtype)
    try:
        torch.ops.elmo_fast._set_cpu_gemm(gemm)
        with torch.no_grad():
            chunked = run(F.lstm_projection, t, lens, 0.6, 0.4, True)
        whole = run(F.lstm_projection, t, lens, 0.6, 0.4, True)  # inputs require grad: saved, one GEMM
    finally:
        torch.ops.elmo_fast._set_cpu_gemm("auto")
    want = run(R.lstm_projection, detached(t), lens, 0.6, 0.4, True)
    for c, w, e in zip(chunked, whole, want):
        assert_close_verbose(c, w.detach(), **TOL[dtype])
        assert_close_verbose(c, e.detach(), **TOL[dtype])
