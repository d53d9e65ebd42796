"""Helpers for comparing fused ops with elmo_fast.reference."""
from dataclasses import dataclass
from typing import List

import torch

# Per dtype: forward tolerances for a fused op against the float64-exact reference evaluated in
# the same dtype. float32 differs by GEMM blocking order and the vectorised exp (2 ulp).
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}


def assert_close_verbose(actual, expected, name="", **tol):
    """torch.testing.assert_close, with the max and mean |diff| in the message."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if actual.numel():
        diff = (actual.double() - expected.double()).abs()
        detail = f"{name}: max |diff| {diff.max().item():.3e}, mean {diff.mean().item():.3e}"
    else:
        detail = f"{name}: empty"
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{detail}\n{m}", **tol)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a tensor whose last dim has stride 2 (a slice of a wider one)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous() or t.shape[-1] <= 1
    return out.requires_grad_(t.requires_grad)


def interrupt_nth_write(monkeypatch, n):
    """Make the n-th call of OutputFile.write_batch raise KeyboardInterrupt (a Ctrl-C mid-file).
    Returns a function that undoes it, for the resumed run."""
    from elmo_fast.embed_io import OutputFile

    original, calls = OutputFile.write_batch, {"n": 0}

    def write_batch(self, items, state=None):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(self, items, state)

    monkeypatch.setattr(OutputFile, "write_batch", write_batch)
    return lambda: monkeypatch.setattr(OutputFile, "write_batch", original)


@dataclass
class Plan:
    """make_lstm_plan (csrc/common/lstm_plan.h, Note [LSTM packing]) in Python: rows sorted by length
    (stable, longest first), packed step-major."""
    B: int
    T: int
    perm: List[int]
    active: List[int]
    offset: List[int]
    pack: List[int]   # packed row -> b * T + t
    last: List[int]   # sorted position -> hbuf row of its final h

    @property
    def total(self):
        return self.offset[-1]

    @property
    def steps(self):
        return len(self.active)

    def h_row(self, s):
        """hbuf row of the first h_prev of step s."""
        return 0 if s == 0 else self.B + self.offset[s - 1]


def make_plan(lengths, T, reverse):
    B = len(lengths)
    perm = sorted(range(B), key=lambda b: -lengths[b])  # stable: longest first
    steps = lengths[perm[0]] if B else 0
    active = [sum(lengths[b] > s for b in perm) for s in range(steps)]
    offset = [0]
    for a in active:
        offset.append(offset[-1] + a)
    pack = [perm[k] * T + (lengths[perm[k]] - 1 - s if reverse else s) for s in range(steps) for k in range(active[s])]
    last = [k if lengths[perm[k]] == 0 else B + offset[lengths[perm[k]] - 1] + k for k in range(B)]
    return Plan(B, T, perm, active, offset, pack, last)
