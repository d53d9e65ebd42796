"""pytest-benchmark suites: `pytest bench/` (not part of the test suite).

ELMO_FAST_BENCH_MODEL (small | medium | original, default small) picks the published size,
ELMO_FAST_BENCH_THREADS (default 1) pins torch's threads, ELMO_FAST_BENCH_DEVICE (cpu | cuda,
default cpu) and ELMO_FAST_BENCH_DTYPE (float32 | bfloat16 | float16, default float32) pick where
and in what the cases run; all are printed in the header.
"""
import os

import pytest
import torch

MODEL = os.environ.get("ELMO_FAST_BENCH_MODEL", "small")
THREADS = int(os.environ.get("ELMO_FAST_BENCH_THREADS", "1"))
DEVICE = os.environ.get("ELMO_FAST_BENCH_DEVICE", "cpu")
DTYPE = getattr(torch, os.environ.get("ELMO_FAST_BENCH_DTYPE", "float32"))


def pytest_report_header(config):
    from elmo_fast import benchmark

    return (f"elmo_fast bench: model={MODEL} threads={THREADS} device={DEVICE} dtype={DTYPE} "
            f"machine={benchmark.machine()}")


@pytest.fixture(autouse=True)
def _pinned_threads_and_device():
    from elmo_fast import benchmark

    saved = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    benchmark._DEVICE[0] = DEVICE
    yield
    benchmark._DEVICE[0] = "cpu"
    torch.set_num_threads(saved)


@pytest.fixture
def benchmark_fixture(benchmark):
    """pytest-benchmark's fixture under a name that does not shadow elmo_fast.benchmark."""
    return benchmark
