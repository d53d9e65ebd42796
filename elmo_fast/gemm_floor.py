"""The GEMM floor of a CPU benchmark case: the matrix products an ideal implementation cannot avoid,
each run on the fastest path this machine has for its shape (torch's mm or oneDNN with the weight
packed once), timed in the same run as the implementations it bounds. elmo_fast's time over the
floor says how much is left outside the GEMMs (pointwise passes, gathers, Python).

A product is (M, K, N, count): count times an (M, K) @ (K, N).
"""
from collections import Counter
from typing import Callable, Dict, List, Sequence, Tuple

import torch

Gemm = Tuple[int, int, int, int]


def lstm_gemms(lengths: Sequence[int], input_size: int, cell: int, proj: int) -> List[Gemm]:
    """One layer-direction: the hoisted input GEMM over every valid step, then per step the recurrent
    GEMM and the projection over the rows still active."""
    steps = max(lengths, default=0)
    active = Counter(sum(1 for length in lengths if length > s) for s in range(steps))
    gemms = [(sum(lengths), input_size, 4 * cell, 1)] if sum(lengths) else []
    for rows, count in sorted(active.items()):
        gemms += [(rows, proj, 4 * cell, count), (rows, cell, proj, count)]
    return gemms


def elmo_gemms(distinct_tokens: int, lengths: Sequence[int], n_highway: int, filters: int, cell: int,
               proj: int, layers: int = 2) -> List[Gemm]:
    """The biLM forward: highway layers and projection over the distinct tokens, then every
    layer-direction of the LSTM (spec §4-5)."""
    gemms = [(distinct_tokens, filters, 2 * filters, n_highway), (distinct_tokens, filters, proj, 1)]
    return gemms + 2 * layers * lstm_gemms(lengths, proj, cell, proj)


def _fastest(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 3) -> Callable[[], object]:
    """A closure running one (m, k) @ (k, n) on whichever path is fastest for it now."""
    from elmo_fast.benchmark import time_call  # late: benchmark imports this module

    gen = torch.Generator().manual_seed(m * 31 + k * 7 + n)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    paths = {"mm": lambda: torch.mm(x, w.t(), out=out)}
    if torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16) and m > 0:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, max(m, 1))
        paths["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], None)
    times = {name: time_call(fn, repeats) for name, fn in paths.items()}
    return paths[min(times, key=times.get)]


def floor_runner(gemms: List[Gemm], dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """A callable that runs every product of `gemms` once, each shape on its fastest path."""
    runs: Dict[Tuple[int, int, int], int] = Counter()
    for m, k, n, count in gemms:
        if m > 0:
            runs[(m, k, n)] += count
    calls = [(_fastest(m, k, n, dtype), count) for (m, k, n), count in runs.items()]

    def run():
        for fn, count in calls:
            for _ in range(count):
                fn()
    return run
