"""pytest-benchmark suites: `pytest bench/` (not part of the test suite).

ELMO_FAST_BENCH_MODEL (small | medium | original, default small) picks the published size,
ELMO_FAST_BENCH_THREADS (default 1) pins torch's threads; both are printed in the header.
"""
import os

import pytest
import torch

MODEL = os.environ.get("ELMO_FAST_BENCH_MODEL", "small")
THREADS = int(os.environ.get("ELMO_FAST_BENCH_THREADS", "1"))


def pytest_report_header(config):
    from elmo_fast import benchmark

    return f"elmo_fast bench: model={MODEL} threads={THREADS} machine={benchmark.machine()}"


@pytest.fixture(autouse=True)
def _pinned_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def benchmark_fixture(benchmark):
    """pytest-benchmark's fixture under a name that does not shadow elmo_fast.benchmark."""
    return benchmark
