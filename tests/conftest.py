"""Shared test configuration: which devices to run on, and the closeness check with a report."""
import os

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


def pytest_collection_modifyitems(config, items):
    """test_cuda_sim_sanitized.py reruns every simulated kernel test (test_cuda_sim_*.py) under ASan and
    UBSan, which also check the arithmetic: when it is collected and ASan is there, the unsanitized runs
    of the same tests are left out of the session (about 40 s of CI's 2 cores, the simulator's build
    included). Run a test_cuda_sim_*.py file on its own for the unsanitized run."""
    sanitized = "test_cuda_sim_sanitized.py"
    if os.environ.get("ELMO_FAST_SIM_SANITIZE"):  # this is the sanitized run itself
        return
    if not any(item.path.name == sanitized for item in items):
        return
    import cuda_sim

    if cuda_sim.unavailable() or cuda_sim.sanitizer_preload("address") is None:
        return

    def rerun(item):
        return item.path.name.startswith("test_cuda_sim_") and item.path.name != sanitized

    config.hook.pytest_deselected(items=[item for item in items if rerun(item)])
    items[:] = [item for item in items if not rerun(item)]
