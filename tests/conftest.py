"""Shared test configuration: which devices to run on, and the closeness check with a report."""
import pytest
import torch

# Tests that run a whole suite per device parametrize over this; CUDA only when present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    import elmo_fast

    return f"elmo_fast build: {elmo_fast.build_info()}  torch threads: {torch.get_num_threads()}"


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)


@pytest.fixture
def set_kernel():
    """elmo_fast.set_kernel(family, mode) for one test: each family it touched is back on "auto" after."""
    import elmo_fast

    touched = set()

    def choose(family, mode):
        touched.add(family)
        elmo_fast.set_kernel(family, mode)

    yield choose
    for family in touched:
        elmo_fast.set_kernel(family, "auto")
