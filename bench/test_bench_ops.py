"""Per-op and end-to-end benchmarks, each elmo_fast implementation beside its baselines measured in
the same run (reference = AllenNLP's algorithm; torch.nn.LSTM for the recurrence). Compare the
rows of one group: `pytest bench/ --benchmark-group-by=param:op,param:mode,param:shape`."""
import pytest
import torch

from conftest import DEVICE, DTYPE, MODEL
from elmo_fast import benchmark

SHAPES = [(1, 20), (16, 20)]
MODES = ["forward", "forward+backward"]


def _cells():
    for op in ["highway", "char_cnn", "lstm_projection", "elmo"]:
        impls = ["reference", "elmo_fast"] + (["torch.nn.LSTM"] if op == "lstm_projection" else [])
        for mode in MODES:
            if op == "elmo" and mode != "forward":
                continue  # minutes per round for the reference; `elmo-fast bench --full` covers it
            for shape in SHAPES:
                for impl in impls:
                    yield op, mode, f"{shape[0]}x{shape[1]}", impl


@pytest.mark.parametrize("op,mode,shape,impl", list(_cells()))
def test_bench(benchmark_fixture, op, mode, shape, impl):
    batch, words = map(int, shape.split("x"))
    tokens, impls = benchmark.CASES[op](MODEL, batch, words, DTYPE, mode == "forward+backward")
    benchmark_fixture.extra_info.update(tokens=tokens, model=MODEL, device=DEVICE, dtype=str(DTYPE))
    run = impls[impl]
    if DEVICE.startswith("cuda"):
        def run(fn=impls[impl]):  # time the kernels, not their launches
            fn()
            torch.cuda.synchronize()
    benchmark_fixture.pedantic(run, rounds=3, warmup_rounds=1)
