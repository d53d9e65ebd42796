"""Both directions of a layer in one op (torch.ops.elmo_fast.lstm_bidirectional), one after the other or
side by side (ELMO_FAST_CPU_DIRECTIONS), against reference.lstm_projection per direction."""
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import elmo_fast
from elmo_fast import functional as F
from elmo_fast import reference as R
from util import TOL, assert_close_verbose

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NAMES = ["w_ih", "w_hh", "bias", "w_proj"]


@pytest.fixture
def directions_mode():
    """Sets the CPU directions mode for one test and restores auto (the default) afterwards."""
    threads = torch.get_num_threads()
    yield torch.ops.elmo_fast._set_cpu_directions
    torch.ops.elmo_fast._set_cpu_directions("auto")
    torch.ops.elmo_fast._cpu_directions_reset()
    torch.set_num_threads(threads)


def make_pair(gen, B, T, I, n, P, *, shared_x, bias=True, dtype=torch.float64, device="cpu", scale=1.0):
    """Inputs for both directions (different weights and states; one x or two). P=None: no projection."""
    p = n if P is None else P

    def r(*shape, fan=1):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * (scale / fan**0.5)
        return t.to(device=device, dtype=dtype).requires_grad_()

    xs = [r(B, T, I)] * 2 if shared_x else [r(B, T, I), r(B, T, I)]
    weights = [(r(4 * n, I, fan=I), r(4 * n, p, fan=p), r(4 * n) if bias else None,
                r(p, n, fan=n) if P is not None else None) for _ in range(2)]
    return xs, weights, [r(B, p) for _ in range(2)], [r(B, n) for _ in range(2)]


def leaves(xs, weights, h0, c0):
    seen, out = set(), []
    for t in [*xs, *(w for ws in weights for w in ws), *h0, *c0]:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


# (B, T, I, n, P, lengths): batch 1, length 1, ragged with zero-length rows, no projection, empty batch.
CASES = [
    (1, 1, 3, 5, 2, [1]),
    (4, 6, 5, 7, 3, [6, 2, 0, 5]),
    (3, 5, 4, 6, None, [5, 0, 3]),
    (5, 9, 17, 33, 11, [3, 9, 9, 1, 0]),
    (0, 4, 3, 5, 2, []),
]


@pytest.mark.parametrize("mode,threads", [("serial", 1), ("serial", 2), ("concurrent", 2), ("concurrent", 3),
                                          ("concurrent", 4), ("auto", 2)])
@pytest.mark.parametrize("shared_x", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_bidirectional_matches_reference(case, shared_x, mode, threads, directions_mode):
    B, T, I, n, P, lengths = case
    directions_mode(mode)
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(hash((B, T, I, n)) % 1000)
    xs, weights, h0, c0 = make_pair(gen, B, T, I, n, P, shared_x=shared_x, bias=P is not None)
    lens = torch.tensor(lengths, dtype=torch.int64)
    got = F.lstm_bidirectional(xs[0] if shared_x else xs, lens, weights, h0, c0, 0.6, 0.4)
    want = [R.lstm_projection(xs[i], lens, *weights[i], h0[i], c0[i], 0.6, 0.4, i == 1) for i in range(2)]
    for i in range(2):
        for k, name in enumerate(("out", "h_n", "c_n")):
            assert_close_verbose(got[k][i], want[i][k], f"direction {i} {name}", **TOL[torch.float64])
    params = leaves(xs, weights, h0, c0)
    ups = [[torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in got[k]] for k in range(3)]
    loss = sum((g * u).sum() for k in range(3) for g, u in zip(got[k], ups[k]))
    want_loss = sum((want[i][k] * ups[k][i]).sum() for k in range(3) for i in range(2))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    want_grads = torch.autograd.grad(want_loss, params, allow_unused=True)
    for j, (g, w) in enumerate(zip(grads, want_grads)):
        assert_close_verbose(g if g is not None else torch.zeros_like(params[j]),
                             w if w is not None else torch.zeros_like(params[j]), f"grad {j}", **TOL[torch.float64])


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_concurrent_equals_serial(dtype, threads, directions_mode):
    """The same GEMMs and pointwise passes run either way: side by side changes nothing but threads."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(3)
    xs, weights, h0, c0 = make_pair(gen, 6, 7, 32, 48, 16, shared_x=False, dtype=dtype, scale=2.0)
    lens = torch.tensor([7, 3, 0, 7, 1, 5])
    results = []
    for mode in ("serial", "concurrent"):
        directions_mode(mode)
        out, h_n, c_n = F.lstm_bidirectional(xs, lens, weights, h0, c0, 0.5, 0.3)
        grads = torch.autograd.grad(sum(o.float().sum() for o in out + h_n), leaves(xs, weights, h0, c0))
        results.append([*out, *h_n, *c_n, *grads])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for a, b in zip(*results):
        assert_close_verbose(a.float(), b.float(), **tol)


def test_auto_measures_then_chooses(directions_mode):
    """auto: small jobs always run one after the other; big ones are timed both ways, then decided."""
    directions_mode("auto")
    torch.ops.elmo_fast._cpu_directions_reset()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        small = make_pair(gen, 2, 3, 4, 5, 3, shared_x=True)
        F.lstm_bidirectional(small[0][0], torch.tensor([3, 1]), *small[1:])
        assert json.loads(torch.ops.elmo_fast._cpu_directions_info())["decisions"] == {}
        # ~1.6e8 FLOPs per direction: above the threshold for a decision.
        xs, weights, h0, c0 = make_pair(gen, 8, 10, 256, 1024, 256, shared_x=True, dtype=torch.float32)
        lens = torch.full((8,), 10, dtype=torch.int64)
        for _ in range(6):  # 2 warm-up calls, then 2 timed calls of each way
            F.lstm_bidirectional(xs[0], lens, weights, h0, c0)
    info = json.loads(torch.ops.elmo_fast._cpu_directions_info())
    (key, decision), = info["decisions"].items()
    assert key.startswith("forward/Float/") and key.endswith("/threads=2"), key
    assert decision["choice"] in ("serial", "concurrent") and decision["serial_ms"] > 0 < decision["concurrent_ms"]


def test_one_thread_never_splits(directions_mode):
    directions_mode("concurrent")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(5)
    xs, weights, h0, c0 = make_pair(gen, 2, 3, 4, 5, 3, shared_x=True)
    out, _, _ = F.lstm_bidirectional(xs[0], torch.tensor([3, 2]), weights, h0, c0)
    want = R.lstm_projection(xs[0], torch.tensor([3, 2]), *weights[1], h0[1], c0[1], None, None, True)
    assert_close_verbose(out[1], want[0], **TOL[torch.float64])


@pytest.mark.parametrize("threads,teams", [(2, [1, 1]), (3, [2, 1]), (4, [2, 2]), (5, [3, 2]), (7, [2, 2, 2, 1])])
def test_thread_teams_split_the_threads(threads, teams):
    """Note [thread teams]: each job runs at the same time as the others, and ATen, OpenMP and MKL all see
    its team's size inside it; the caller's count is back afterwards. (threads > cores is fine here.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.ops.elmo_fast._cpu_teams_probe(threads, len(teams))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    for i, size in enumerate(teams):
        aten, team, together, mkl = got[4 * i:4 * i + 4]
        assert (aten, team, together) == (size, size, 1), (i, got)
        assert mkl in (size, -1), (i, got)  # -1: a torch without MKL


def test_thread_teams_refuse_more_teams_than_threads():
    with pytest.raises(RuntimeError, match="cannot split 2 threads into 3 teams"):
        torch.ops.elmo_fast._cpu_teams_probe(2, 3)


@pytest.mark.parametrize("threads", [2, 4])
def test_concurrent_error_in_the_reverse_direction_propagates(threads, directions_mode):
    """The reverse direction runs on the caller's second OpenMP thread (2 threads: teams of one) or on a
    helper thread (4: teams of two): its exception reaches the caller, and the next call runs."""
    directions_mode("concurrent")
    torch.set_num_threads(threads)
    a = _good()
    cols = [[a["weights"][0][k], a["weights"][1][k]] for k in range(4)]
    bad_w_hh = [cols[1][0], torch.zeros(20, 4, dtype=torch.float64)]
    with pytest.raises(RuntimeError, match="w_hh"):
        torch.ops.elmo_fast.lstm_bidirectional(a["x"], a["lengths"], cols[0], bad_w_hh, *cols[2:], a["h0"], a["c0"],
                                               0.0, 0.0, False)
    got = torch.ops.elmo_fast.lstm_bidirectional(a["x"], a["lengths"], *cols, a["h0"], a["c0"], 0.0, 0.0, False)
    want = R.lstm_projection(a["x"][1], a["lengths"], *a["weights"][1], a["h0"][1], a["c0"][1], None, None, True)
    assert_close_verbose(got[0][1], want[0], **TOL[torch.float64])


def test_concurrent_from_two_python_threads(directions_mode):
    """Two callers at once: one gets the helper, the other runs its directions one after the other
    (teams of 2: with 2 threads each caller would use its own OpenMP team and no helper)."""
    directions_mode("concurrent")
    torch.set_num_threads(4)
    a = _good()
    want = [R.lstm_projection(a["x"][i], a["lengths"], *a["weights"][i], a["h0"][i], a["c0"][i], None, None, i == 1)[0]
            for i in range(2)]
    errors = []

    def worker():
        try:
            for _ in range(30):
                out, _, _ = F.lstm_bidirectional(a["x"], a["lengths"], a["weights"], a["h0"], a["c0"])
                for i in range(2):
                    assert_close_verbose(out[i], want[i], **TOL[torch.float64])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors, errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_thread_teams_in_a_forked_child():
    """A forked child has no helper threads (Note [thread teams]): it must make new ones, not wait on the
    parent's. libgomp does not survive a fork in a thread that has opened a parallel region, so the
    parent's teams run from a side thread and the child's from the main thread."""
    code = textwrap.dedent("""
        import os, signal, threading, torch, elmo_fast
        probe = torch.ops.elmo_fast._cpu_teams_probe
        parent = []
        side = threading.Thread(target=lambda: parent.append(probe(4, 2)))
        side.start()
        side.join()
        assert parent[0][2] == parent[0][6] == 1, parent  # teams of 2: the parent's helper ran job 1
        pid = os.fork()
        if pid == 0:
            signal.alarm(30)  # a child stuck on the parent's helper must not outlive the test
            got = probe(4, 2)
            os._exit(0 if got[2] == got[6] == 1 else 3)
        _, status = os.waitpid(pid, 0)
        raise SystemExit(os.waitstatus_to_exitcode(status))
    """)
    result = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True, text=True)
    assert result.returncode == 0, (result.returncode, result.stderr)


def test_bad_mode_rejected(directions_mode):
    with pytest.raises(RuntimeError, match="'auto', 'concurrent' or 'serial'"):
        directions_mode("sideways")


def _sample_args(requires_grad):
    gen = torch.Generator().manual_seed(6)
    samples = []
    for P, bias, shared in ((3, True, False), (None, False, True)):
        xs, weights, h0, c0 = make_pair(gen, 3, 4, 2, 5, P, shared_x=shared, bias=bias)
        if not requires_grad:
            xs, weights, h0, c0 = ([t.detach() for t in xs], [[None if w is None else w.detach() for w in ws]
                                                              for ws in weights],
                                   [t.detach() for t in h0], [t.detach() for t in c0])
        cols = [[weights[0][k], weights[1][k]] for k in range(4)]
        for save in (False, True):
            samples.append((xs, torch.tensor([4, 0, 2]), *cols, h0, c0, 0.5, 0.3, save))
    return samples


@pytest.mark.parametrize("requires_grad", [False, True])
def test_bidirectional_opcheck(requires_grad):
    for args in _sample_args(requires_grad):
        torch.library.opcheck(torch.ops.elmo_fast.lstm_bidirectional.default, args)


def test_bidirectional_backward_opcheck():
    xs, lens, w_ih, w_hh, bias, w_proj, h0, c0, cc, pc, _ = _sample_args(False)[1]
    out, h_n, c_n, act = torch.ops.elmo_fast.lstm_bidirectional(xs, lens, w_ih, w_hh, bias, w_proj, h0, c0, cc, pc,
                                                                True)
    args = ([torch.randn_like(t) for t in out], [torch.randn_like(t) for t in h_n], [torch.randn_like(t) for t in c_n],
            xs, lens, w_ih, w_hh, w_proj, h0, c0, out, act, True, cc, pc)
    torch.library.opcheck(torch.ops.elmo_fast.lstm_bidirectional_backward.default, args)


def test_bidirectional_torch_compile(directions_mode):
    directions_mode("concurrent")
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(7)
    xs, weights, h0, c0 = make_pair(gen, 3, 5, 4, 6, 3, shared_x=False)
    lens = torch.tensor([5, 2, 0])

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(x0, x1, *flat):
        ws = [flat[0:4], flat[4:8]]
        out, h, c = F.lstm_bidirectional([x0, x1], lens, ws, flat[8:10], flat[10:12], 0.5, 0.4)
        return out[0] * 2 + out[1], h[1]

    flat = [*weights[0], *weights[1], *h0, *c0]
    got = fn(*xs, *flat)
    want = [R.lstm_projection(xs[i], lens, *weights[i], h0[i], c0[i], 0.5, 0.4, i == 1) for i in range(2)]
    assert_close_verbose(got[0], want[0][0] * 2 + want[1][0], **TOL[torch.float64])
    g = torch.autograd.grad(got[0].sum() + got[1].sum(), xs)
    g_want = torch.autograd.grad((want[0][0] * 2 + want[1][0]).sum() + want[1][1].sum(), xs)
    for a, b in zip(g, g_want):
        assert_close_verbose(a, b, **TOL[torch.float64])


def _good():
    gen = torch.Generator().manual_seed(8)
    xs, weights, h0, c0 = make_pair(gen, 2, 3, 4, 5, 3, shared_x=False)
    return dict(x=xs, lengths=torch.tensor([3, 1]), weights=[list(w) for w in weights], h0=h0, c0=c0)


def _with_weight(direction, index, value):
    a = _good()
    a["weights"][direction][index] = value
    return a


@pytest.mark.parametrize("args,error,match", [
    (dict(_good(), x=[torch.zeros(2, 3, 4, dtype=torch.float64)]), ValueError, "x must be a pair"),
    (dict(_good(), h0=_good()["h0"][:1]), ValueError, "h0 must be a pair"),
    (dict(_good(), weights=_good()["weights"] * 2), ValueError, "weights must be a pair"),
    (_with_weight(1, 1, torch.zeros(20, 4, dtype=torch.float64)), ValueError, "reverse w_hh"),
    (_with_weight(0, 0, torch.zeros(20, 4, dtype=torch.float32)), TypeError, "forward w_ih"),
    (_with_weight(1, 2, None), ValueError, "bias must be given for both directions"),
    (dict(_good(), x=[_good()["x"][0], torch.zeros(2, 2, 4, dtype=torch.float64)]), ValueError, "reverse"),
    (dict(_good(), x=[_good()["x"][0], torch.zeros(2, 3, 4, dtype=torch.float32)]), TypeError, "reverse x"),
    (dict(_good(), lengths=torch.tensor([4, 1])), ValueError, "lengths"),
])
def test_bidirectional_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        F.lstm_bidirectional(args["x"], args["lengths"], args["weights"], args["h0"], args["c0"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bidirectional_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(9)
    xs, weights, h0, c0 = make_pair(gen, 5, 9, 17, 33, 11, shared_x=False, dtype=torch.float32)
    lens = torch.tensor([3, 9, 9, 1, 0])
    cpu = F.lstm_bidirectional(xs, lens, weights, h0, c0, 0.6, 0.4)
    to = lambda t: None if t is None else t.detach().cuda()  # noqa: E731
    cuda = F.lstm_bidirectional([to(t) for t in xs], lens, [[to(w) for w in ws] for ws in weights],
                                [to(t) for t in h0], [to(t) for t in c0], 0.6, 0.4)
    for k in range(3):
        for i in range(2):
            assert_close_verbose(cuda[k][i].cpu(), cpu[k][i], **TOL[torch.float32])


@pytest.fixture
def cuda_directions():
    yield lambda mode: elmo_fast.set_kernel("cuda_directions", mode)
    elmo_fast.set_kernel("cuda_directions", "auto")


def test_cuda_directions_switch(cuda_directions):
    assert elmo_fast.kernel_info()["cuda_directions"]["env"] == "ELMO_FAST_CUDA_DIRECTIONS"
    cuda_directions("streams")
    assert elmo_fast.kernel_info()["cuda_directions"]["mode"] == "streams"
    with pytest.raises(ValueError, match="'auto', 'serial', 'streams', got 'parallel'"):
        cuda_directions("parallel")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bidirectional_cuda_streams_match_serial(cuda_directions, dtype):
    # Note [directions on two streams]: the same kernels on other streams, so the same bits, forward
    # and backward; then again with the caller on a non-default stream and under graph capture.
    gen = torch.Generator().manual_seed(19)
    xs, weights, h0, c0 = make_pair(gen, 16, 22, 64, 96, 32, shared_x=False, dtype=dtype, device="cuda")
    lens = torch.tensor([22, 3, 22, 0] * 4)
    inputs = leaves(xs, weights, h0, c0)

    def run():
        outs = F.lstm_bidirectional(xs, lens, weights, h0, c0, 0.6, 0.4)
        loss = sum((o.float() ** 2).sum() for group in outs for o in group)
        grads = torch.autograd.grad(loss, inputs)
        return [o.detach().clone() for group in outs for o in group] + [g.clone() for g in grads]

    cuda_directions("serial")
    expected = run()
    cuda_directions("streams")
    for got in (run(), run()):
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run()
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    with torch.no_grad():
        static = F.lstm_bidirectional(xs, lens, weights, h0, c0, 0.6, 0.4)  # warm-up before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = F.lstm_bidirectional(xs, lens, weights, h0, c0, 0.6, 0.4)
        graph.replay()
        torch.cuda.synchronize()
    for a, b in zip([o for group in static for o in group], expected):
        assert torch.equal(a, b)
