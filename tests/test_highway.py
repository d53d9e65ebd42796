"""The fused highway op (torch.ops.elmo_fast.highway) against reference.highway."""
import pytest
import torch

import elmo_fast
from elmo_fast import functional as F
from elmo_fast import reference as R
from conftest import DEVICES
from util import TOL, assert_close_verbose, noncontiguous

# Low-precision CUDA dtypes are judged against the float64 reference relative to the error of
# the reference itself run in that dtype (flash-attention's rule).
LOW_PRECISION = [torch.float16, torch.bfloat16]


def dtypes_for(device):
    return [torch.float64, torch.float32] if device == "cpu" else [torch.float32] + LOW_PRECISION


def make_case(n, f, layers, dtype, device, gen, requires_grad=True):
    x = torch.randn(n, f, generator=gen, dtype=torch.float64)
    weights = [torch.randn(2 * f, f, generator=gen, dtype=torch.float64) / f**0.5 for _ in range(layers)]
    biases = [torch.randn(2 * f, generator=gen, dtype=torch.float64) for _ in range(layers)]
    cast = lambda t: t.to(device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    return cast(x), [cast(w) for w in weights], [cast(b) for b in biases]


def clone_case(x, weights, biases):
    c = lambda t: t.detach().clone().requires_grad_(t.requires_grad)  # noqa: E731
    return c(x), [c(w) for w in weights], [c(b) for b in biases]


SHAPES = [(n, f, k) for n, f, k in [(0, 5, 1), (1, 1, 1), (7, 5, 2), (1000, 64, 3), (7, 2048, 1), (1, 64, 0),
                                     (33, 129, 2)]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,f,layers", SHAPES)
def test_highway_matches_reference_forward_and_backward(device, n, f, layers):
    for dtype in dtypes_for(device):
        if dtype in LOW_PRECISION:
            continue  # covered by test_highway_low_precision
        gen = torch.Generator().manual_seed(n * 1000 + f * 10 + layers)
        args = make_case(n, f, layers, dtype, device, gen)
        ref_args = clone_case(*args)
        out = F.highway(*args)
        ref = R.highway(*ref_args)
        assert out.shape == (n, f) and out.dtype == dtype
        assert_close_verbose(out, ref, f"out {dtype}", **TOL[dtype])
        grad = torch.randn(n, f, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        inputs = [args[0], *args[1], *args[2]]
        ref_inputs = [ref_args[0], *ref_args[1], *ref_args[2]]
        got = torch.autograd.grad(out, inputs, grad, allow_unused=True)
        want = torch.autograd.grad(ref, ref_inputs, grad, allow_unused=True)
        for i, (g, w) in enumerate(zip(got, want)):
            if w is None:  # layers == 0: the output is x itself
                continue
            # weight grads sum over N rows: scale atol with N.
            tol = dict(TOL[dtype], atol=TOL[dtype]["atol"] * max(1, n) ** 0.5)
            assert_close_verbose(g, w, f"grad {i} {dtype}", **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_highway_infinite_inputs_match_reference(device):
    """+-inf in x: the saturated gate must be exactly 0 or 1, as torch.sigmoid's, so 0 * inf gives NaN
    where the reference has NaN (the CPU's vectorized exp once stopped at 4.6e-39 and gave -inf)."""
    gen = torch.Generator().manual_seed(7)
    for dtype in [torch.float32, torch.float64]:
        # One layer: a second would turn every row holding an inf into NaN whatever the gate does.
        x, ws, bs = make_case(8, 9, 1, dtype, device, gen, requires_grad=False)
        for row in range(6):
            x[row, row] = float("inf") if row % 2 else float("-inf")
        x[6, 3] = float("nan")
        got, want = F.highway(x, ws, bs), R.highway(x, ws, bs)
        # The case bites: some infinite inputs meet a closed gate (NaN), others an open one (inf).
        diagonal = want[torch.arange(6), torch.arange(6)]
        assert torch.isnan(diagonal).any() and torch.isinf(diagonal).any() and torch.isfinite(want[7]).all()
        assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), (got, want)
        torch.testing.assert_close(got, want, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_highway_noncontiguous_inputs(device):
    gen = torch.Generator().manual_seed(1)
    x, ws, bs = make_case(13, 17, 2, torch.float32 if device == "cuda" else torch.float64, device, gen)
    xs, wss, bss = noncontiguous(x.detach()), [noncontiguous(w.detach()) for w in ws], [b.detach() for b in bs]
    assert_close_verbose(F.highway(xs, wss, bss), R.highway(x.detach(), [w.detach() for w in ws], bs),
                         **TOL[x.dtype])


def test_highway_gradcheck():
    gen = torch.Generator().manual_seed(2)
    args = make_case(4, 3, 2, torch.float64, "cpu", gen)
    assert torch.autograd.gradcheck(lambda x, w0, w1, b0, b1: F.highway(x, [w0, w1], [b0, b1]),
                                    (args[0], *args[1], *args[2]))


@pytest.mark.parametrize("device", DEVICES)
def test_highway_opcheck(device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    samples = []
    for n, f, k, grad, save in [(3, 4, 2, True, True), (0, 4, 1, True, True), (5, 2, 1, False, False),
                                (2, 3, 0, True, True)]:
        x, ws, bs = make_case(n, f, k, dtype, device, torch.Generator().manual_seed(n + f), requires_grad=grad)
        samples.append((x, ws, bs, save))
    for args in samples:
        torch.library.opcheck(torch.ops.elmo_fast.highway.default, args)


def test_highway_backward_without_saved_activations_is_an_error():
    x, ws, bs = make_case(3, 4, 1, torch.float64, "cpu", torch.Generator().manual_seed(0), requires_grad=False)
    y, acts = torch.ops.elmo_fast.highway(x, ws, bs, False)
    assert acts.numel() == 0
    with pytest.raises(RuntimeError, match="did not save activations"):
        torch.ops.elmo_fast.highway_backward(torch.ones_like(y), x, acts, ws)


def test_highway_backward_checks_saved_activations_and_weights():
    x, ws, bs = make_case(3, 4, 2, torch.float64, "cpu", torch.Generator().manual_seed(0), requires_grad=False)
    y, acts = torch.ops.elmo_fast.highway(x, ws, bs, True)
    dy = torch.ones_like(y)
    with pytest.raises(RuntimeError, match="activations.*dtype"):
        torch.ops.elmo_fast.highway_backward(dy, x, acts.float(), ws)
    with pytest.raises(RuntimeError, match="activations.*shape"):
        torch.ops.elmo_fast.highway_backward(dy, x, acts[:1], ws)
    with pytest.raises(RuntimeError, match="weight.*dtype"):
        torch.ops.elmo_fast.highway_backward(dy, x, acts, [ws[0], ws[1].float()])
    with pytest.raises(RuntimeError, match="weight.*shape"):
        torch.ops.elmo_fast.highway_backward(dy, x, acts, [ws[0], ws[1][:, :2]])


def test_highway_no_grad_matches_grad_mode():
    x, ws, bs = make_case(9, 8, 2, torch.float64, "cpu", torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = F.highway(x, ws, bs)
    b = F.highway(x, ws, bs)
    assert torch.equal(a, b)  # same arithmetic with and without saving activations


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_highway_cuda_low_precision(dtype):
    gen = torch.Generator().manual_seed(4)
    x64, ws64, bs64 = make_case(257, 96, 2, torch.float64, "cuda", gen, requires_grad=False)
    exact = R.highway(x64, ws64, bs64)
    low = lambda t: t.to(dtype)  # noqa: E731
    ours = F.highway(low(x64), [low(w) for w in ws64], [low(b) for b in bs64]).double()
    theirs = R.highway(low(x64), [low(w) for w in ws64], [low(b) for b in bs64]).double()
    assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-3


class TestHighwayModule:
    def test_parameter_names_and_init_match_allennlp(self):
        module = elmo_fast.nn.Highway(6, num_layers=2)
        assert list(module.state_dict()) == ["_layers.0.weight", "_layers.0.bias", "_layers.1.weight",
                                             "_layers.1.bias"]
        assert module._layers[0].weight.shape == (12, 6)
        assert torch.all(module._layers[1].bias[6:] == 1)

    def test_module_matches_reference_on_3d_input(self):
        module = elmo_fast.nn.Highway(5, num_layers=2).double()
        x = torch.randn(2, 3, 5, dtype=torch.float64)
        weights = [l.weight for l in module._layers]
        biases = [l.bias for l in module._layers]
        assert_close_verbose(module(x), R.highway(x.reshape(-1, 5), weights, biases).reshape(2, 3, 5),
                             **TOL[torch.float64])

    def test_other_activation_runs_plain_pytorch(self):
        module = elmo_fast.nn.Highway(4, num_layers=1, activation=torch.tanh).double()
        x = torch.randn(3, 4, dtype=torch.float64)
        nl, gate = module._layers[0](x).chunk(2, dim=-1)
        g = torch.sigmoid(gate)
        assert_close_verbose(module(x), g * x + (1 - g) * torch.tanh(nl), **TOL[torch.float64])

    def test_torch_compile_fullgraph(self):
        module = elmo_fast.nn.Highway(8, num_layers=2)
        x = torch.randn(5, 8, requires_grad=True)
        compiled = torch.compile(module, fullgraph=True)
        out = compiled(x)
        assert_close_verbose(out, module(x), **TOL[torch.float32])
        out.sum().backward()
        assert x.grad is not None and module._layers[0].weight.grad is not None

    def test_bad_module_input(self):
        module = elmo_fast.nn.Highway(4)
        with pytest.raises(ValueError, match=r"inputs must have shape \(\.\.\., 4\)"):
            module(torch.randn(3, 5))


class TestHighwayBadInput:
    def setup_method(self):
        self.x, self.ws, self.bs = make_case(3, 4, 2, torch.float32, "cpu", torch.Generator().manual_seed(5),
                                             requires_grad=False)

    def test_wrong_rank(self):
        with pytest.raises(ValueError, match=r"x must have shape \(N, F\)"):
            F.highway(self.x[0], self.ws, self.bs)

    def test_feature_mismatch(self):
        with pytest.raises(ValueError, match=r"weights\[1\] must have shape \(2F, F\)"):
            F.highway(self.x, [self.ws[0], self.ws[1][:, :3]], self.bs)
        with pytest.raises(ValueError, match=r"biases\[0\] must have shape"):
            F.highway(self.x, self.ws, [self.bs[0][:5], self.bs[1]])

    def test_layer_count_mismatch(self):
        with pytest.raises(ValueError, match="one entry per layer"):
            F.highway(self.x, self.ws, self.bs[:1])

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match=r"weights\[0\] has dtype torch.float64"):
            F.highway(self.x, [self.ws[0].double(), self.ws[1]], self.bs)

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="x must have dtype float32, float64, bfloat16 on cpu, got int64"):
            F.highway(self.x.long(), self.ws, self.bs)

    def test_half_on_cpu(self):
        with pytest.raises(TypeError, match="x must have dtype"):
            F.highway(self.x.half(), [w.half() for w in self.ws], [b.half() for b in self.bs])

    def test_device_mismatch(self):
        meta = self.ws[0].to("meta")
        with pytest.raises(ValueError, match=r"weights\[0\] is on meta but x is on cpu"):
            F.highway(self.x, [meta, self.ws[1]], self.bs)

    def test_not_a_list(self):
        with pytest.raises(TypeError, match="weights must be a list of tensors"):
            F.highway(self.x, self.ws[0], self.bs)
        with pytest.raises(TypeError, match=r"biases\[1\] must be a torch.Tensor"):
            F.highway(self.x, self.ws, [self.bs[0], 3.0])
