"""The persistent LSTM forward (csrc/cuda/lstm_persistent.cu, Note [persistent LSTM]) and its switch.

Without a GPU the kernel cannot run, so its design is checked here: the layout's invariants, and a
float64 emulation of exactly what the kernel computes (per-block weight slices zero-padded to the
layout, 32-row passes over staged h, the 2-D split of the projection into partial sums summed in
group order, the packed rows of Note [LSTM packing]) against the reference. The CUDA tests run the
kernel itself, forced by name, against the reference and the stepwise path.
"""
import os
import subprocess
import sys

import pytest
import torch

import elmo_fast
import elmo_fast.functional as F
import elmo_fast.reference as R
from test_lstm_projection import CASES, ORDER, check_low_precision_cuda, detached, make_case, run
from util import make_plan

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
ROWS = 32  # kLstmPtRows
H100_SMS, H100_SHARED = 132, 232448  # also the H200's
A100_SMS, A100_SHARED = 108, 166912
KEYS = ["units", "blocks", "Pp", "ldw", "lds", "col_groups", "cols", "unit_groups", "group_units", "ldm", "Pcols",
        "w_hh_bytes", "w_proj_bytes", "stage_bytes", "shared_bytes", "fits"]


def layout(n, P, has_proj=True, sms=H100_SMS, max_shared=H100_SHARED):
    return dict(zip(KEYS, torch.ops.elmo_fast._lstm_persistent_layout(n, P, has_proj, sms, max_shared)))


def round_up(x, m):
    return (x + m - 1) // m * m


def ceil_div(a, b):
    return (a + b - 1) // b


@pytest.mark.parametrize("seed", range(40))
def test_layout_invariants(seed):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    n, P, sms, has_proj = rnd(1, 6000), rnd(1, 1200), rnd(1, 160), bool(seed % 4)
    P = P if has_proj else n
    lay = layout(n, P, has_proj, sms)
    u, blocks = lay["units"], lay["blocks"]
    assert u % 4 == 0 and u >= 4 and u == max(4, round_up(ceil_div(n, sms), 4))
    assert blocks == ceil_div(n, u) and (blocks - 1) * u < n <= blocks * u    # every block owns a cell
    assert lay["Pp"] % 16 == 0 and P <= lay["Pp"] < P + 16
    assert lay["ldw"] == lay["Pp"] + 8 and lay["lds"] == 4 * u + 4           # WMMA ldm: 8 halves, 4 floats
    staged = [ROWS * lay["ldw"] * 2, ROWS * lay["lds"] * 4]
    if has_proj:
        cols, b, a, ug = lay["cols"], lay["col_groups"], lay["unit_groups"], lay["group_units"]
        assert cols % 16 == 0 and (b - 1) * cols < P <= b * cols               # the groups cover P once
        assert ug % 16 == 0 and (a - 1) * ug < n <= a * ug                     # and the cells once
        assert a * b <= blocks                                                 # each (p, q) has a block
        assert lay["ldm"] == ug + 8 and lay["Pcols"] == b * cols
        assert lay["w_proj_bytes"] == round_up(cols * lay["ldm"] * 2, 128)
        staged.append(ROWS * lay["ldm"] * 2)
    else:
        assert lay["col_groups"] == lay["unit_groups"] == lay["w_proj_bytes"] == 0
    assert lay["w_hh_bytes"] == round_up(4 * u * lay["ldw"] * 2, 128)
    assert lay["stage_bytes"] == round_up(max(staged), 128)
    assert lay["shared_bytes"] == lay["w_hh_bytes"] + lay["w_proj_bytes"] + lay["stage_bytes"]
    assert lay["fits"] == int(u <= 32 and blocks <= sms and lay["shared_bytes"] <= H100_SHARED)


def test_layout_of_the_published_models():
    original = layout(4096, 512)  # bfloat16 on an H100 / H200: 128 blocks of 32 cells, 16 x 8 projection tiles
    assert (original["units"], original["blocks"], original["unit_groups"], original["col_groups"]) == (32, 128, 16, 8)
    assert original["shared_bytes"] == 200192 and original["fits"]
    assert not layout(4096, 512, sms=A100_SMS, max_shared=A100_SHARED)["fits"]  # the slices exceed an A100's block
    assert layout(1024, 128)["fits"] and layout(2048, 256)["fits"]              # small and medium
    assert layout(512, 512, has_proj=False)["fits"]                              # a plain LSTM layer
    assert not layout(8192, 512)["fits"]                                         # more than 32 cells per block


def emulate_persistent(t, lengths, cell_clip, proj_clip, reverse, sms):
    """float64 transcription of lstm_persistent_kernel, block by block, for one layout."""
    x, w_ih, w_hh, bias, w_proj, h0, c0 = (t[k] for k in ORDER)
    B, T, _ = x.shape
    n, P = c0.shape[1], h0.shape[1]
    has_proj = w_proj is not None
    lay = layout(n, P, has_proj, sms, max_shared=1 << 30)
    u, Pp = lay["units"], lay["Pp"]
    plan = make_plan(lengths.tolist(), T, reverse)
    perm, steps, active, offset, pack = plan.perm, plan.steps, plan.active, plan.offset, plan.pack
    xp = x.reshape(B * T, -1)[pack]
    g = xp @ w_ih.T + (bias if bias is not None else 0)  # the hoisted input GEMM
    hbuf = torch.zeros(B + offset[-1], P, dtype=torch.float64)
    hbuf[:B] = h0[perm]
    c = c0[perm].clone()
    m = torch.zeros(B, n, dtype=torch.float64)
    clip = lambda v, lim: v.clamp(-lim, lim) if lim is not None and lim > 0 else v  # noqa: E731
    for s in range(steps):
        off, rows_s = offset[s], active[s]
        h_row = 0 if s == 0 else B + offset[s - 1]
        for j in range(lay["blocks"]):  # phase 1
            cells = torch.arange(j * u, (j + 1) * u)
            real = cells < n
            w_slice = torch.zeros(4 * u, Pp, dtype=torch.float64)
            for gate in range(4):
                w_slice[gate * u:(gate + 1) * u][real, :P] = w_hh[gate * n + cells[real]]
            for r0 in range(0, rows_s, ROWS):
                rows = min(ROWS, rows_s - r0)
                staged = torch.zeros(ROWS, Pp, dtype=torch.float64)
                staged[:rows, :P] = hbuf[h_row + r0:h_row + r0 + rows]
                z = staged @ w_slice.T
                for r in range(rows):
                    row = off + r0 + r
                    pre = [z[r, gate * u:(gate + 1) * u][real] + g[row, gate * n + cells[real]] for gate in range(4)]
                    i, f, jj, o = torch.sigmoid(pre[0]), torch.sigmoid(pre[1]), torch.tanh(pre[2]), torch.sigmoid(pre[3])
                    c_new = clip(f * c[r0 + r, cells[real]] + i * jj, cell_clip)
                    c[r0 + r, cells[real]] = c_new
                    mu = o * torch.tanh(c_new)
                    if has_proj:
                        m[r0 + r, cells[real]] = mu
                    else:
                        hbuf[B + row, cells[real]] = clip(mu, proj_clip)
        if not has_proj:
            continue
        cols, ug, a, b = lay["cols"], lay["group_units"], lay["unit_groups"], lay["col_groups"]
        partial = torch.full((a, round_up(B, ROWS), lay["Pcols"]), float("nan"), dtype=torch.float64)
        for block in range(a * b):  # phase 2
            p, q = divmod(block, b)
            c0_, valid = p * ug, min(ug, n - p * ug)
            w_slice = torch.zeros(cols, ug, dtype=torch.float64)
            outs = torch.arange(q * cols, (q + 1) * cols)
            w_slice[outs < P, :valid] = w_proj[outs[outs < P], c0_:c0_ + valid]
            for r0 in range(0, rows_s, ROWS):
                rows = min(ROWS, rows_s - r0)
                staged = torch.zeros(ROWS, ug, dtype=torch.float64)
                staged[:rows, :valid] = m[r0:r0 + rows, c0_:c0_ + valid]
                tiles = round_up(rows, 16)  # the kernel stores only the row tiles it computed
                partial[p, r0:r0 + tiles, q * cols:(q + 1) * cols] = (staged @ w_slice.T)[:tiles]
        summed = torch.zeros(rows_s, P, dtype=torch.float64)  # phase 3, in group order
        for p in range(a):
            summed = summed + partial[p, :rows_s, :P]
        hbuf[B + off:B + off + rows_s] = clip(summed, proj_clip)
    out = torch.zeros(B * T, P, dtype=torch.float64)
    out[pack] = hbuf[B:]
    h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
    h_n[perm] = hbuf[plan.last]
    c_n[perm] = c
    return out.view(B, T, P), h_n, c_n


# (B, T, I, n, P, lengths, sms): more than one 32-row pass, cells and outputs off every tile size,
# many unit groups, no projection, a block of padding cells.
EMULATED = [case + (sms,) for case, sms in zip(CASES, [1, 2, 3, 5, 7, 40, 2])] + [
    (41, 3, 6, 37, 20, [3] * 20 + [2] * 10 + [1] * 11, 3),
    (35, 2, 4, 70, 40, list(range(2, 0, -1)) * 17 + [0], 9),
    (3, 4, 5, 24, None, [4, 1, 3], 4),
]


@pytest.mark.parametrize("case", range(len(EMULATED)))
@pytest.mark.parametrize("reverse", [False, True])
def test_emulation_matches_reference(case, reverse):
    B, T, I, n, P, lengths, sms = EMULATED[case]
    gen = torch.Generator().manual_seed(100 + case)
    t, lens = make_case(gen, B, T, I, n, P, lengths, bias=case % 3 != 1, state=case % 2 == 0, scale=2.0,
                        requires_grad=False)
    clips = (0.6, 0.4) if case % 2 else (None, None)
    got = emulate_persistent(t, lens, *clips, reverse, sms)
    want = run(R.lstm_projection, t, lens, *clips, reverse)
    for name, g_, w in zip(["out", "h_n", "c_n"], got, want):
        torch.testing.assert_close(g_, w, rtol=1e-12, atol=1e-12, msg=name)


# --- the switch ----------------------------------------------------------------------------------

@pytest.fixture
def lstm_kernel(set_kernel):
    return lambda mode: set_kernel("lstm", mode)


def test_kernel_info_lists_the_lstm_family(lstm_kernel):
    info = elmo_fast.kernel_info()["lstm"]
    assert info["env"] == "ELMO_FAST_LSTM_KERNEL"
    assert info["choices"] == ["stepwise", "persistent"]
    assert set(info["validated"]) <= {"persistent"}
    lstm_kernel("persistent")
    assert elmo_fast.kernel_info()["lstm"]["mode"] == "persistent"
    with pytest.raises(ValueError, match="must be one of 'auto', 'stepwise', 'persistent', got 'fused'"):
        lstm_kernel("fused")


def test_bad_environment_value_is_a_clear_error():
    env = dict(os.environ, ELMO_FAST_LSTM_KERNEL="persist")
    result = subprocess.run([sys.executable, "-c", "import elmo_fast; elmo_fast.kernel_info()"], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "ELMO_FAST_LSTM_KERNEL must be one of 'auto', 'stepwise', 'persistent', got 'persist'" in result.stderr


def test_cpu_ignores_the_cuda_switch(lstm_kernel):
    """The family chooses CUDA kernels only: the CPU op gives the same bits under every mode."""
    t, lens = make_case(torch.Generator().manual_seed(7), 4, 6, 5, 7, 3, [6, 2, 0, 5], requires_grad=False)
    results = []
    for mode in ["auto", "stepwise", "persistent"]:
        lstm_kernel(mode)
        results.append(run(F.lstm_projection, t, lens, 0.6, 0.4, True))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# --- CUDA: the kernel itself ----------------------------------------------------------------------

# (B, T, I, n, P, lengths): one row, two 32-row passes, odd sizes (scalar staging), no projection,
# zero-length rows, and the original model's layer.
CUDA_CASES = [
    (1, 5, 8, 16, 8, [5]),
    (40, 6, 16, 64, 32, [6] * 20 + [3] * 19 + [0]),
    (5, 9, 17, 33, 11, [3, 9, 9, 1, 0]),
    (3, 7, 8, 24, None, [7, 2, 7]),
    (6, 5, 4, 129, 31, [0, 5, 2, 2, 4, 1]),
    (64, 34, 512, 4096, 512, [34] * 40 + [20] * 24),
]


def low_precision_errors(t, lens, dtype, clips, reverse):
    exact = run(R.lstm_projection, detached(t), lens, *clips, reverse)
    got = run(F.lstm_projection, detached(t, dtype), lens, *clips, reverse)
    ref_low = run(R.lstm_projection, detached(t, dtype), lens, *clips, reverse)
    return [((g.double() - e).abs().max().item(), (r.double() - e).abs().max().item())
            for g, r, e in zip(got, ref_low, exact)], got


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CUDA_CASES)))
@pytest.mark.parametrize("reverse", [False, True])
def test_persistent_cuda_matches_reference(lstm_kernel, dtype, case, reverse):
    """Forward, forced: error against the float64 reference at most ~2x the reference's own in dtype."""
    B, T, I, n, P, lengths = CUDA_CASES[case]
    gen = torch.Generator().manual_seed(200 + case)
    t, lens = make_case(gen, B, T, I, n, P, lengths, device="cuda", bias=case != 2, state=case % 2 == 0,
                        scale=1.5, requires_grad=False)
    clips = (0.6, 0.4) if case % 2 else (3.0, 3.0)
    lstm_kernel("persistent")
    errors, _ = low_precision_errors(t, lens, dtype, clips, reverse)
    for name, (err, ref_err) in zip(["out", "h_n", "c_n"], errors):
        assert err <= 2 * ref_err + 1e-3, (name, err, ref_err)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_persistent_cuda_close_to_stepwise_and_deterministic(lstm_kernel, dtype):
    gen = torch.Generator().manual_seed(31)
    t, lens = make_case(gen, 40, 12, 32, 256, 64, [12] * 30 + [5] * 10, device="cuda", requires_grad=False)
    low = detached(t, dtype)
    lstm_kernel("stepwise")
    stepwise = run(F.lstm_projection, low, lens, 3.0, 3.0, False)
    lstm_kernel("persistent")
    first = run(F.lstm_projection, low, lens, 3.0, 3.0, False)
    again = run(F.lstm_projection, low, lens, 3.0, 3.0, False)
    for s, a, b in zip(stepwise, first, again):
        assert torch.equal(a, b)  # fixed summation order: the same bits every run
        rel = (a.double() - s.double()).norm() / s.double().norm().clamp_min(1e-6)
        assert rel < 5e-2, rel  # bf16 rounding apart (stepwise rounds z to dtype); a wrong index is O(1)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
def test_persistent_cuda_training_forward_gradients(lstm_kernel, dtype, reverse):
    """Saved activations from the persistent forward drive the stepwise backward to the reference's gradients."""
    lstm_kernel("persistent")
    check_low_precision_cuda(dtype, reverse)


@needs_cuda
def test_persistent_cuda_two_launches(lstm_kernel):
    """A sequence longer than one input chunk (4096 rows of gates at n = 4096) runs as two launches
    that carry the state through global memory. Small weights make the recurrence forget, so the
    steps after the chunk boundary agree with stepwise to rounding unless the carry is wrong."""
    gen = torch.Generator().manual_seed(33)
    t, lens = make_case(gen, 1, 4100, 16, 4096, 512, [4100], device="cuda", scale=0.3, requires_grad=False)
    low = detached(t, torch.bfloat16)
    with torch.no_grad():
        lstm_kernel("stepwise")
        stepwise = run(F.lstm_projection, low, lens, 3.0, 3.0, False)
        lstm_kernel("persistent")
        got = run(F.lstm_projection, low, lens, 3.0, 3.0, False)
    pairs = [(got[0][:, 4090:], stepwise[0][:, 4090:]), (got[1], stepwise[1]), (got[2], stepwise[2])]
    for name, (g, s) in zip(["out after the boundary", "h_n", "c_n"], pairs):
        rel = (g.double() - s.double()).norm() / s.double().norm().clamp_min(1e-6)
        assert rel < 5e-2, (name, rel)


@needs_cuda
@pytest.mark.parametrize("n,P", [(0, None), (4, 0), (0, 3)])
def test_persistent_cuda_zero_width_steps(lstm_kernel, n, P):
    """No cells or no projection outputs: persistent, forced, hands the call to stepwise instead of
    building a layout from a zero size."""
    t, lens = make_case(torch.Generator().manual_seed(37), 3, 4, 8, n, P, [4, 2, 0], device="cuda",
                        requires_grad=False)
    low = detached(t, torch.bfloat16)
    lstm_kernel("stepwise")
    stepwise = run(F.lstm_projection, low, lens, 3.0, 3.0, False)
    lstm_kernel("persistent")
    got = run(F.lstm_projection, low, lens, 3.0, 3.0, False)
    for a, b in zip(got, stepwise):
        assert torch.equal(a, b)


@needs_cuda
def test_persistent_cuda_graph_capture(lstm_kernel):
    gen = torch.Generator().manual_seed(34)
    t, lens = make_case(gen, 8, 6, 16, 64, 32, [6, 6, 5, 4, 4, 2, 1, 0], device="cuda", requires_grad=False)
    low = detached(t, torch.bfloat16)
    lstm_kernel("persistent")
    with torch.no_grad():
        eager = run(F.lstm_projection, low, lens, 3.0, 3.0, False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run(F.lstm_projection, low, lens, 3.0, 3.0, False)  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run(F.lstm_projection, low, lens, 3.0, 3.0, False)
        graph.replay()
        torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)


@needs_cuda
def test_persistent_cuda_float32_asked_for_by_name_raises(lstm_kernel):
    t, lens = make_case(torch.Generator().manual_seed(35), 2, 3, 4, 8, 4, [3, 1], dtype=torch.float32,
                        device="cuda", requires_grad=False)
    lstm_kernel("persistent")
    with pytest.raises(RuntimeError, match="persistent kernel was asked for .* float16 or bfloat16"):
        run(F.lstm_projection, t, lens, None, None, False)
    lstm_kernel("auto")  # auto never fails: it steps
    run(F.lstm_projection, t, lens, None, None, False)


@needs_cuda
def test_persistent_cuda_bidirectional_ignores_streams(set_kernel):
    """With the persistent kernel the two directions take turns even when streams are asked for
    (two grids that each need every multiprocessor), with the same bits as serial."""
    from test_lstm_bidirectional import make_pair

    gen = torch.Generator().manual_seed(36)
    xs, weights, h0, c0 = make_pair(gen, 16, 22, 64, 96, 32, shared_x=False, dtype=torch.bfloat16, device="cuda")
    lens = torch.tensor([22, 3, 22, 0] * 4)
    set_kernel("lstm", "persistent")
    with torch.no_grad():
        set_kernel("cuda_directions", "serial")
        serial = F.lstm_bidirectional(xs, lens, weights, h0, c0, 0.6, 0.4)
        set_kernel("cuda_directions", "streams")
        streams = F.lstm_bidirectional(xs, lens, weights, h0, c0, 0.6, 0.4)
    for group_a, group_b in zip(serial, streams):
        for a, b in zip(group_a, group_b):
            assert torch.equal(a, b)
