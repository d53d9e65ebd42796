"""Gradients of gradients (create_graph=True, e.g. a gradient penalty) through the fused ops: the first
derivative must equal the plain one, and differentiating it must raise a clear error. Before the fix,
autograd recorded part of the *_backward ops and returned silently wrong second derivatives (highway,
char_cnn) or failed inside mm (the LSTM ops); found by scripts/fuzz_ops.py."""
import pytest
import torch

import elmo_fast.functional as F

DOUBLE_BACKWARD = r"double backward .* not supported"


def _highway(g):
    x = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    return F.highway(x, [w], [b]), [x, w, b]


def _char_cnn(g):
    ids = torch.randint(0, 262, (4, 10), generator=g)
    emb = torch.randn(262, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    return F.char_cnn(ids, emb, [w], [b], activation="tanh"), [emb, w, b]


def _lstm_weights(g, n=3, p=2, i=4):
    shapes = [(4 * n, i), (4 * n, p), (4 * n,), (p, n)]
    return [torch.randn(*s, dtype=torch.float64, generator=g).mul_(0.5).requires_grad_(True) for s in shapes]


def _lstm_projection(g):
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weights = _lstm_weights(g)
    h0, c0 = torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    out, _, _ = F.lstm_projection(x, torch.tensor([3, 1]), *weights, h0, c0, cell_clip=3.0, proj_clip=3.0)
    return out, [x, *weights]


def _lstm_bidirectional(g):
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weights = [_lstm_weights(g), _lstm_weights(g)]
    h0 = [torch.zeros(2, 2, dtype=torch.float64)] * 2
    c0 = [torch.zeros(2, 3, dtype=torch.float64)] * 2
    out, _, _ = F.lstm_bidirectional(x, torch.tensor([3, 1]), weights, h0, c0)
    return out[0] + out[1], [x, *weights[0], *weights[1]]


@pytest.mark.parametrize("build", [_highway, _char_cnn, _lstm_projection, _lstm_bidirectional],
                         ids=lambda f: f.__name__.lstrip("_"))
def test_create_graph_gives_first_derivatives_and_refuses_the_second(build):
    g = torch.Generator().manual_seed(0)
    y, inputs = build(g)
    upstream = torch.randn(y.shape, dtype=y.dtype, generator=g)
    plain = torch.autograd.grad(y, inputs, upstream, retain_graph=True)
    recorded = torch.autograd.grad(y, inputs, upstream, create_graph=True)
    for a, b in zip(plain, recorded):
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=0)
    penalty = sum((r ** 2).sum() for r in recorded if r.requires_grad)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        torch.autograd.grad(penalty, inputs, allow_unused=True, retain_graph=True)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        penalty.backward()
