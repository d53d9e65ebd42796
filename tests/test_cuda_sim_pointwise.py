"""The pointwise CUDA kernels (csrc/cuda/highway.cu, csrc/cuda/lstm.cu) run in the CPU simulator, against
float64 autograd of the spec's formulas, in every storage type."""
import pytest
import torch

from sim_util import SIM_DTYPES, SIM_TOL, check, code, f32, i64, ptr, sim  # noqa: F401 (fixture)

SHAPES = [(1, 1), (3, 7), (5, 130), (2, 300)]  # (rows, features): one block, and several with a ragged tail


def stored(t, dtype):
    """t rounded to the storage type (what the kernel reads), and its float64 value."""
    s = t.to(dtype).contiguous()
    return s, s.double()


@pytest.mark.parametrize("dtype", SIM_DTYPES, ids=str)
@pytest.mark.parametrize("N,F", SHAPES)
def test_highway_kernels(sim, dtype, N, F):
    torch.manual_seed(N * 1000 + F)
    proj, proj64 = stored(torch.randn(N, 2 * F) * 2, dtype)
    x, x64 = stored(torch.randn(N, F), dtype)
    proj64 = proj64.clone().requires_grad_()
    x64 = x64.clone().requires_grad_()
    h = torch.relu(proj64[:, :F])
    g = torch.sigmoid(proj64[:, F:])
    want = g * x64 + (1 - g) * h

    act = proj.clone()
    y = torch.empty_like(x)
    check(sim.sim_highway_forward(code(dtype), ptr(act), ptr(x), ptr(y), *i64(N, F), 1), "forward")
    torch.testing.assert_close(y.double(), want, **SIM_TOL[dtype])
    torch.testing.assert_close(act.double(), torch.cat([h, g], 1), **SIM_TOL[dtype])  # saved [h | g]

    unsaved = proj.clone()
    y2 = torch.empty_like(x)
    check(sim.sim_highway_forward(code(dtype), ptr(unsaved), ptr(x), ptr(y2), *i64(N, F), 0), "forward unsaved")
    assert torch.equal(unsaved, proj) and torch.equal(y2, y)

    in_place = x.clone()  # y aliases x (the layer update in place)
    check(sim.sim_highway_mix(code(dtype), ptr(act), ptr(in_place), ptr(in_place), *i64(N, F)), "mix")
    a64 = act.double()  # in half types the mix reads the rounded h and g (as the CPU does)
    torch.testing.assert_close(in_place.double(), a64[:, F:] * x.double() + (1 - a64[:, F:]) * a64[:, :F],
                               **SIM_TOL[dtype])
    if dtype == torch.float32:
        assert torch.equal(in_place, y)

    dy, dy64 = stored(torch.randn(N, F), dtype)
    d_proj_want, dx_want = torch.autograd.grad(want, [proj64, x64], dy64)
    d_proj = torch.empty_like(proj)
    dx = torch.empty_like(x)
    check(sim.sim_highway_backward(code(dtype), ptr(dy), ptr(x), ptr(act), ptr(d_proj), ptr(dx), *i64(N, F)),
          "backward")
    torch.testing.assert_close(d_proj.double(), d_proj_want, **SIM_TOL[dtype])
    torch.testing.assert_close(dx.double(), g.detach() * dy64, **SIM_TOL[dtype])  # the direct path only


def lstm_cell(z, c_prev, cell_clip, out_clip):
    n = z.shape[1] // 4
    i, f, o = (torch.sigmoid(z[:, k * n:(k + 1) * n]) for k in (0, 1, 3))
    j = torch.tanh(z[:, 2 * n:3 * n])
    c = f * c_prev + i * j
    if cell_clip > 0:
        c = c.clamp(-cell_clip, cell_clip)
    m = o * torch.tanh(c)
    if out_clip > 0:
        m = m.clamp(-out_clip, out_clip)
    return torch.cat([i, f, j, o], 1), c, m


@pytest.mark.parametrize("dtype", SIM_DTYPES, ids=str)
@pytest.mark.parametrize("A,n", SHAPES)
@pytest.mark.parametrize("cell_clip,out_clip", [(0.0, 0.0), (0.5, 0.3)])
def test_lstm_pointwise_kernels(sim, dtype, A, n, cell_clip, out_clip):
    torch.manual_seed(A * 1000 + n)
    z, z64 = stored(torch.randn(A, 4 * n) * 2, dtype)
    c_prev = torch.randn(A, n)
    z64 = z64.clone().requires_grad_()
    c64 = c_prev.double().requires_grad_()
    gates_want, c_want, m_want = lstm_cell(z64, c64, cell_clip, out_clip)

    gates = torch.empty(A, 4 * n)
    c = c_prev.clone()
    c_save = torch.empty(A, n)
    m = torch.empty(A, n, dtype=dtype)
    check(sim.sim_lstm_forward(code(dtype), ptr(z), ptr(gates), ptr(c), ptr(c_save), ptr(m), *i64(A, n),
                               *f32(cell_clip, out_clip)), "lstm forward")
    tol = SIM_TOL[dtype]
    torch.testing.assert_close(gates.double(), gates_want, **tol)
    torch.testing.assert_close(c.double(), c_want, **tol)
    assert torch.equal(c_save, c)
    torch.testing.assert_close(m.double(), m_want, **tol)

    # Backward of the cell with an upstream dm (on m before its clip: the clip's mask is the projection
    # kernel's job) and dc from the future; out_clip 0 here, as the stepwise backward calls it.
    _, c_ref, m_ref = lstm_cell(z64, c64, cell_clip, 0.0)
    dm, dm64 = stored(torch.randn(A, n), dtype)
    dc_future = torch.randn(A, n)
    dz_want, dc_prev_want = torch.autograd.grad((m_ref, c_ref), [z64, c64], (dm64, dc_future.double()))
    dc = dc_future.clone()
    dz = torch.empty(A, 4 * n, dtype=dtype)
    m_again = torch.empty(A, n, dtype=dtype)
    check(sim.sim_lstm_backward(code(dtype), ptr(dm), ptr(gates), ptr(c), ptr(c_prev), ptr(dc), ptr(dz),
                                ptr(m_again), *i64(A, n), *f32(cell_clip)), "lstm backward")
    torch.testing.assert_close(dz.double(), dz_want, **tol)
    torch.testing.assert_close(dc.double(), dc_prev_want, **tol)
    if cell_clip == 0:
        torch.testing.assert_close(m_again.double(), m_ref, **tol)


@pytest.mark.parametrize("dtype", SIM_DTYPES, ids=str)
def test_lstm_clip_and_projection_backward_kernels(sim, dtype):
    torch.manual_seed(0)
    h, h64 = stored(torch.randn(7, 45) * 2, dtype)
    clipped = h.clone()
    check(sim.sim_lstm_clip(code(dtype), ptr(clipped), *i64(h.numel()), *f32(0.75)), "clip")
    torch.testing.assert_close(clipped.double(), h64.clamp(-0.75, 0.75), **SIM_TOL[dtype])
    d_future, d_future64 = stored(torch.randn(7, 45), dtype)
    d, d64 = stored(torch.randn(7, 45), dtype)
    out = d.clone()
    check(sim.sim_lstm_proj_backward(code(dtype), ptr(d_future), ptr(out), ptr(clipped), *i64(h.numel()),
                                     *f32(0.75)), "projection backward")
    passes = clipped.double().abs() < 0.75
    torch.testing.assert_close(out.double(), torch.where(passes, d_future64 + d64, 0.0), **SIM_TOL[dtype])
    assert (~passes).any() and passes.any()  # both branches taken
