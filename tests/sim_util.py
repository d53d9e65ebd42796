"""Helpers for the tests that run csrc/cuda's kernels in the CPU simulator (Note [CUDA simulator] in
tests/cuda_sim/__init__.py). ELMO_FAST_SIM_SANITIZE=address|thread (set by test_cuda_sim_sanitized.py in a
process that preloads the sanitizer's runtime) loads that sanitized build instead."""
import ctypes
import os

import pytest
import torch

import cuda_sim

SIM_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Float tolerance of one kernel result against float64: storage rounding (half: 2^-11, bfloat16: 2^-8)
# of the inputs and of the result, with float arithmetic in between.
SIM_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=4e-3, atol=4e-3),
           torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
CUDA_SUCCESS = 0


@pytest.fixture(scope="session")
def sim():
    reason = cuda_sim.unavailable()
    if reason:
        pytest.skip(f"CUDA simulator: {reason}")
    lib = ctypes.CDLL(str(cuda_sim.library_path(sanitize=os.environ.get("ELMO_FAST_SIM_SANITIZE") or None)))
    lib.sim_char_cnn_tc_layout.restype = None
    lib.sim_lstm_persistent_layout.restype = None
    return lib


def code(dtype):
    return cuda_sim.DTYPE_CODES[str(dtype).removeprefix("torch.")]


def ptr(t):
    """A tensor's data for a launcher: None (nullptr) for None; the tensor must be contiguous."""
    if t is None:
        return None
    assert t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def i64(*values):
    return [ctypes.c_int64(v) for v in values]


def f32(*values):
    return [ctypes.c_float(v) for v in values]


def int_array(values):
    return (ctypes.c_int * max(len(values), 1))(*values)


def check(err, what):
    assert err == CUDA_SUCCESS, f"{what}: cudaError_t {err}"
