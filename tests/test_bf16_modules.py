"""bfloat16 on the CPU for the modules (issue 10): Elmo(...).to(torch.bfloat16) and
elmo_fast.nn.LSTM(...).to(torch.bfloat16) against their float32 selves, over the real tokens."""
import pytest
import torch

import elmo_fast
from elmo_fast import reference as R
from elmo_fast.chars import batch_to_ids
from elmo_fast.elmo import Elmo, ElmoBiLm
from elmo_fast.synthetic import write_elmo_files
from elmo_fast.weights import load_weights

SENTENCES = [["The", "cat", "sat", "on", "the", "mat", "."], ["A", "dog", "barked", "!"],
             ["Colorless", "green", "ideas", "sleep", "furiously", "tonight", "in", "Paris", "."]]


def token_errors(a, b, mask):
    """Per real token: cosine and relative error of b against a."""
    a, b = a[mask].double(), b[mask].double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    rel = (a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)
    return cos, rel


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    # ELMo's layer shapes at a quarter of the width; weight_scale 0.5 keeps the LSTMs out of the
    # regime where rounding the weights to bf16 alone moves the output by more than 1% (see below).
    return write_elmo_files(tmp_path_factory.mktemp("elmo_bf16"), filters=((1, 32), (2, 32), (3, 64), (4, 128)),
                            char_dim=16, n_highway=2, dim=512, projection_dim=128, weight_scale=0.5)


@pytest.fixture(scope="module")
def files_chaotic(tmp_path_factory):
    # The synthetic default scale ("trained-looking": clips bite): small perturbations grow through
    # the recurrence, so bf16 weights alone move the LSTM layers by a few percent.
    return write_elmo_files(tmp_path_factory.mktemp("elmo_bf16_default"), filters=((1, 32), (2, 32), (3, 64)),
                            char_dim=16, n_highway=2, dim=256, projection_dim=64)


def test_elmo_to_bfloat16_matches_float32(files):
    ids = batch_to_ids(SENTENCES)
    fp32 = Elmo(*files, 2, dropout=0.0)
    bf16 = Elmo(*files, 2, dropout=0.0).to(torch.bfloat16)
    with torch.no_grad():
        want, got = fp32(ids), bf16(ids)
    mask = want["mask"].bool()
    assert torch.equal(got["mask"], want["mask"])
    for a, b in zip(want["elmo_representations"], got["elmo_representations"]):
        assert b.dtype == torch.bfloat16 and b.shape == a.shape
        cos, rel = token_errors(a, b, mask)
        assert cos.min() >= 0.999 and rel.mean() <= 0.01, (cos.min().item(), rel.mean().item())


def test_elmo_bfloat16_error_is_that_of_reference_in_bfloat16(files_chaotic):
    """Where the model itself amplifies rounding, the bf16 biLM is judged against reference.py run in
    bf16 (flash-attention's rule): per layer, mean relative error vs float32 at most 1.5x the reference's."""
    ids = batch_to_ids(SENTENCES)
    options, state = load_weights(*files_chaotic)
    bilm32 = ElmoBiLm(*files_chaotic, stateful=False)
    bilm16 = ElmoBiLm(*files_chaotic, stateful=False).to(torch.bfloat16)
    with torch.no_grad():
        want, got = bilm32(ids), bilm16(ids)
        ref16 = R.elmo_bilm(ids, {k: v.to(torch.bfloat16) for k, v in state.items()}, options)[0]
    mask = want["mask"].bool()
    for k, (a, b, r) in enumerate(zip(want["activations"], got["activations"], ref16)):
        assert b.dtype == torch.bfloat16
        _, rel = token_errors(a, b, mask)
        _, ref_rel = token_errors(a, r, mask)
        assert rel.mean() <= 1.5 * ref_rel.mean() + 1e-3, (k, rel.mean().item(), ref_rel.mean().item())


@pytest.mark.parametrize("proj_size", [0, 24])
def test_nn_lstm_to_bfloat16(proj_size):
    torch.manual_seed(0)
    lstm = elmo_fast.nn.LSTM(32, 64, num_layers=2, bidirectional=True, batch_first=True, proj_size=proj_size)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        y32, (h32, c32) = lstm(x)
        lstm.to(torch.bfloat16)
        y16, (h16, c16) = lstm(x.bfloat16())
    assert y16.dtype == h16.dtype == c16.dtype == torch.bfloat16
    for a, b in ((y32, y16), (h32, h16), (c32, c16)):
        cos, rel = token_errors(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]),
                                torch.ones(a.numel() // a.shape[-1], dtype=torch.bool))
        assert cos.min() >= 0.999 and rel.mean() <= 0.01, (cos.min().item(), rel.mean().item())
    # and it trains: gradients reach the bf16 parameters
    out, _ = lstm(x.bfloat16())
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in lstm.parameters())


def test_autocast_cpu_runs_the_ops_in_bfloat16():
    from elmo_fast import functional as F

    x = torch.randn(5, 8, requires_grad=True)
    w, b = torch.randn(16, 8, requires_grad=True), torch.randn(16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.highway(x, [w], [b])
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()  # the casts are recorded: float32 leaves get float32 gradients
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    with torch.no_grad():
        want = F.highway(x.bfloat16(), [w.bfloat16()], [b.bfloat16()])
    assert torch.equal(y.detach(), want)


def test_autocast_over_float32_elmo(files):
    ids = batch_to_ids(SENTENCES)
    elmo = Elmo(*files, 1, dropout=0.0, stateful=False)  # stateless: the two calls must not share state
    assert all(p.dtype == torch.float32 for p in elmo.parameters())
    with torch.no_grad():
        want = elmo(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = elmo(ids)
    mask = want["mask"].bool()
    a, b = want["elmo_representations"][0], got["elmo_representations"][0]
    assert not torch.equal(a, b.to(a.dtype))  # the ops did run in bf16
    cos, rel = token_errors(a, b, mask)
    assert cos.min() >= 0.999 and rel.mean() <= 0.01, (cos.min().item(), rel.mean().item())


def test_autocast_over_float32_nn_lstm():
    torch.manual_seed(1)
    lstm = elmo_fast.nn.LSTM(16, 32, num_layers=2, bidirectional=True, batch_first=True, proj_size=8)
    x = torch.randn(2, 5, 16)
    want, _ = lstm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, (h, c) = lstm(x)
    assert got.dtype == h.dtype == c.dtype == torch.bfloat16
    cos, rel = token_errors(want.reshape(-1, 16), got.reshape(-1, 16), torch.ones(10, dtype=torch.bool))
    assert cos.min() >= 0.999 and rel.mean() <= 0.01, (cos.min().item(), rel.mean().item())
    got.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lstm.parameters())


def test_autocast_under_torch_compile_fullgraph():
    torch.manual_seed(2)
    lstm = elmo_fast.nn.LSTM(16, 32, batch_first=True, proj_size=8)
    highway = elmo_fast.nn.Highway(16, num_layers=2)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lstm(highway(x))[0]

    x = torch.randn(2, 5, 16)
    got = torch.compile(f, fullgraph=True)(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, f(x))
